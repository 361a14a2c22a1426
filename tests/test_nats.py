"""NATS core transport specifics: subject mapping, auth and secrets, failures
and reconnects, slow consumers. The shared behaviour is in the conformance suite."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from brokers import HOST, NatsServer, free_port, require_binary
from nats_garbage import envelope, send_raw, settle_publisher, until_malformed, write_garbage

import alkpubsub
from alkpubsub import ConfigError, ConnectionLost, PublishError, Settings
from alkpubsub.conformance import PATTERN_TABLE, collect, unique
from alkpubsub.transports._nats_common import check_prefix, to_subject, to_topic
from alkpubsub.transports.nats import from_url

# -- topic <-> subject mapping ----------------------------------------------


def test_topic_separator_becomes_token_separator_and_dot_is_escaped() -> None:
    assert to_subject("alk", "graph:created") == "alk.graph.created"
    # '.' inside a segment must not split a NATS token: it travels as '~'.
    assert to_subject("alk", "v1.2:ready") == "alk.v1~2.ready"
    assert to_subject("", "a.b") == "a~b"
    assert to_subject("acme.alk", "call:*:>") == "acme.alk.call.*.>"


def test_every_topic_of_the_pattern_table_maps_back_to_itself() -> None:
    topics = {t for _, t, _ in PATTERN_TABLE}
    for topic in topics:
        for prefix in ("", "alk", "a.b"):
            assert to_topic(prefix, to_subject(prefix, topic)) == topic
    # Distinct topics never share a subject ('v1.2:x' vs 'v1:2:x').
    assert len({to_subject("alk", t) for t in topics}) == len(topics)


def test_foreign_subjects_are_not_topics() -> None:
    assert to_topic("alk", "other.graph") is None
    assert to_topic("alk", "alk") is None
    assert to_topic("alk", "alk.bad token") is None


@pytest.mark.parametrize("bad", ["a..b", ".a", "a.", "a.*", "a.>", "a b", "ü"])
def test_bad_prefix_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="prefix"):
        check_prefix(bad)


def test_unknown_or_bad_option_is_refused() -> None:
    with pytest.raises(ConfigError, match="prefx"):
        from_url("nats://127.0.0.1:1?prefx=a")
    with pytest.raises(ConfigError, match="reconnect_timeout"):
        from_url("nats://127.0.0.1:1?reconnect_timeout=0")
    with pytest.raises(ConfigError, match="prefix"):
        from_url("nats://127.0.0.1:1?prefix=a.*")


# -- connecting, auth and secrets -------------------------------------------


async def test_no_server_raises_connection_lost_naming_the_address() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(ConnectionLost) as info:
        await alkpubsub.connect(f"nats://{HOST}:{port}?connect_timeout=0.5")
    assert f"{HOST}:{port}" in str(info.value)
    assert "nats-server" in str(info.value)


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(base_dir=tmp_path, user="alice", password="s3cret-pw") as server:
        yield server


async def test_wrong_password_is_a_config_error_without_the_secret(
    secured_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"nats://alice:wrong-pw-123@{HOST}:{secured_nats.port}?connect_timeout=3"
    with pytest.raises(ConfigError) as info:
        await alkpubsub.connect(url)
    message = str(info.value)
    assert "refused the credentials" in message
    assert "alice:***@" in message
    assert "wrong-pw-123" not in message
    assert "wrong-pw-123" not in caplog.text


async def test_credentials_from_url_or_settings_connect_and_stay_secret(
    secured_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    by_url = await alkpubsub.connect(secured_nats.url)
    by_settings = await alkpubsub.connect(
        Settings(url=f"nats://{HOST}:{secured_nats.port}", username="alice", password="s3cret-pw")
    )
    try:
        topic = unique()
        async with by_settings.subscribe(topic) as sub:
            sent = await by_url.publish(topic, {"ok": True})
            [got] = await collect(sub, 1)
            assert got.id == sent.id
            assert "s3cret-pw" not in repr(by_url) + repr(sub) + by_url.name
            assert "alice:***@" in by_url.name
    finally:
        await by_url.close()
        await by_settings.close()
        # Closing logs nothing, and nothing logged so far carries the password.
        assert "s3cret-pw" not in caplog.text


async def test_token_in_url_is_used_and_masked(tmp_path: Path) -> None:
    with NatsServer(base_dir=tmp_path, token="tok-abc-123") as server:
        transport = await alkpubsub.connect(server.url)
        try:
            assert "tok-abc-123" not in repr(transport) + transport.name
            async with transport.subscribe("t") as sub:
                await transport.publish("t", 1)
                assert (await sub.get(5)).payload == 1
        finally:
            await transport.close()


# -- failures, reconnects, slow consumers ------------------------------------


async def test_a_publish_from_another_transport_right_after_subscribe_arrives(
    nats_server_session: NatsServer,
) -> None:
    # nats-server 2.9.10 does not route another connection's publish to a SUB
    # for a moment after confirming it: without the settle in subscribe(), 38 of
    # 400 such publishes were lost here (alkpubsub transports on both ends).
    url = f"{nats_server_session.url}?prefix={unique('p')}"
    subscriber = await alkpubsub.connect(url)
    publisher = await alkpubsub.connect(url)
    lost = 0
    try:
        for i in range(150):
            topic = unique("t")
            async with subscriber.subscribe(topic) as sub:
                await publisher.publish(topic, i)
                try:
                    await sub.get(timeout=1)
                except TimeoutError:
                    lost += 1
    finally:
        await publisher.close()
        await subscriber.close()
    print(f"NATS subscribe then publish from another transport: lost {lost} of 150")
    assert lost == 0


async def test_malformed_message_is_counted_and_the_subscription_goes_on(
    nats_server_session: NatsServer,
) -> None:
    prefix = unique("p")
    transport = await alkpubsub.connect(f"{nats_server_session.url}?prefix={prefix}")
    raw = await nats.connect(nats_server_session.url)
    try:
        async with transport.subscribe("jobs:*") as sub:
            await settle_publisher(raw)
            await raw.publish(f"{prefix}.jobs.x", b"\xffnot an envelope, not UTF-8")
            await raw.flush()
            sent = await transport.publish("jobs:y", "good")
            [got] = await collect(sub, 1)
            assert got.id == sent.id
            await until_malformed(sub, 1)
    finally:
        await raw.close()
        await transport.close()


async def test_garbage_on_the_wire_is_counted_and_delivery_goes_on(
    nats_server_session: NatsServer,
) -> None:
    # Before: a status line that is not UTF-8 ended nats-py's read loop (1 of 4
    # good events arrived), and an envelope for another topic of the pattern
    # was delivered as that topic.
    server, prefix = nats_server_session, unique("p")
    transport = await alkpubsub.connect(f"{server.url}?prefix={prefix}")
    raw = await nats.connect(server.url)
    try:
        async with transport.subscribe("jobs:x") as exact, transport.subscribe("jobs:*") as wild:
            written = await write_garbage(server.url, server.port, f"{prefix}.jobs.x", "jobs:x")
            # Only the wildcard reads these two: a subject that is not UTF-8, and
            # an envelope for jobs:z on jobs:y's subject.
            await asyncio.to_thread(
                send_raw, server.port, [b"PUB %s.jobs.\xff 2\r\nhi\r\n" % prefix.encode()]
            )
            await settle_publisher(raw)
            await raw.publish(f"{prefix}.jobs.y", json.dumps(envelope("jobs:z")).encode())
            await raw.flush()
            sent = [(await transport.publish("jobs:x", i)).id for i in range(3)]
            for sub in (exact, wild):
                got = await collect(sub, written.foreign + 3)
                # Another connection's messages may arrive after later ones of ours.
                assert [e.id for e in got if e.origin != "foreign"] == sent
                assert len([e for e in got if e.origin == "foreign"]) == written.foreign
            await until_malformed(exact, written.malformed)
            await until_malformed(wild, written.malformed + 2)
    finally:
        await raw.close()
        await transport.close()


async def test_broker_restart_reconnects_and_resubscribes(nats_server: NatsServer) -> None:
    transport = await alkpubsub.connect(nats_server.url)
    try:
        async with transport.subscribe("after:*") as sub:
            await asyncio.to_thread(nats_server.restart)
            # Published after the restart on the same transport: nats-py sends it
            # once it has replayed the subscription, so it arrives.
            sent = await transport.publish("after:restart", 1)
            [got] = await collect(sub, 1)
            assert got.id == sent.id
            assert sub.stats.reconnects == 1
    finally:
        await transport.close()


async def test_gone_server_ends_iterators_with_connection_lost(nats_server: NatsServer) -> None:
    transport = await alkpubsub.connect(f"{nats_server.url}?reconnect_timeout=0.5")
    try:
        sub = transport.subscribe("x")
        await sub.start()
        await asyncio.to_thread(nats_server.kill)
        # No server for 0.5 s: the iterator raises instead of hanging, then ends.
        with pytest.raises(ConnectionLost, match="connect a new transport"):
            await sub.get(timeout=10)
        with pytest.raises(StopAsyncIteration):
            await sub.get(timeout=1)
        with pytest.raises(ConnectionLost):
            await transport.publish("x", 1)
    finally:
        await transport.close()


async def test_publish_while_disconnected_fills_the_buffer_then_raises(
    nats_server: NatsServer,
) -> None:
    transport = await alkpubsub.connect(f"{nats_server.url}?pending_size=4096")
    try:
        await asyncio.to_thread(nats_server.kill)
        await asyncio.sleep(0.2)  # let nats-py notice and start reconnecting
        with pytest.raises(PublishError, match="pending_size"):
            for i in range(1000):  # ~200 bytes each: 4 KiB is full after ~20
                await transport.publish("x", i)
    finally:
        await transport.close()


def _raw_publish(port: int, subject: str, count: int) -> None:
    """Publish ``count`` tiny messages over a plain socket and wait for the PONG."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(
            b'CONNECT {"verbose":false}\r\n'
            + b"".join(b"PUB %s 1\r\n\xff\r\n" % subject.encode() for _ in range(count))
            + b"PING\r\n"
        )
        data = b""
        while b"PONG" not in data:
            data += sock.recv(4096)


