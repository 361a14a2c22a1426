"""examples/multi_node.py: two node processes, a relay killed mid-stream, one broker.

Runs the example against this session's throwaway brokers (never the
system's servers) and checks its report: node B got every order once, node A's
local subscriber got every order once, and the broker holds one copy of each.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from brokers import NatsServer, RedisServer

ROOT = Path(__file__).resolve().parent.parent
ORDERS = 500


def run_multi_node(broker: str) -> dict[str, tuple[int, int]]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multi_node.py"), "--broker", broker],
        capture_output=True,
        text=True,
        timeout=120,  # ~6 s when it works; node B gives up after 30 s
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"killed relay A#1 with SIGKILL after {ORDERS // 2} commits" in out
    assert "relay restarts:              1" in out
    assert re.search(r"latency commit on A -> B: +p50 [\d.]+ ms, p99 [\d.]+ ms", out), out

    def pair(label: str) -> tuple[int, int]:
        found = re.search(rf"^{re.escape(label)}: +(\d+) \D+(\d+) ", out, re.MULTILINE)
        assert found, f"no {label!r} line in:\n{out}"
        return int(found[1]), int(found[2])

    return {
        "written": pair("events written on A"),  # (events, order rows)
        "local": pair("received by A's local sub"),  # (unique, duplicates)
        "b": pair("received on B"),  # (unique, duplicates)
        "broker": pair("broker copies"),  # (messages, distinct ids)
    }


@pytest.mark.parametrize("broker", ["nats", "redis"])
def test_multi_node_delivers_each_order_once_across_a_relay_sigkill(
    broker: str, request: pytest.FixtureRequest
) -> None:
    server: NatsServer | RedisServer = request.getfixturevalue(f"{broker}_server_session")
    seen = run_multi_node(server.url)
    assert seen["written"] == (ORDERS, ORDERS)
    assert seen["local"] == (ORDERS, 0)
    # The restarted relay re-sends what the killed one had not acked; the broker
    # drops the re-sent ids (JetStream Nats-Msg-Id, redis+durable dedupe_window).
    assert seen["broker"] == (ORDERS, ORDERS)
    assert seen["b"] == (ORDERS, 0)
