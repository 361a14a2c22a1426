"""BaseTransport.forward_many: the batch forwarding every transport has."""

from __future__ import annotations

from pathlib import Path

import alkpubsub
from alkpubsub import PayloadError
from alkpubsub.conformance import collect, unique


async def test_the_sources_offset_never_leaks_to_a_target_without_offsets(tmp_path: Path) -> None:
    source = await alkpubsub.connect(f"honker+durable://{tmp_path / 'e.db'}")
    sent = await source.publish_many([("a:b", i) for i in range(3)])
    assert all(e.offset is not None for e in sent)
    target = await alkpubsub.connect(f"memory://{unique()}")
    async with target.subscribe("a:b") as sub:
        for decoded in (False, True):
            done = await target.forward_many(sent, decoded=decoded)
            assert [(f.event.id, f.event.offset, f.refused) for f in done] == [
                (e.id, None, None) for e in sent
            ]
            assert [e.offset for e in await collect(sub, 3)] == [None] * 3
    await target.close()
    await source.close()


async def test_decoded_events_are_still_sized_and_encoded_for_the_target() -> None:
    target = await alkpubsub.connect(f"memory://{unique()}")
    good = await target.publish("a:b", "fits")
    too_big = good.model_copy(update={"payload": "x" * 1_000_001})
    not_json = good.model_copy(update={"payload": {"x": object()}})
    async with target.subscribe("a:b") as sub:
        done = await target.forward_many([too_big, good, not_json], decoded=True)
        assert isinstance(done[0].refused, PayloadError)
        assert done[1].refused is None and done[1].event.id == good.id
        assert isinstance(done[2].refused, PayloadError)
        [got] = await collect(sub, 1)
        assert got.payload == "fits"
    await target.close()