async def test_slow_consumer_drops_are_counted(nats_server_session: NatsServer) -> None:
    prefix = unique("p")
    transport = await alkpubsub.connect(
        f"{nats_server_session.url}?prefix={prefix}&pending_limit=10"
    )
    try:
        async with transport.subscribe("flood") as sub:
            # Blocks the event loop on purpose: 100 messages reach our socket
            # while nats-py cannot read, then arrive in one read. nats-py keeps
            # 10 for the callback and reports 90 as a slow consumer.
            _raw_publish(nats_server_session.port, f"{prefix}.flood", 100)
            time.sleep(0.2)  # noqa: ASYNC251 - keeps nats-py from reading meanwhile
            async with asyncio.timeout(5):
                while sub.stats.dropped + sub.stats.malformed < 100:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert sub.stats.dropped == 90
            assert sub.stats.malformed == 10  # the non-UTF-8 bodies that got through
    finally:
        await transport.close()


# -- TLS ------------------------------------------------------------------------


def _make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    openssl = require_binary("openssl")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key, csr = folder / "server.pem", folder / "server.key", folder / "server.csr"
    ext = folder / "san.ext"
    ext.write_text(f"subjectAltName=IP:{HOST}\n")
    for args in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=t-ca"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={HOST}"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True)
    return ca, cert, key


