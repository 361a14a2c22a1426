"""Hub and spokes: services on other machines reach one tenant's durable store
through a WebSocket hub, and a hub restart loses nothing.

Four processes:

- the **hub**: ``alkpubsub.hub.Hub`` under uvicorn, one ``honker+durable`` file
  per tenant (``tenant-acme.db``, ``tenant-globex.db``), plus an in-process
  handler that answers call requests on acme's own transport;
- the **acme spoke** (``ws://...?token=<acme's token>``): asks for a call and
  waits for the answer, and keeps a durable consumer of ``ticks:>``;
- the **globex spoke**: subscribed to ``>`` and sees only globex's events;
- this script, the **backend**: it starts the others and publishes ticks
  straight into acme's file (as any service on the hub's machine may), also
  while the hub is down.

Midway the hub is stopped (SIGTERM: spokes get close code 4503) and started
again on the same port; the acme spoke reconnects by itself, and its durable
consumer catches up on every tick committed before, during and after.

Run: python examples/hub_spoke.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import alkpubsub

TICKS = 10
"""Ticks published before, during and after the hub's restart (each)."""


# -- the hub process ---------------------------------------------------------


async def run_hub(data: str, port: int) -> None:
    import uvicorn

    from alkpubsub.hub import Grant, Hub, tokens

    # Tokens map to grants: the tenant a spoke reaches, and what it may touch.
    # acme's spoke may publish call requests and read calls and ticks;
    # globex's may read everything of globex.
    table = {
        token: Grant(
            tenant,
            publish=("calls:requested", "hello:>"),
            subscribe=("calls:>", "ticks:>", "hello:>") if tenant == "acme" else (">",),
        )
        for token, tenant in json.loads(os.environ["HUB_SPOKE_TOKENS"]).items()
    }
    # {tenant} picks the tenant's file: <data>/tenant-acme.db, <data>/tenant-globex.db.
    hub = Hub(f"honker+durable://{data}?tenant={{tenant}}", auth=tokens(table))

    async def answer_calls() -> None:
        # The hub's own process works on a tenant's transport directly: the
        # same transport its spokes publish into and subscribe through.
        acme = await hub.transport_for("acme")
        # Durable, from the earliest: a request that came in before this
        # handler (or while the hub restarted) is still answered.
        incoming = acme.subscribe("calls:requested", consumer="call-handler", start="earliest")
        async with incoming as requests:
            async for request in requests:
                call_id = request.payload["call_id"]
                reply = {"type": "call.responded", "call_id": call_id, "status": "connected"}
                await acme.publish(f"calls:{call_id}", reply)
                await requests.ack(request)
                print(f"hub handler: answered call {call_id} on calls:{call_id}", flush=True)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # SIGTERM is ours (below): close the hub first, then uvicorn

    config = uvicorn.Config(
        hub, host="127.0.0.1", port=port, ws="websockets-sansio", log_level="warning"
    )
    server = Server(config)
    handler = asyncio.create_task(answer_calls())

    async def shut_down() -> None:
        for listener in server.servers:
            listener.close()  # stop listening first: reconnecting spokes retry later
        handler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await handler  # its durable subscription saves its position
        await hub.close()  # every spoke gets close code 4503 and reconnects later
        server.should_exit = True

    stopping: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: stopping.append(loop.create_task(shut_down())))
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn has a flag only)
        await asyncio.sleep(0.01)
    if serving.done():
        raise SystemExit(f"hub: could not listen on 127.0.0.1:{port}")
    print(f"hub: serving tenants acme and globex on ws://127.0.0.1:{port}", flush=True)
    await serving
    print("hub: stopped (its spokes were closed with 4503: they reconnect)", flush=True)


# -- the spoke processes -------------------------------------------------------


async def lines_from_stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def retry(what: Any) -> Any:
    """Run ``what()`` until the spoke is connected: while it reconnects, a
    publish or subscribe raises ConnectionLost at once instead of waiting."""
    for _ in range(200):
        try:
            return await what()
        except alkpubsub.ConnectionLost:
            await asyncio.sleep(0.05)
    return await what()


async def run_acme(url: str) -> None:
    spoke = await alkpubsub.connect(url)
    ticks: list[int] = []
    arrived = asyncio.Condition()

    # A durable consumer: its position is saved in the hub's acme file, so
    # whatever is committed while this spoke (or the hub) is away comes later.
    dashboard = spoke.subscribe("ticks:>", consumer="dashboard", start="earliest")
    await dashboard.start()

    async def consume() -> None:
        async for tick in dashboard:
            ticks.append(tick.payload["n"])
            await dashboard.ack(tick)
            async with arrived:
                arrived.notify_all()

    async def call(call_id: str) -> None:
        # Subscribe to the reply topic first, then ask: the answer cannot be missed.
        async with spoke.subscribe(f"calls:{call_id}") as replies:
            request = {"type": "call.requested", "call_id": call_id, "to": "+1 555 0100"}
            await spoke.publish("calls:requested", request)
            reply = await replies.get(timeout=10)
        print(
            f"acme spoke: call {call_id} answered by the hub: {reply.payload['type']} "
            f"status={reply.payload['status']}",
            flush=True,
        )

    consumer = asyncio.create_task(consume())
    print(f"acme spoke: connected as tenant {spoke.tenant}", flush=True)
    commands = await lines_from_stdin()
    while command := (await commands.readline()).decode().split():
        if command[0] == "call":
            await retry(lambda: call(command[1]))
        elif command[0] == "wait":
            async with arrived:
                await arrived.wait_for(lambda: len(set(ticks)) >= int(command[1]))
            print(
                f"acme spoke: durable consumer 'dashboard' has {len(set(ticks))} ticks", flush=True
            )
    consumer.cancel()
    unique = set(ticks)
    lost = set(range(1, 3 * TICKS + 1)) - unique
    print(
        f"acme spoke: caught up: {len(unique)} of {3 * TICKS} ticks, {len(lost)} lost, "
        f"{len(ticks) - len(unique)} redelivered, reconnects={dashboard.stats.reconnects}",
        flush=True,
    )
    await dashboard.close()
    await spoke.close()


