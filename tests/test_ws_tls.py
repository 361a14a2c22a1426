"""wss:// through a hub serving TLS with a private CA given in Settings, and the
spoke's token taken from Settings (never from the URL, never in its repr)."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from pathlib import Path

import pytest
import uvicorn
from brokers import HOST, free_port

import alkpubsub
from alkpubsub import Settings
from alkpubsub.conformance import unique
from alkpubsub.hub import Grant, Hub, tokens


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA)."""
    cert, key = folder / "hub.pem", folder / "hub.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=alkpubsub-test-hub", "-addext", f"subjectAltName=IP:{HOST}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


async def test_wss_spoke_with_token_and_ca_from_settings(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    token = secrets.token_urlsafe(24)
    tenant = unique("t")
    hub = Hub("memory://tls-{tenant}", auth=tokens({token: Grant(tenant)}))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            hub,
            host=HOST,
            port=port,
            log_level="warning",
            ws="websockets-sansio",
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110  (uvicorn exposes a flag)
                await asyncio.sleep(0.01)
        url = f"wss://{HOST}:{port}/events"
        # Without the CA the certificate is not trusted: a clear ConnectionLost.
        with pytest.raises(alkpubsub.ConnectionLost):
            await alkpubsub.connect(Settings.load(url=url, token=token))
        spoke = await alkpubsub.connect(Settings.load(url=url, token=token, tls_ca=cert))
        try:
            assert token not in repr(spoke) and token not in str(spoke.name)  # type: ignore[attr-defined]
            async with spoke.subscribe("orders:*") as sub:
                sent = await spoke.publish("orders:created", {"n": 1})
                got = await sub.get(timeout=5)
                assert got.id == sent.id
        finally:
            await spoke.close()
        # A wrong token from Settings is refused, and the message does not carry it.
        wrong = secrets.token_urlsafe(24)
        with pytest.raises(alkpubsub.Unauthorized) as refused:
            await alkpubsub.connect(Settings.load(url=url, token=wrong, tls_ca=cert))
        assert wrong not in str(refused.value)
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await serving
