"""Tenants by configuration: a URL or Settings names a tenant's database under
a deployment root, laid out as ``Stores`` lays it out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import alkpubsub
from alkpubsub import ConfigError
from alkpubsub.conformance import collect, nothing_more
from alkpubsub.storage import Stores


async def test_a_url_with_a_tenant_opens_that_tenants_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with Stores(root) as stores:
        with stores.tenant("acme").transaction() as tx:
            sent = tx.publish("orders:created", {"ref": "a-1"})
        with stores.tenant("globex").transaction() as tx:
            tx.publish("orders:created", {"ref": "g-1"})
        for url in (
            f"honker+durable://{root}?tenant=acme",
            stores.url("acme"),
        ):
            transport = await alkpubsub.connect(url)
            async with transport.subscribe("orders:>", start="earliest") as sub:
                [got] = await collect(sub, 1)
                await nothing_more(sub)  # globex's event is in another file
            assert got.id == sent.id
            await transport.close()
    assert sorted(p.name for p in root.glob("*.db")) == ["tenant-acme.db", "tenant-globex.db"]


async def test_the_system_database_and_ephemeral_urls(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with Stores(root) as stores:
        live = await alkpubsub.connect(stores.url("system", durable=False))
        async with live.subscribe("cache:*") as sub:
            with stores.system().transaction() as tx:
                sent = tx.notify("cache:invalidate", {"graph": 1})
            [got] = await collect(sub, 1)
        assert got.id == sent.id
        await live.close()
    assert (root / "system.db").exists()


async def test_a_tenant_from_settings_options(tmp_path: Path) -> None:
    settings = alkpubsub.Settings.load(
        url=f"honker+durable://{tmp_path}", options={"tenant": "acme"}
    )
    transport = await alkpubsub.connect(settings)
    await transport.publish("a:b", 1)
    await transport.close()
    assert (tmp_path / "tenant-acme.db").exists()


@pytest.mark.parametrize("tenant", ["../etc", "a/b", "", ".hidden", "x" * 200, "a..b"])
async def test_an_unsafe_tenant_id_is_refused(tmp_path: Path, tenant: str) -> None:
    with pytest.raises(ConfigError, match="safe file-name segment"):
        await alkpubsub.connect(f"honker+durable://{tmp_path}?tenant={tenant}")
    with pytest.raises(ConfigError, match="safe file-name segment"):
        Stores(tmp_path).url(tenant)
    assert await asyncio.to_thread(lambda: list(tmp_path.iterdir())) == []
