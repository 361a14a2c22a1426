"""Redis pub/sub transport: what the conformance suite does not cover.

Server-side subscription bookkeeping, channel prefixes, outages, malformed
messages, credentials and TLS, against real ``redis-server`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from brokers import HOST, RedisServer, free_port
from redis import exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis_garbage import foreign_bodies, publish_garbage

import alkpubsub
from alkpubsub import Closed, ConfigError, ConnectionLost, Event, Settings, Subscription
from alkpubsub.conformance import unique
from alkpubsub.conformance.restart import wait_until
from alkpubsub.transports.redis import RedisTransport

PASSWORD = "pw-Zq8-do-not-leak"


@pytest.fixture
async def transport(redis_server_session: RedisServer) -> AsyncIterator[alkpubsub.Transport]:
    t = await alkpubsub.connect(f"{redis_server_session.url}?prefix={unique('p')}:")
    yield t
    await t.close()


def numsub(server: RedisServer, channel: str) -> int:
    reply = server.call("PUBSUB", "NUMSUB", channel)
    assert isinstance(reply, list)
    count = reply[1]
    assert isinstance(count, int)
    return count


def numpat(server: RedisServer) -> int:
    """How many distinct patterns the server's clients subscribe to."""
    count = server.call("PUBSUB", "NUMPAT")
    assert isinstance(count, int)
    return count


async def test_server_subscription_follows_first_and_last_subscriber(
    redis_server: RedisServer,
) -> None:
    transport = await alkpubsub.connect(f"{redis_server.url}?prefix=app:")
    topic = f"{unique()}:created"
    first = transport.subscribe(topic)
    second = transport.subscribe(topic)
    await first.start()
    await second.start()
    # One SUBSCRIBE for two subscribers, on the prefixed channel.
    assert numsub(redis_server, f"app:{topic}") == 1
    await first.close()
    assert numsub(redis_server, f"app:{topic}") == 1  # the second still listens
    await second.close()
    await asyncio.sleep(0.1)  # UNSUBSCRIBE is sent; let the server process it
    assert numsub(redis_server, f"app:{topic}") == 0
    await transport.close()


async def test_wildcards_share_one_pattern_per_literal_prefix(redis_server: RedisServer) -> None:
    transport = await alkpubsub.connect(redis_server.url)
    base = unique()
    # "base:*" and "base:>" both narrow to the glob "base:*": one PSUBSCRIBE.
    async with (
        transport.subscribe(f"{base}:*") as one,
        transport.subscribe(f"{base}:>") as many,
    ):
        assert numpat(redis_server) == 1
        await transport.publish(f"{base}:a", 1)
        await transport.publish(f"{base}:a:b", 2)
        # The glob matches both; client-side matching keeps "*" to one segment.
        assert (await one.get(5)).payload == 1
        assert [(await many.get(5)).payload for _ in range(2)] == [1, 2]
        with pytest.raises(TimeoutError):
            await one.get(0.3)
    await asyncio.sleep(0.1)
    assert numpat(redis_server) == 0
    await transport.close()


async def test_exact_and_wildcard_subscribers_each_get_an_event_once(
    transport: alkpubsub.Transport,
) -> None:
    # The event reaches the connection twice (SUBSCRIBE and PSUBSCRIBE match):
    # each subscription must still see it exactly once.
    base = unique()
    async with transport.subscribe(f"{base}:x") as exact, transport.subscribe(f"{base}:*") as wild:
        sent = await transport.publish(f"{base}:x", "once")
        assert (await exact.get(5)).id == sent.id
        assert (await wild.get(5)).id == sent.id
        for sub in (exact, wild):
            with pytest.raises(TimeoutError):
                await sub.get(0.3)


async def test_prefix_keeps_applications_apart(redis_server_session: RedisServer) -> None:
    url = redis_server_session.url
    a = await alkpubsub.connect(f"{url}?prefix=a:")
    b = await alkpubsub.connect(f"{url}?prefix=b:")
    topic = unique()
    async with a.subscribe(topic) as sub_a, b.subscribe(topic) as sub_b:
        await a.publish(topic, "for a")
        assert (await sub_a.get(5)).payload == "for a"
        with pytest.raises(TimeoutError):
            await sub_b.get(0.3)
    await a.close()
    await b.close()


