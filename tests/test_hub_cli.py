"""``alkpubsub hub``: a hub process that spokes publish and subscribe through,
that stops cleanly on SIGTERM (spokes get 4503 and reconnect), refuses a bad
token spec with one line on stderr, and never prints a token."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import alkpubsub
from alkpubsub.errors import Unauthorized

CLI = str(Path(sys.executable).with_name("alkpubsub"))
SERVING = re.compile(r"^hub: serving .* on ws://127\.0\.0\.1:(\d+) ")


class HubProcess:
    """``alkpubsub hub`` in a child process; ``port`` from its first line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.lines: list[str] = []

    def start(self, listen: str = "127.0.0.1:0") -> None:
        self.proc = subprocess.Popen(
            [CLI, "hub", "--listen", listen, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until it serves (or dies)
        self.lines.append(line)
        match = SERVING.match(line)
        assert match, f"unexpected first line {line!r}; stderr: {self.proc.stderr.read()}"  # type: ignore[union-attr]
        self.port = int(match.group(1))

    def url(self, token: str) -> str:
        return f"ws://127.0.0.1:{self.port}/events?token={token}"

    def terminate(self, timeout: float = 10) -> tuple[int, float, str, str]:
        """SIGTERM; (exit code, seconds it took, rest of stdout, stderr)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        took = time.monotonic() - t0
        self.lines += out.splitlines(keepends=True)
        return self.proc.returncode, took, out, err

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def new_token() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture
def backend(tmp_path: Path) -> str:
    return f"honker+durable://{tmp_path / 'data'}?tenant={{tenant}}"


@pytest.fixture
def hubs() -> Iterator[list[HubProcess]]:
    made: list[HubProcess] = []
    yield made
    for hub in made:
        hub.kill()


async def test_spokes_publish_and_subscribe_then_sigterm_closes_4503_and_exits_0(
    backend: str, hubs: list[HubProcess]
) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    token = new_token()
    # The token comes from the environment, so it is not on the command line.
    hub = HubProcess("--url", backend, env={"ALKPUBSUB_HUB_TOKENS": f"{token}=acme"})
    hubs.append(hub)
    await asyncio.to_thread(hub.start)

    publisher = await alkpubsub.connect(hub.url(token))
    subscriber = await alkpubsub.connect(hub.url(token))
    raw = await connect(
        f"ws://127.0.0.1:{hub.port}/events",
        subprotocols=["alkpubsub.v1"],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {token}"},
    )
    try:
        assert publisher.tenant == "acme"  # type: ignore[attr-defined]
        async with subscriber.subscribe("orders:*", consumer="billing") as sub:
            sent = await publisher.publish("orders:created", {"order": 1})
            got = await sub.get(timeout=5)
            assert (got.id, got.payload) == (sent.id, {"order": 1})
            assert got.offset is not None  # the hub's honker+durable store assigned it
            await sub.ack(got)

            welcome = await raw.recv()
            assert '"op":"welcome"' in str(welcome)
            code, took, _, err = await asyncio.to_thread(hub.terminate)
            assert code == 0, err
            assert took < 5, f"the hub took {took:.1f} s to stop"
            # The spokes were told the hub is shutting down (reconnect later).
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(raw.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4503
    finally:
        await raw.close()
        await publisher.close()
        await subscriber.close()
    text = "".join(hub.lines) + err
    assert "hub: SIGTERM: closing 3 spoke connection(s) (4503)" in text
    assert "hub: stopped" in text
    assert "Traceback" not in text
    assert token not in text


async def test_a_spoke_reconnects_when_the_hub_comes_back_on_the_same_port(
    backend: str, hubs: list[HubProcess], tmp_path: Path
) -> None:
    token = new_token()
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# acme's spokes\n{token}=acme\n")
    first = HubProcess("--url", backend, "--tokens-file", str(tokens_file))
    hubs.append(first)
    await asyncio.to_thread(first.start)
    spoke = await alkpubsub.connect(first.url(token))
    try:
        async with spoke.subscribe("orders:*", consumer="billing") as sub:
            await spoke.publish("orders:created", {"order": 1})
            await sub.ack(await sub.get(timeout=5))
            code, _, _, err = await asyncio.to_thread(first.terminate)
            assert code == 0, err

            second = HubProcess("--url", backend, "--tokens-file", str(tokens_file))
            hubs.append(second)
            await asyncio.to_thread(second.start, f"127.0.0.1:{first.port}")
            # The spoke reconnects by itself (backoff from 0.1 s) and
            # subscribes again; a publish then reaches the durable consumer.
            deadline = time.monotonic() + 10
            while True:
                try:
                    await spoke.publish("orders:created", {"order": 2})
                    break
                except alkpubsub.ConnectionLost:
                    assert time.monotonic() < deadline, "the spoke did not reconnect"
                    await asyncio.sleep(0.05)
            got = await sub.get(timeout=5)
            assert got.payload == {"order": 2}
            await sub.ack(got)
            assert sub.stats.reconnects == 1
            code, _, _, err = await asyncio.to_thread(second.terminate)
            assert code == 0, err
    finally:
        await spoke.close()


async def test_grants_from_the_command_line_limit_what_a_token_may_do(
    backend: str, hubs: list[HubProcess]
) -> None:
    narrow, other = new_token(), new_token()
    hub = HubProcess(
        "--url",
        backend,
        # --token=VALUE: a token may start with "-" (token_urlsafe), which
        # argparse would take for an option after a separate "--token".
        f"--token={narrow}=acme;pub=calls:*;sub=calls:>",
        f"--token={other}=globex",
    )
    hubs.append(hub)
    await asyncio.to_thread(hub.start)
    spoke = await alkpubsub.connect(hub.url(narrow))
    try:
        async with spoke.subscribe("calls:>") as sub:
            await spoke.publish("calls:requested", {"call": 1})
            assert (await sub.get(timeout=5)).payload == {"call": 1}
        with pytest.raises(Unauthorized):
            await spoke.publish("orders:created", {"order": 1})
        with pytest.raises(Unauthorized):
            await spoke.subscribe(">").start()
    finally:
        await spoke.close()
    with pytest.raises(Unauthorized):
        await alkpubsub.connect(hub.url(new_token()))  # a token the hub does not know
    code, _, _, err = await asyncio.to_thread(hub.terminate)
    assert code == 0, err
    text = "".join(hub.lines) + err
    assert "2 token(s), tenants acme, globex" in text
    assert narrow not in text and other not in text


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{token}", "--token #1: write TOKEN=TENANT"),
        ("{token}=", "--token #1: write TOKEN=TENANT"),
        ("{token}=acme;pab=a:*", "--token #1: ...=acme;pab=a:*: use pub=PATTERNS or sub=PATTERNS"),
        ("{token}=ac/me", "--token #1: tenant id 'ac/me' is not a safe file-name segment"),
        ("{token}=acme;sub=a:>:b", "--token #1: pattern 'a:>:b'"),
        ("short=acme", "--token #1: a hub token needs at least 16 characters"),
    ],
)
def test_a_bad_token_spec_exits_2_with_one_line_and_no_token(
    backend: str, spec: str, message: str
) -> None:
    token = new_token()
    done = subprocess.run(
        [
            CLI,
            "hub",
            "--url",
            backend,
            "--listen",
            "127.0.0.1:0",
            f"--token={spec.format(token=token)}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"error: ConfigError: {message}"), done.stderr
    assert len(done.stderr.splitlines()) == 1  # no traceback
    assert token not in done.stderr


def test_missing_tokens_url_or_repeated_token_exit_2_saying_what_to_give(
    backend: str, tmp_path: Path
) -> None:
    token = new_token()

    def hub(*args: str) -> str:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("ALKPUBSUB_URL", "ALKPUBSUB_HUB_TOKENS")
        }
        done = subprocess.run(
            [CLI, "hub", "--listen", "127.0.0.1:0", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert done.returncode == 2, done.stderr
        assert token not in done.stderr + done.stdout
        return done.stderr

    assert "no tokens: give --token" in hub("--url", backend)
    assert "give the backend with --url" in hub(f"--token={token}=acme")
    assert "has no {tenant}" in hub("--url", "memory://hub", f"--token={token}=acme")
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"{token}=acme\n\n{token}=globex\n")
    assert f"{tokens_file} line 3 repeats the token of {tokens_file} line 1" in hub(
        "--url", backend, "--tokens-file", str(tokens_file)
    )


async def test_info_logs_mask_a_token_given_in_the_query_string(
    backend: str, hubs: list[HubProcess]
) -> None:
    from websockets.asyncio.client import connect

    token = new_token()
    hub = HubProcess(
        "--url", backend, "--log-level", "info", env={"ALKPUBSUB_HUB_TOKENS": f"{token}=acme"}
    )
    hubs.append(hub)
    await asyncio.to_thread(hub.start)
    # uvicorn logs each WebSocket's path and query at info level.
    async with connect(
        f"ws://127.0.0.1:{hub.port}/events?token={token}",
        subprotocols=["alkpubsub.v1"],  # type: ignore[list-item]
    ) as raw:
        assert '"tenant":"acme"' in str(await raw.recv())
    code, _, _, err = await asyncio.to_thread(hub.terminate)
    assert code == 0, err
    assert '"WebSocket /events?token=***" [accepted]' in err
    assert token not in err and token not in "".join(hub.lines)
