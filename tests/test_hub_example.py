"""examples/hub_spoke.py: a hub with two tenants, an acme and a globex spoke
process, a request answered by the hub's in-process handler, and a hub restart
that the acme spoke's durable consumer rides through without losing a tick."""

from __future__ import annotations

import time

from test_examples import run_example


def test_hub_spoke_answers_calls_isolates_tenants_and_loses_nothing_across_a_restart() -> None:
    started = time.monotonic()
    out = run_example("hub_spoke.py", timeout=60)
    took = time.monotonic() - started
    lines = out.splitlines()

    # The hub served both tenants, was stopped with SIGTERM and came back.
    assert lines.count(lines[0]) == 2 and lines[0].startswith("hub: serving tenants acme and")
    assert "backend: the hub is back on the same port" in lines
    # Request/reply: the acme spoke's call.requested reached the hub's own
    # handler (on acme's transport), whose call.responded came back to it;
    # once before the restart and once after (the spoke reconnected by itself).
    for call in ("c-1", "c-2"):
        assert f"hub handler: answered call {call} on calls:{call}" in lines
        assert (
            f"acme spoke: call {call} answered by the hub: call.responded status=connected" in lines
        )
    # Ticks committed before, while and after the hub was down: the durable
    # consumer got all of them (redeliveries allowed: at least once).
    assert "backend: committed ticks 11-20 while the hub was down" in lines
    [summary] = [line for line in lines if line.startswith("acme spoke: caught up:")]
    assert summary.startswith("acme spoke: caught up: 30 of 30 ticks, 0 lost, ")
    assert summary.endswith("reconnects=1")
    # globex subscribed to everything it may see: only its own event, none of acme's.
    assert "globex spoke: saw 1 event(s): hello:globex" in lines
    # One file per tenant in the hub's data folder.
    assert lines[-1] == "files: tenant-acme.db, tenant-globex.db"
    assert took < 20, f"the example took {took:.1f} s"