async def test_malformed_message_is_counted_and_the_subscription_goes_on(
    redis_server_session: RedisServer, transport: alkpubsub.Transport
) -> None:
    assert isinstance(transport, RedisTransport)
    topic = unique()
    async with transport.subscribe(topic) as sub:
        channel = transport.options.prefix + topic
        # It claims to be an envelope (the version key) and is not one.
        redis_server_session.call("PUBLISH", channel, '{"alkpubsub": 1, "id": 5}')
        good = await transport.publish(topic, "fine")
        assert (await sub.get(5)).id == good.id
        assert sub.stats.malformed == 1


async def test_publish_while_broker_is_down_raises_connection_lost(
    redis_server: RedisServer,
) -> None:
    transport = await alkpubsub.connect(redis_server.url)
    redis_server.stop()
    with pytest.raises(ConnectionLost, match="retry later"):
        await transport.publish(unique(), 1)
    redis_server.start()
    await transport.publish(unique(), 2)  # the next publish reconnects
    await transport.close()


async def test_subscription_raises_connection_lost_after_reconnect_timeout(
    redis_server: RedisServer,
) -> None:
    transport = await alkpubsub.connect(f"{redis_server.url}?reconnect_timeout=0.5")
    topic = unique()
    async with transport.subscribe(topic) as sub:
        await transport.publish(topic, "before")
        redis_server.stop()
        # The buffered event first, then the failure: never a silent hang.
        assert (await sub.get(5)).payload == "before"
        with pytest.raises(ConnectionLost, match="unreachable"):
            await sub.get(10)
    redis_server.start()
    # The transport itself recovers: a new subscription works.
    async with transport.subscribe(topic) as again:
        sent = await transport.publish(topic, "after")
        assert (await again.get(5)).id == sent.id
    await transport.close()


async def test_subscription_resumes_after_restart_and_counts_it(
    redis_server: RedisServer,
) -> None:
    transport = await alkpubsub.connect(redis_server.url)
    topic = unique()
    async with transport.subscribe(topic) as sub:
        redis_server.restart()
        # Publishes may beat the resubscription; keep probing until one lands.
        async with asyncio.timeout(5):
            while True:
                await transport.publish(topic, "probe")
                try:
                    await sub.get(0.2)
                    break
                except TimeoutError:
                    continue
        assert sub.stats.reconnects == 1
    await transport.close()


# -- credentials and TLS -----------------------------------------------------


@pytest.fixture
def secured_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(base_dir=tmp_path / "redis", password=PASSWORD) as server:
        yield server


async def test_password_never_appears_in_repr_errors_or_logs(
    secured_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    transport = await alkpubsub.connect(secured_server.url)
    topic = unique()
    async with transport.subscribe(topic) as sub:
        assert PASSWORD not in repr(transport) and PASSWORD not in repr(sub)
        secured_server.restart()  # reconnect logging
        await wait_until(lambda: sub.stats.reconnects > 0, 5, "reconnected")
    await transport.close()
    wrong = secured_server.url.replace(PASSWORD, "wrong-" + PASSWORD[::-1])
    with pytest.raises(ConfigError) as refused:
        await alkpubsub.connect(wrong)
    assert "credentials" in str(refused.value)
    missing = secured_server.url.replace(f":{PASSWORD}@", "")
    with pytest.raises(ConfigError) as unauthenticated:
        await alkpubsub.connect(missing)
    for text in (str(refused.value), str(unauthenticated.value), caplog.text):
        assert PASSWORD not in text and PASSWORD[::-1] not in text
    assert "reconnect" in caplog.text  # the reconnect was logged, without the secret


async def test_credentials_from_settings(secured_server: RedisServer) -> None:
    url = f"redis://{HOST}:{secured_server.port}/0"
    settings = Settings.load(url=url, password=PASSWORD)
    transport = await alkpubsub.connect(settings)
    topic = unique()
    async with transport.subscribe(topic) as sub:
        sent = await transport.publish(topic, "authenticated")
        assert (await sub.get(5)).id == sent.id
    assert PASSWORD not in repr(settings)
    await transport.close()


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    paths = {name: folder / f"{name}.pem" for name in ("ca", "ca-key", "cert", "key")}
    ext = folder / "san.ext"
    ext.write_text(f"subjectAltName=IP:{HOST}\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", str(paths["ca-key"]), "-out", str(paths["ca"]))  # fmt: skip
    csr = folder / "server.csr"
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={HOST}",
        "-keyout", str(paths["key"]), "-out", str(csr))  # fmt: skip
    ca, ca_key = str(paths["ca"]), str(paths["ca-key"])
    run("x509", "-req", "-in", str(csr), "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-days", "1", "-extfile", str(ext), "-out", str(paths["cert"]))  # fmt: skip
    return paths