async def run_globex(url: str) -> None:
    spoke = await alkpubsub.connect(url)
    seen: list[str] = []
    async with spoke.subscribe(">") as everything:
        # Its own hello is the one event it should see: acme's calls and ticks
        # live in acme's file, which globex's token cannot reach.
        await spoke.publish("hello:globex", {"from": "globex"})

        async def collect() -> None:
            async for event in everything:
                seen.append(event.topic)

        collector = asyncio.create_task(collect())
        print("globex spoke: subscribed to '>' (everything its tenant has)", flush=True)
        commands = await lines_from_stdin()
        await commands.read()  # until the backend closes stdin
        collector.cancel()
    print(f"globex spoke: saw {len(seen)} event(s): {', '.join(seen) or 'none'}", flush=True)
    await spoke.close()


# -- the backend: starts everything, publishes ticks, restarts the hub ---------


class Child:
    """A process of this example; its output is printed as it comes."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self.proc: asyncio.subprocess.Process | None = None
        self._relaying: asyncio.Task[None] | None = None

    async def start(self, env: dict[str, str]) -> Child:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, *self.args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **env},
        )  # fmt: skip
        self._relaying = asyncio.create_task(self._relay())
        return self

    async def _relay(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode().rstrip()
            print(line, flush=True)
            self.lines.put_nowait(line)

    async def expect(self, text: str, timeout: float = 15) -> None:
        async with asyncio.timeout(timeout):
            while text not in await self.lines.get():
                pass

    def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())

    async def stop(self, *, sigterm: bool = False) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        if sigterm:
            self.proc.send_signal(signal.SIGTERM)
        else:
            self.proc.stdin.close()
        async with asyncio.timeout(15):
            await self.proc.wait()
            if self._relaying is not None:
                await self._relaying  # its last lines are printed

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main() -> None:
    acme_token, globex_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {"HUB_SPOKE_TOKENS": json.dumps({acme_token: "acme", globex_token: "globex"})}
    port = free_port()
    children: list[Child] = []
    with tempfile.TemporaryDirectory() as data:
        try:
            hub = await Child("--hub", data, str(port)).start(env)
            children.append(hub)
            await hub.expect("hub: serving")

            def spoke_url(token: str) -> str:
                # The token may also go in Settings.token (sent as a Bearer header).
                return f"ws://127.0.0.1:{port}/events?token={token}"

            globex = await Child("--globex", spoke_url(globex_token)).start(env)
            acme = await Child("--acme", spoke_url(acme_token)).start(env)
            children += [globex, acme]
            await globex.expect("globex spoke: subscribed")
            await acme.expect("acme spoke: connected")

            # 1. A request/reply through the hub: the spoke publishes
            #    call.requested, the hub's handler answers on calls:<id>.
            acme.send("call c-1")
            await acme.expect("call c-1 answered")

            # 2. Ticks committed into acme's file reach the spoke's durable consumer.
            backend = await alkpubsub.connect(f"honker+durable://{data}?tenant=acme")
            async with backend:
                await backend.publish_many([("ticks:1s", {"n": n}) for n in range(1, TICKS + 1)])
                print(f"backend: committed ticks 1-{TICKS} into tenant-acme.db")
                acme.send(f"wait {TICKS}")
                await acme.expect(f"has {TICKS} ticks")

                # 3. Restart the hub; commit ticks while it is down and after.
                await hub.stop(sigterm=True)
                await backend.publish_many(
                    [("ticks:1s", {"n": n}) for n in range(TICKS + 1, 2 * TICKS + 1)]
                )
                print(f"backend: committed ticks {TICKS + 1}-{2 * TICKS} while the hub was down")
                hub = await Child("--hub", data, str(port)).start(env)
                children.append(hub)
                await hub.expect("hub: serving")
                print("backend: the hub is back on the same port")
                await backend.publish_many(
                    [("ticks:1s", {"n": n}) for n in range(2 * TICKS + 1, 3 * TICKS + 1)]
                )
                print(f"backend: committed ticks {2 * TICKS + 1}-{3 * TICKS} after the restart")

            # 4. The spoke reconnected by itself: calls work again, and the
            #    durable consumer caught up on everything it missed.
            acme.send("call c-2")
            await acme.expect("call c-2 answered")
            acme.send(f"wait {3 * TICKS}")
            await acme.expect(f"has {3 * TICKS} ticks")
            await acme.stop()
            await acme.expect("caught up")
            await globex.stop()
            await globex.expect("globex spoke: saw")
            await hub.stop(sigterm=True)
        finally:
            for child in children:
                child.kill()
        print("files:", ", ".join(sorted(n for n in os.listdir(data) if n.endswith(".db"))))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hub"]:
        asyncio.run(run_hub(sys.argv[2], int(sys.argv[3])))
    elif sys.argv[1:2] == ["--acme"]:
        asyncio.run(run_acme(sys.argv[2]))
    elif sys.argv[1:2] == ["--globex"]:
        asyncio.run(run_globex(sys.argv[2]))
    else:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())
