"""Every program in examples/ runs and prints what its docs promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str, timeout: float = 60) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quickstart_routes_by_request_id() -> None:
    out = run_example("quickstart.py").splitlines()
    assert out[:2] == ["req-42 watcher: started 0%", "req-42 watcher: done 100%"]
    assert out[2:] == [
        "all-calls watcher: call:req-42",
        "all-calls watcher: call:req-7",
        "all-calls watcher: call:req-42",
    ]


def test_single_node_demo_loses_nothing_across_a_sigkill() -> None:
    # The demo kills its consumer process with SIGKILL mid-stream and restarts
    # it; every one of its 30 orders must be processed and the rolled-back
    # order must never appear.
    out = run_example("single_node.py", timeout=120)
    assert "killed the consumer with SIGKILL" in out
    assert "caught up: 30 of 30 orders processed, 0 lost" in out
    assert "database: 30 order rows; order 999 present: False" in out


def test_outbox_queue_commits_row_event_and_job_together() -> None:
    out = run_example("outbox_queue.py").splitlines()
    assert out == [
        "refused: UNIQUE on orders(ref)",
        "receipts sent by the worker: o-1, o-2, o-3",
        "analytics saw: o-1, o-2, o-3",
        "database: 3 orders, 3 events, 0 jobs left",
    ]
