"""The results as a table (stdout) and as JSON (bench/results/latest.json)."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .case import SideSummary, Summary

UNITS = {"throughput": "events/s", "latency": "us", "cpu": "cpu_s/s"}


def _rate(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M/s"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k/s"
    return f"{v:.0f}/s"


def _us(seconds: float) -> str:
    us = seconds * 1e6
    if us >= 10_000:
        return f"{us / 1000:.1f} ms"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.1f} us"


def _cpu(fraction: float) -> str:
    return f"{fraction * 1000:.1f} ms/s"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _cells(s: Summary) -> list[list[str]]:
    """Table lines for one summary: [case, ours, baseline, ratio, delta, target]."""
    case = s.case
    label = f"{case.name} (n={s.n:,})"
    target = ""
    if case.target is not None:
        met = s.target_met
        target = case.target.text + ("" if met is None else " ok" if met else " MISSED")

    def fig(side: SideSummary | None, status: str, p99: bool = False) -> str:
        if side is None:
            return "n/a" if status.startswith("not available") else "failed"
        if case.metric == "throughput":
            return _rate(side.value)
        if case.metric == "cpu":
            return _cpu(side.value)
        return _us(side.p99 if p99 and side.p99 is not None else side.value)

    ours = fig(s.ours, s.ours_status)
    raw = fig(s.raw, s.raw_status)
    if case.metric != "latency":
        return [[label, ours, raw, _ratio(s.ratio), "", target]]
    delta50 = delta99 = ""
    if s.ours is not None and s.raw is not None:
        delta50 = f"{(s.ours.value - s.raw.value) * 1e6:+.1f} us"
        if s.ours.p99 is not None and s.raw.p99 is not None:
            delta99 = f"{(s.ours.p99 - s.raw.p99) * 1e6:+.1f} us"
    return [
        [label + " p50", ours, raw, _ratio(s.ratio), delta50, target],
        [" " * len(label) + " p99", fig(s.ours, s.ours_status, True),
         fig(s.raw, s.raw_status, True), _ratio(s.ratio_p99), delta99, ""],
    ]  # fmt: skip


def table(summaries: list[Summary]) -> str:
    """The results as a fixed-width text table, grouped by transport."""
    head = ["case", "ours", "baseline", "ours/base", "delta", "target"]
    groups: dict[str, list[list[str]]] = {}
    notes: list[str] = []
    for s in summaries:
        base = s.case.baseline
        for i, cells in enumerate(_cells(s)):
            if i == 0 and base != "raw":
                cells[2] = f"{cells[2]} ({base})"
            groups.setdefault(s.case.transport, []).append(cells)
        for side, status in (("ours", s.ours_status), (base, s.raw_status)):
            if status != "ok":
                notes.append(f"  {s.case.key} [{side}]: {status}")
        notes.extend(f"  {s.case.key}: {note}" for note in s.notes)
    out: list[str] = []
    for transport, rows in groups.items():
        widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
        fmt_row = "  ".join(
            "{:<%d}" % w if i in (0, 5) else "{:>%d}" % w  # noqa: UP031
            for i, w in enumerate(widths)
        )
        out.append("")
        out.append(f"== {transport} ==")
        out.append(fmt_row.format(*head).rstrip())
        out.extend(fmt_row.format(*cells).rstrip() for cells in rows)
    if notes:
        out.append("")
        out.append("notes:")
        out.extend(notes)
    return "\n".join(out).lstrip("\n")


def _side_json(side: SideSummary | None, status: str, metric: str) -> dict[str, Any]:
    data: dict[str, Any] = {"status": status}
    if side is None:
        return data
    if metric == "latency":
        data["p50_us"] = side.value * 1e6
        data["p99_us"] = (side.p99 or 0.0) * 1e6
        data["value"] = data["p50_us"]
        data["runs_p50_us"] = [r * 1e6 for r in side.runs]
    else:
        data["value"] = side.value
        data["runs"] = list(side.runs)
    return data


def row_json(s: Summary) -> dict[str, Any]:
    """One row of the JSON report."""
    case = s.case
    row: dict[str, Any] = {
        "key": case.key,
        "transport": case.transport,
        "case": case.name,
        "metric": case.metric,
        "unit": UNITS[case.metric],
        "what": case.what,
        "baseline": case.baseline,
        "n": s.n,
        "ours": _side_json(s.ours, s.ours_status, case.metric),
        "raw": _side_json(s.raw, s.raw_status, case.metric),
        "ratio": s.ratio,
        "target": None
        if case.target is None
        else {"kind": case.target.kind, "value": case.target.value, "text": case.target.text},
        "target_met": s.target_met,
        "notes": list(s.notes),
    }
    if case.metric == "latency":
        row["ratio_p99"] = s.ratio_p99
        if s.ours is not None and s.raw is not None:
            row["delta_p50_us"] = (s.ours.value - s.raw.value) * 1e6
            row["delta_p99_us"] = ((s.ours.p99 or 0.0) - (s.raw.p99 or 0.0)) * 1e6
    return row


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": load,
    }


def write_json(path: Path, summaries: list[Summary], args: dict[str, Any]) -> None:
    """Write the report to ``path`` (folders are created)."""
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "args": args,
        "rows": [row_json(s) for s in summaries],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
