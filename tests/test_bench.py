"""The benchmark harness runs end to end and writes its JSON report.

No speed is asserted here (speed is what the benchmarks report, on a machine
whose load a unit test cannot control); only that the rows exist, carry
positive figures on both sides and a ratio, and that the table is printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `bench` is a top-level folder, not an installed package

from bench.case import Case  # noqa: E402
from bench.measure import BenchError, Handoff, Throughput  # noqa: E402
from bench.progress import Progress  # noqa: E402
from bench.report import row_json, table  # noqa: E402
from bench.runner import run_case  # noqa: E402


def run_bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--json", str(out), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return report, proc.stdout


def test_quick_inprocess_run_reports_both_rows_with_positive_figures(tmp_path: Path) -> None:
    report, table = run_bench(tmp_path, "--quick", "--only", "inprocess")

    rows = {row["key"]: row for row in report["rows"]}
    # The two in-process rows: throughput and 1-in-flight latency, nothing else.
    assert set(rows) == {"inprocess/publish->receive", "inprocess/1-in-flight latency"}

    throughput = rows["inprocess/publish->receive"]
    assert throughput["unit"] == "events/s"
    assert throughput["n"] == 5_000  # --quick size
    for side in ("ours", "raw"):
        assert throughput[side]["status"] == "ok"
        assert throughput[side]["value"] > 0
    assert throughput["ratio"] == throughput["ours"]["value"] / throughput["raw"]["value"]
    assert throughput["target"]["text"] == ">= 0.8x"
    assert isinstance(throughput["target_met"], bool)

    latency = rows["inprocess/1-in-flight latency"]
    assert latency["unit"] == "us"
    for side in ("ours", "raw"):
        assert latency[side]["status"] == "ok"
        assert 0 < latency[side]["p50_us"] <= latency[side]["p99_us"]
    assert latency["ratio"] > 0 and latency["ratio_p99"] > 0
    expected_delta = latency["ours"]["p50_us"] - latency["raw"]["p50_us"]
    assert abs(latency["delta_p50_us"] - expected_delta) < 1e-6

    assert report["args"]["quick"] is True
    assert report["machine"]["cpus"] >= 1
    # The printed table names the transport and both rows with their ratio.
    assert "== inprocess ==" in table
    assert "publish->receive" in table and "1-in-flight latency" in table
    assert f"{throughput['ratio']:.2f}x" in table


def test_list_names_every_transport_row_without_running() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    keys = {line.split("\t")[0] for line in proc.stdout.splitlines()}
    # Every transport contributes rows through its module in bench/cases/.
    assert {key.split("/")[0] for key in keys} == {
        "inprocess",
        "honker",
        "redis",
        "nats",
        "multinode",
        "hub",
    }
    assert "honker/group commit, 8 publishers (durable)" in keys


def test_quick_multinode_run_reports_every_row_against_its_baseline(tmp_path: Path) -> None:
    # Starts this run's own nats-server and redis-server (bench/env.py); a row
    # whose broker binary is missing would say "not available" and fail here.
    report, table = run_bench(tmp_path, "--quick", "--only", "multinode")

    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == {
        "multinode/composite local latency vs memory",
        "multinode/composite local latency vs honker+durable",
        "multinode/composite publish_many(500)->receive",
        "multinode/relay drain to nats+durable",
        "multinode/commit->relay->nats consumer latency",
        "multinode/relay drain to redis+durable",
        "multinode/commit->relay->redis consumer latency",
    }
    baselines = {key: row["baseline"] for key, row in rows.items()}
    assert baselines["multinode/composite local latency vs memory"] == "memory://"
    assert baselines["multinode/relay drain to nats+durable"] == "raw nats"
    assert baselines["multinode/commit->relay->redis consumer latency"] == "direct redis"
    for key, row in rows.items():
        for side in ("ours", "raw"):
            assert row[side]["status"] == "ok", (key, side, row[side]["status"])
            assert row[side]["value"] > 0
        assert row["ratio"] == row["ours"]["value"] / row["raw"]["value"]
        if row["metric"] == "latency":
            assert 0 < row["ours"]["p50_us"] <= row["ours"]["p99_us"]
            assert row["ratio_p99"] > 0
    assert rows["multinode/relay drain to nats+durable"]["n"] == 500  # --quick size
    assert "== multinode ==" in table and "relay drain to redis+durable" in table


def test_quick_hub_run_reports_every_row_next_to_the_raw_echo(tmp_path: Path) -> None:
    report, table = run_bench(tmp_path, "--quick", "--only", "hub")

    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == {
        "hub/spoke publish->hub subscriber, 64 in flight",
        "hub/spoke publish->hub subscriber, 1-in-flight latency",
        "hub/hub publish->spoke subscriber, 64 in flight",
        "hub/hub publish->spoke subscriber, 1-in-flight latency",
    }
    for key, row in rows.items():
        assert row["baseline"] == "raw ws echo"
        for side in ("ours", "raw"):
            assert row[side]["status"] == "ok", (key, side, row[side]["status"])
            assert row[side]["value"] > 0
        if row["metric"] == "throughput":
            assert row["target"]["text"] == ">= 0.5x"
    assert "== hub ==" in table


async def test_missing_transport_module_is_reported_not_skipped() -> None:
    async def fine(n: int) -> Throughput:
        return Throughput(n, 0.5)

    case = Case(
        transport="fake",
        name="publish->receive",
        metric="throughput",
        what="a transport whose module does not exist",
        ours=fine,
        raw=fine,
        n=10,
        quick_n=10,
        ours_needs=("alkpubsub.transports.no_such_transport",),
    )
    summary = await run_case(case, quick=True, repeat=1, progress=Progress(1, enabled=False))

    assert summary.ours is None
    assert summary.ours_status.startswith(
        "not available: alkpubsub.transports.no_such_transport failed to import"
    )
    # The baseline still runs: 10 events in 0.5 s is 20 events/s.
    assert summary.raw is not None and summary.raw.value == 20.0
    assert summary.ratio is None
    row = row_json(summary)
    assert row["ours"]["status"] == summary.ours_status and row["raw"]["value"] == 20.0
    text = table([summary])
    assert "n/a" in text and "fake/publish->receive [ours]: not available" in text


async def test_measure_that_loses_events_is_reported_failed() -> None:
    async def lossy(n: int) -> Throughput:
        raise BenchError("subscriber dropped 3 events")

    async def fine(n: int) -> Throughput:
        return Throughput(n, 1.0)

    case = Case("fake", "lossy", "throughput", "loses events", lossy, fine, 10, 10)
    summary = await run_case(case, quick=True, repeat=2, progress=Progress(1, enabled=False))

    assert summary.ours is None
    assert summary.ours_status == "failed: BenchError: subscriber dropped 3 events"
    # Two timed runs of 10 events in 1 s each: median 10 events/s.
    assert summary.raw is not None and summary.raw.runs == (10.0, 10.0)


async def test_lost_event_fails_a_latency_run_instead_of_hanging() -> None:
    handoff = Handoff()
    published: list[int] = []

    async def publish_into_the_void(i: int) -> None:
        published.append(i)  # nobody ever calls handoff.deliver

    with pytest.raises(BenchError, match="seq=0 not delivered within 1 s"):
        await handoff.round_trips(5, publish_into_the_void, lost_after=1.0)
    assert published == [0]  # the run stopped at the first lost event
