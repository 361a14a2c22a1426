"""Redis pub/sub transport: what the conformance suite does not cover.

Server-side subscription bookkeeping, channel prefixes, outages, malformed
messages, credentials and TLS, against real ``redis-server`` processes.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from brokers import HOST, RedisServer, free_port

import alkpubsub
from alkpubsub import ConfigError, ConnectionLost, Settings
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
        redis_server_session.call("PUBLISH", channel, "not an envelope")
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
