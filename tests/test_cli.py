"""The `alkpubsub` command: pub, sub, replay, stats, doctor, bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("alkpubsub"))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"honker+durable://{tmp_path / 'cli.db'}"


def test_pub_then_durable_sub_then_stats_then_replay(url: str) -> None:
    ids = [
        run("pub", f"orders:{i}", json.dumps({"i": i}), "--url", url).stdout.strip()
        for i in range(3)
    ]
    assert all(len(i) == 36 for i in ids)

    sub = run(
        "sub",
        "orders:*",
        "--consumer",
        "billing",
        "--start",
        "earliest",
        "--count",
        "2",
        "--url",
        url,
    )
    assert sub.returncode == 0, sub.stderr
    got = [json.loads(line) for line in sub.stdout.splitlines()]
    assert [e["id"] for e in got] == ids[:2]
    assert [e["payload"] for e in got] == [{"i": 0}, {"i": 1}]

    stats = run("stats", "--url", url)
    assert "consumer=billing  offset=2  lag=1" in stats.stdout

    # ALKPUBSUB_URL works as well as --url; replay prints everything stored.
    replay = run("replay", "--idle", "0.3", env={"ALKPUBSUB_URL": url})
    assert [json.loads(line)["id"] for line in replay.stdout.splitlines()] == ids


def test_pub_with_bad_input_says_what_to_fix(url: str) -> None:
    bad_json = run("pub", "orders:1", "{not json", "--url", url)
    assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stdout
    bad_topic = run("pub", "orders::1", "{}", "--url", url)
    assert bad_topic.returncode == 2
    assert "InvalidTopic" in bad_topic.stderr and "'orders::1'" in bad_topic.stderr


def test_doctor_reports_success_on_a_working_url(url: str) -> None:
    done = run("doctor", "--url", url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "publish->receive: ok" in done.stdout and "all good" in done.stdout


def test_doctor_fails_clearly_and_never_prints_the_password() -> None:
    # Port 1 on loopback: nothing listens, so the connection is refused.
    done = run("doctor", "--url", "redis://:hunter2-secret@127.0.0.1:1/0")
    assert done.returncode == 1
    assert "FAILED" in done.stdout
    assert "hunter2-secret" not in done.stdout + done.stderr
    assert "redis://:***@127.0.0.1:1/0" in done.stdout


def test_bench_prints_rate_and_latency() -> None:
    done = run("bench", "--url", "memory://", "--count", "2000")
    assert done.returncode == 0, done.stderr
    assert "events/s publish->receive" in done.stdout and "p99" in done.stdout


def test_doctor_never_prints_a_password_with_unencoded_url_characters() -> None:
    done = run("doctor", "--url", "redis://:hunter2/secret#x@127.0.0.1:1/0")
    assert done.returncode != 0
    for part in ("hunter2", "secret#x"):
        assert part not in done.stdout + done.stderr
    assert "percent-encode" in done.stdout + done.stderr
