"""Cases with a second process publishing to the same bus, file or broker.

A transport's test module opts in by overriding the ``other_process``
fixture with an :class:`~alkpubsub.conformance.processes.OtherProcess`.
"""

from __future__ import annotations

import asyncio

import pytest

from alkpubsub import Capabilities, Transport

from .adversarial import enter_all
from .processes import OtherProcess
from .suite import NOT_APPLICABLE, SuiteFixtures, collect_acking, nothing_more, require, unique

COUNT = 200
"""Events each process publishes."""


class ProcessCases(SuiteFixtures):
    """Two processes at once, demanded of every transport another process can reach."""

    @pytest.fixture
    def other_process(self) -> OtherProcess | None:
        """Override in a transport's test module: a publisher in another process
        reaching what ``factory`` connects to. None: no other process can."""
        return None

    async def test_two_processes_publishing_at_once_each_event_once(
        self, transport: Transport, caps: Capabilities, other_process: OtherProcess | None
    ) -> None:
        if other_process is None and not caps.cross_process:
            pytest.skip(f"{NOT_APPLICABLE}no other process can reach this transport")
        require(caps, "cross_process")
        if other_process is None:
            # Declares cross_process but gives no way to prove it: a gap, not a
            # platform limit (fails under CI=true, as any other skip does).
            pytest.skip(
                "the transport declares cross_process but its test module gives no "
                "other_process fixture: return OtherProcess(url) from one"
            )
        topic = f"{unique('p')}:x"
        subs = [transport.subscribe(topic, buffer=4 * COUNT)]
        if caps.wildcards:
            subs.append(transport.subscribe(topic.replace(":x", ":*"), buffer=4 * COUNT))
        if caps.consumer_offsets:
            subs.append(transport.subscribe(topic, consumer=unique("c"), buffer=4 * COUNT))
        await enter_all(subs)
        try:
            child = await other_process.start(topic, COUNT)
            child.go()
            ours = [(await transport.publish(topic, {"n": i})).id for i in range(COUNT)]
            theirs = await child.ids()
            for sub in subs:
                got = await collect_acking(sub, 2 * COUNT)
                ids = [e.id for e in got]
                assert len(set(ids)) == len(ids), f"{sub!r}: an event arrived twice"
                assert set(ids) == set(ours) | set(theirs), f"{sub!r}: events lost"
                if caps.ordered:
                    assert [i for i in ids if i in set(ours)] == ours, f"{sub!r}: ours reordered"
                    assert [i for i in ids if i in set(theirs)] == theirs, f"{sub!r}: reordered"
                await nothing_more(sub)
        finally:
            await asyncio.gather(*(sub.close() for sub in subs))