async def test_rediss_connects_with_tls_files_from_settings(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    tls_port = free_port()
    tls_args = [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(certs["cert"]),
        "--tls-key-file", str(certs["key"]),
        "--tls-ca-cert-file", str(certs["ca"]),
        "--tls-auth-clients", "no",
    ]  # fmt: skip
    with RedisServer(base_dir=tmp_path / "redis", extra_args=tls_args):
        url = f"rediss://{HOST}:{tls_port}/0"
        transport = await alkpubsub.connect(Settings.load(url=url, tls_ca=certs["ca"]))
        topic = unique()
        async with transport.subscribe(topic) as sub:
            sent = await transport.publish(topic, "over tls")
            assert (await sub.get(5)).id == sent.id
        await transport.close()
        # Without the CA the server's certificate is not trusted: refused, not ignored.
        with pytest.raises(ConnectionLost):
            await alkpubsub.connect(url)


# -- configuration -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://localhost:6379/0?colour=red", "unknown option 'colour'"),
        ("redis://localhost:6379/0?prefix=has%20space", "prefix"),
        ("redis://localhost:6379/0?reconnect_timeout=-1", "reconnect_timeout"),
        ("redis://localhost:6379/zero", "database 'zero'"),
    ],
)
async def test_bad_configuration_is_refused(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        await alkpubsub.connect(url)


async def test_unreachable_server_is_reported_without_hanging() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(ConnectionLost, match=f"{HOST}:{port}"):
        await alkpubsub.connect(f"redis://{HOST}:{port}/0?connect_timeout=1")


# -- concurrent subscribes and closes ------------------------------------------


async def start_all(subs: list[Subscription], within: float = 10.0) -> None:
    """Enter every subscription at once, failing (not hanging) past ``within``."""
    async with asyncio.timeout(within):
        await asyncio.gather(*(sub.start() for sub in subs))


async def each_gets(subs: list[Subscription], sent: Event) -> None:
    for sub in subs:
        got = await sub.get(5)
        assert got.id == sent.id, f"{sub!r} got {got!r}"


def concrete(pattern: str) -> str:
    """A topic ``pattern`` matches."""
    return ":".join("w" if s == "*" else "w:v" if s == ">" else s for s in pattern.split(":"))


@pytest.mark.parametrize(
    "patterns",
    [
        ["{b}:>"] * 8,
        ["{b}:x"] * 8,
        [f"{{b}}:x{i}" for i in range(8)],
        [f"{{b}}:x{i}:>" for i in range(8)],
        ["{b}:x", "{b}:*", "{b}:>", "{b}:x", "*:x", ">", "{b}:*", "{b}:x:>"],
    ],
    ids=["same-wildcard", "same-exact", "distinct-exact", "distinct-wildcard", "mixed"],
)
async def test_concurrent_subscribes_each_return_live(
    transport: alkpubsub.Transport, patterns: list[str]
) -> None:
    base = unique()
    subs = [transport.subscribe(p.format(b=base)) for p in patterns]
    await start_all(subs)
    # Published after every subscription entered: each must get what it matches.
    topics = sorted({concrete(sub.pattern.text) for sub in subs} | {f"{base}:x"})
    sent = [await transport.publish(topic, topic) for topic in topics]
    for sub in subs:
        expected = [e.id for e in sent if sub.pattern.matches(e.topic)]
        got = [(await sub.get(5)).id for _ in expected]
        assert got == expected, f"{sub!r}"
    with pytest.raises(TimeoutError):
        await subs[-1].get(0.2)
    for sub in subs:
        await sub.close()


async def test_subscribes_and_closes_interleaved_keep_every_open_one_live(
    transport: alkpubsub.Transport,
) -> None:
    base = unique()
    topic = f"{base}:x"
    # A lone subscription closing while another enters on the same channel:
    # the UNSUBSCRIBE and the new SUBSCRIBE cross, and the new one must not be
    # released by the old confirmation (it would miss what follows).
    for round_ in range(20):
        old = transport.subscribe(topic if round_ % 2 else f"{base}:*")
        await old.start()
        new = [transport.subscribe(p) for p in (topic, f"{base}:*", f"{base}:>")]
        async with asyncio.timeout(10):
            await asyncio.gather(old.close(), *(s.start() for s in new))
        sent = await transport.publish(topic, round_)
        await each_gets(new, sent)
        for sub in new:
            await sub.close()


async def test_closing_a_subscription_while_it_enters_ends_it(
    redis_server: RedisServer,
) -> None:
    transport = await alkpubsub.connect(redis_server.url)
    redis_server.stop()  # nothing confirms: entering waits
    sub = transport.subscribe(unique())
    entering = asyncio.ensure_future(sub.start())
    await asyncio.sleep(0.1)
    await sub.close()
    with pytest.raises((Closed, ConnectionLost)):
        async with asyncio.timeout(5):
            await entering
    redis_server.start()
    await transport.close()


# -- one copy of each message on the connection --------------------------------


async def test_covered_subscriptions_are_not_held_twice_on_the_server(
    redis_server: RedisServer,
) -> None:
    transport = await alkpubsub.connect(f"{redis_server.url}?prefix=app:")
    base = unique()
    async with transport.subscribe(f"{base}:x") as exact:
        assert numsub(redis_server, f"app:{base}:x") == 1
        async with (
            transport.subscribe(f"{base}:*") as wild,
            transport.subscribe(f"{base}:y:>") as deeper,
        ):
            # "base:*" covers the channel and the deeper glob: a message would
            # otherwise reach the connection two or three times (and cost
            # Redis's output buffer that much), so only the glob is held.
            assert numpat(redis_server) == 1
            assert numsub(redis_server, f"app:{base}:x") == 0
            sent = await transport.publish(f"{base}:x", "once")
            deep = await transport.publish(f"{base}:y:z", "deep")
            assert [e.id for e in (await exact.get(5), await wild.get(5))] == [sent.id] * 2
            assert (await deeper.get(5)).id == deep.id
            for sub in (exact, wild, deeper):
                with pytest.raises(TimeoutError):
                    await sub.get(0.3)
        await wait_until(lambda: numpat(redis_server) == 0, 5, "glob released")
        assert numsub(redis_server, f"app:{base}:x") == 1  # the exact channel is back
        sent = await transport.publish(f"{base}:x", "after")
        assert (await exact.get(5)).id == sent.id
    await transport.close()


async def test_no_event_lost_or_doubled_while_covering_globs_come_and_go(
    redis_server_session: RedisServer, transport: alkpubsub.Transport
) -> None:
    assert isinstance(transport, RedisTransport)
    base = unique()
    topic = f"{base}:x"
    url = f"{redis_server_session.url}?prefix={transport.options.prefix}"
    publisher = await alkpubsub.connect(url)
    async with transport.subscribe(topic) as exact:
        done = asyncio.Event()

        async def churn() -> None:
            # The server-side set switches between the channel and a glob
            # while events flow; each switch subscribes before it unsubscribes.
            while not done.is_set():
                async with transport.subscribe(f"{base}:*"), transport.subscribe(">"):
                    await asyncio.sleep(0.005)

        churner = asyncio.create_task(churn())
        sent = [await publisher.publish(topic, i) for i in range(300)]
        done.set()
        await churner
        got = [await exact.get(5) for _ in sent]
        assert [e.payload for e in got] == list(range(300))
        with pytest.raises(TimeoutError):
            await exact.get(0.3)
    await publisher.close()


# -- large messages and a slow application -------------------------------------

BIG = 990_000  # characters of payload: just under the 1,000,000-byte publish limit


async def test_burst_of_large_messages_to_a_slow_app_keeps_the_connection(
    redis_server: RedisServer,
) -> None:
    # 64 x 1 MB, as fast as a publisher awaiting each can go, on a channel an
    # exact and a wildcard subscription both read, while the application reads
    # neither: Redis cuts a pub/sub client at 32 MB of output buffer unless the
    # reader keeps draining into the bounded buffers (dropping the oldest).
    url = f"{redis_server.url}?prefix=big:"
    transport = await alkpubsub.connect(url)
    publisher = await alkpubsub.connect(url)
    base = unique()
    topic = f"{base}:x"
    async with (
        transport.subscribe(topic, buffer=8) as exact,
        transport.subscribe(f"{base}:>", buffer=8) as wild,
    ):
        for _ in range(64):
            await publisher.publish(topic, "x" * BIG)
        small = await publisher.publish(topic, "small")
        for sub in (exact, wild):
            await wait_until(lambda s=sub: s.stats.dropped == 64 + 1 - 8, 30, "burst drained")
            got = [await sub.get(5) for _ in range(8)]  # drop-oldest kept the newest 8
            assert got[-1].id == small.id
            assert sub.stats.reconnects == 0
    assert "output buffer limits" not in redis_server.log_tail(1000)
    await transport.close()
    await publisher.close()


# -- the resubscribe gap after a restart ---------------------------------------


async def test_restart_gap_is_short_counted_and_logged(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="alkpubsub.redis")
    transport = await alkpubsub.connect(redis_server.url)
    topic = unique()
    # A raw client that reconnects on its next command, without backoff: it is
    # publishing again within a few ms of the server coming back. PUBLISH
    # answers how many clients received the message, so 0 is a lost event.
    publisher = aioredis.Redis.from_url(redis_server.url, retry=Retry(NoBackoff(), 0))
    receivers: list[tuple[int, int]] = []  # (payload, clients that got it)
    stop = asyncio.Event()

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            event, body = Event.create(topic, i, origin="test")
            with contextlib.suppress(rex.ConnectionError, rex.TimeoutError, OSError):
                receivers.append((i, await publisher.publish(topic, event.envelope(body))))
            i += 1
            await asyncio.sleep(0.004)  # ~200 publishes/s

    async with transport.subscribe(topic, buffer=100_000) as sub:
        task = asyncio.create_task(publish())
        await wait_until(lambda: len(receivers) > 20, 5, "publishing")
        before = len(receivers)
        # Down for 1 s: a doubling backoff would be between long pauses by then.
        await asyncio.to_thread(redis_server.restart, 1.0)
        await wait_until(lambda: sub.stats.reconnects == 1, 10, "reconnected")
        await wait_until(lambda: len(receivers) > before + 100, 10, "publishing after")
        stop.set()
        await task
        after = receivers[before:]
        lost = [i for i, n in after if n == 0]
        received = set()
        while sub.buffered:
            received.add((await sub.get(1)).payload)
        print(f"restart gap: {len(lost)} of {len(after)} publishes after the restart lost")
        assert all(i in received for i, n in after if n > 0)
        assert len(lost) <= 6, f"lost {lost}"  # 10-20 ms between tries, 4 ms between publishes
        assert sub.stats.reconnects == 1
        assert 0 < sub.stats.offline_ms < 5000
    assert "not live for" in caplog.text  # the gap's duration is logged
    await transport.close()
    await publisher.aclose()


# -- garbage on the wire -----------------------------------------------------


async def test_garbage_on_subscribed_channels_never_stops_delivery(
    redis_server_session: RedisServer, transport: alkpubsub.Transport
) -> None:
    assert isinstance(transport, RedisTransport)
    base = unique()
    topic = f"{base}:x"
    prefix = transport.options.prefix
    async with (
        transport.subscribe(topic) as exact,
        transport.subscribe(f"{base}:*") as wild,
        transport.subscribe(">") as everything,
    ):
        written = await publish_garbage(redis_server_session.url, prefix + topic, topic)
        # Channels no alkpubsub topic can name, under the globs read here.
        client = aioredis.Redis.from_url(redis_server_session.url)
        await client.publish(f"{prefix}{base}:\xff bad".encode("latin-1"), b"x")
        await client.publish(f"{prefix}{base}:".encode(), b"x")
        await client.aclose()
        good = await transport.publish(topic, "still here")
        for sub in (exact, wild, everything):
            adopted = [await sub.get(5) for _ in foreign_bodies()]
            assert {e.origin for e in adopted} == {"foreign"}
            assert {e.topic for e in adopted} == {topic}
            assert (await sub.get(5)).id == good.id
            assert sub.stats.malformed == written


async def test_closing_the_transport_while_subscriptions_enter_leaves_nothing_running(
    redis_server_session: RedisServer,
) -> None:
    transport = await alkpubsub.connect(f"{redis_server_session.url}?prefix={unique('p')}:")
    subs = [transport.subscribe(f"{unique()}:>") for _ in range(4)]
    entering = [asyncio.ensure_future(sub.start()) for sub in subs]
    await asyncio.sleep(0)  # they are opening the pub/sub connection
    await transport.close()
    results = await asyncio.wait_for(asyncio.gather(*entering, return_exceptions=True), 5)
    assert all(r is None or isinstance(r, Closed | ConnectionLost) for r in results), results
    assert all(sub.closed for sub in subs)
    await asyncio.sleep(0.1)
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("alkpubsub")]
    assert left == []
