"""A benchmark row (:class:`Case`), its target, and the summary of its runs.

A case pairs two measures of the same work: ``ours`` (through alkpubsub) and
``raw`` (the client library used directly, or another configuration of ours,
named by ``baseline``). The ratio is always ``ours / raw``: above 1 is better
for throughput, below 1 is better for latency and CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .measure import CpuLoad, Latency, Measure, Sample, Throughput, median

Metric = Literal["throughput", "latency", "cpu"]


@dataclass(frozen=True, slots=True)
class Target:
    """A figure the project promises for a row, checked on every run.

    ``kind``: ``ratio_min`` (ours/raw >= value), ``ratio_max`` (ours/raw <= value,
    on p50 for latency) or ``p50_max_us`` (our p50 <= value microseconds).
    """

    kind: Literal["ratio_min", "ratio_max", "p50_max_us"]
    value: float

    @property
    def text(self) -> str:
        """How the target reads in the table."""
        if self.kind == "ratio_min":
            return f">= {self.value:g}x"
        if self.kind == "ratio_max":
            return f"<= {self.value:g}x"
        return f"p50 <= {self.value:g} us"

    def met(self, summary: Summary) -> bool | None:
        """Whether ``summary`` meets the target; None when it cannot be judged."""
        if self.kind == "p50_max_us":
            return None if summary.ours is None else summary.ours.value * 1e6 <= self.value
        ratio = summary.ratio
        if ratio is None:
            return None
        return ratio >= self.value if self.kind == "ratio_min" else ratio <= self.value


@dataclass(frozen=True)
class Case:
    """One row: the same work measured through alkpubsub and through the baseline."""

    transport: str
    name: str
    metric: Metric
    what: str
    """One sentence: what is timed, with which sizes."""
    ours: Measure
    raw: Measure
    n: int
    """Events (or samples, or seconds for CPU rows) per run."""
    quick_n: int
    """``n`` under ``--quick``."""
    baseline: str = "raw"
    ours_needs: tuple[str, ...] = ()
    """Modules that must import for ``ours`` (e.g. the transport module)."""
    raw_needs: tuple[str, ...] = ()
    target: Target | None = None
    repeat: int | None = None
    """Repetitions, when this row needs a fixed number (else the run's setting)."""
    warmup: bool = True
    timeout: float = 300.0
    """Seconds one run may take before it counts as failed."""

    @property
    def key(self) -> str:
        """``transport/name``, as ``--only`` and the JSON know it."""
        return f"{self.transport}/{self.name}"


@dataclass(frozen=True, slots=True)
class SideSummary:
    """The median over runs of one side. ``value`` is events/s (throughput),
    p50 seconds (latency) or CPU fraction (cpu); ``p99`` for latency only."""

    value: float
    p99: float | None
    runs: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[Sample]) -> SideSummary:
        """Summarise repeated samples of one side (all of one kind)."""
        if all(isinstance(s, Latency) for s in samples):
            lat = [s for s in samples if isinstance(s, Latency)]
            p50s = [s.percentile(50) for s in lat]
            return cls(median(p50s), median([s.percentile(99) for s in lat]), tuple(p50s))
        if all(isinstance(s, CpuLoad) for s in samples):
            fractions = [s.fraction for s in samples if isinstance(s, CpuLoad)]
            return cls(median(fractions), None, tuple(fractions))
        rates = [s.rate for s in samples if isinstance(s, Throughput)]
        if len(rates) != len(samples):
            raise TypeError(f"mixed sample kinds: {samples!r}")
        return cls(median(rates), None, tuple(rates))


@dataclass
class Summary:
    """The outcome of one case: each side's summary or why it has none."""

    case: Case
    n: int
    ours: SideSummary | None = None
    raw: SideSummary | None = None
    ours_status: str = "ok"
    raw_status: str = "ok"
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """ours / raw on the main figure (p50 for latency)."""
        if self.ours is None or self.raw is None or self.raw.value == 0:
            return None
        return self.ours.value / self.raw.value

    @property
    def ratio_p99(self) -> float | None:
        """ours / raw on p99 (latency rows)."""
        if self.ours is None or self.raw is None or not self.ours.p99 or not self.raw.p99:
            return None
        return self.ours.p99 / self.raw.p99

    @property
    def target_met(self) -> bool | None:
        """Whether the row's target is met; None without a target or figures."""
        return None if self.case.target is None else self.case.target.met(self)