@pytest.fixture
def tls_nats(tmp_path: Path) -> Iterator[tuple[NatsServer, Path]]:
    ca, cert, key = _make_certificates(tmp_path)
    tls_args = ["--tls", "--tlscert", str(cert), "--tlskey", str(key)]
    with NatsServer(base_dir=tmp_path / "nats", extra_args=tls_args) as server:
        yield server, ca


async def test_tls_with_the_ca_from_settings_works_for_both_transports(
    tls_nats: tuple[NatsServer, Path],
) -> None:
    server, ca = tls_nats
    for url in (f"tls://{HOST}:{server.port}", f"tls+durable://{HOST}:{server.port}?stream=T"):
        transport = await alkpubsub.connect(Settings(url=url, tls_ca=ca))
        try:
            async with transport.subscribe("secure") as sub:
                sent = await transport.publish("secure", url)
                [got] = await collect(sub, 1)
                assert got.id == sent.id
        finally:
            await transport.close()


async def test_tls_server_not_trusted_is_refused(tls_nats: tuple[NatsServer, Path]) -> None:
    server, _ = tls_nats
    # Without our CA the self-signed chain cannot be verified.
    with pytest.raises(ConnectionLost, match="certificate"):
        await alkpubsub.connect(f"tls://{HOST}:{server.port}?connect_timeout=2")
