"""Running a case: warm-up, then alternating runs of both sides, then medians.

The two sides run one after the other, never at the same time, and swap
order every repetition, so slow drift on a busy machine (other work, CPU
frequency, the page cache) does not favour either side.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
from typing import Literal

from .case import Case, SideSummary, Summary
from .measure import Measure, Sample, Unavailable
from .progress import Progress

Side = Literal["ours", "raw"]


def missing(modules: tuple[str, ...]) -> str | None:
    """Why one of ``modules`` cannot be imported, or None when all import."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            return f"not available: {name} failed to import ({type(exc).__name__}: {exc})"
    return None


def runs_of(case: Case, repeat: int) -> int:
    """How many timed runs a side of ``case`` gets."""
    return case.repeat if case.repeat is not None else repeat


def warmup_n(n: int) -> int:
    """A warm-up is a tenth of a run (imports, caches, JIT-free but lazy paths)."""
    return max(min(n, 50), n // 10)


async def run_case(case: Case, *, quick: bool, repeat: int, progress: Progress) -> Summary:
    """Measure both sides of ``case`` and summarise them."""
    n = case.quick_n if quick else case.n
    summary = Summary(case, n)
    measures: dict[Side, Measure] = {"ours": case.ours, "raw": case.raw}
    status: dict[Side, str] = {"ours": "ok", "raw": "ok"}
    samples: dict[Side, list[Sample]] = {"ours": [], "raw": []}
    for side in ("ours", "raw"):
        reason = missing(case.ours_needs if side == "ours" else case.raw_needs)
        if reason is not None:
            status[side] = reason

    async def run(side: Side, size: int, label: str, *, keep: bool) -> None:
        if status[side] != "ok":
            progress.step(label)
            return
        gc.collect()
        progress.show(f"{case.key} {label}")
        try:
            async with asyncio.timeout(case.timeout):
                sample = await measures[side](size)
        except Unavailable as exc:
            status[side] = f"not available: {exc}"
        except TimeoutError:
            status[side] = f"failed: no result within {case.timeout:g} s"
        except Exception as exc:
            status[side] = f"failed: {type(exc).__name__}: {exc}"
        else:
            if keep:
                samples[side].append(sample)
        progress.step(f"{case.key} {label}")

    order: list[Side] = ["ours", "raw"]
    if case.warmup:
        for side in order:
            await run(side, warmup_n(n), f"{side} warm-up", keep=False)
    for i in range(runs_of(case, repeat)):
        for side in order if i % 2 == 0 else order[::-1]:
            await run(side, n, f"run {i + 1} {side}", keep=True)
    summary.ours_status, summary.raw_status = status["ours"], status["raw"]
    if samples["ours"] and status["ours"] == "ok":
        summary.ours = SideSummary.of(samples["ours"])
    if samples["raw"] and status["raw"] == "ok":
        summary.raw = SideSummary.of(samples["raw"])
    return summary


def steps_of(case: Case, repeat: int) -> int:
    """Progress steps ``case`` takes."""
    return 2 * (runs_of(case, repeat) + (1 if case.warmup else 0))
