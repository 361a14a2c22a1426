"""``python -m bench``: run the benchmark rows, print the table, write the JSON."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from .case import Case, Summary
from .cases import TRANSPORTS, load
from .env import ROOT, Env
from .progress import Progress
from .report import table, write_json
from .runner import run_case, steps_of

DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="alkpubsub throughput and latency next to the raw clients (ratio = ours/raw).",
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated transports to run (default: all of {','.join(TRANSPORTS)})",
    )
    parser.add_argument("--case", default="", help="run only rows whose name contains this text")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, not minutes)")
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed runs per side (default 3, --quick 1)"
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write results ({DEFAULT_JSON})"
    )
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    args = parser.parse_args(argv)
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = sorted(set(only) - set(TRANSPORTS))
    if unknown:
        parser.error(f"unknown transport(s) {', '.join(unknown)}; choose from {TRANSPORTS}")
    args.transports = only or list(TRANSPORTS)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def select(env: Env, transports: list[str], name_filter: str) -> list[Case]:
    """The cases to run, in registry order."""
    cases: list[Case] = []
    for transport in transports:
        cases.extend(c for c in load(transport, env) if name_filter in c.name)
    return cases


async def run_all(cases: list[Case], args: argparse.Namespace) -> list[Summary]:
    total = sum(steps_of(c, args.repeat) for c in cases)
    progress = Progress(total, enabled=not args.no_progress)
    summaries: list[Summary] = []
    try:
        for case in cases:
            started = time.monotonic()
            summary = await run_case(case, quick=args.quick, repeat=args.repeat, progress=progress)
            summaries.append(summary)
            progress.case_done(f"{case.key}: done in {time.monotonic() - started:.1f} s")
    finally:
        progress.finish()
    return summaries


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = Env()
    try:
        cases = select(env, args.transports, args.case)
        if args.list:
            for case in cases:
                print(f"{case.key}\t{case.metric}\t{case.what}")
            return 0
        summaries = asyncio.run(run_all(cases, args))
    finally:
        env.close()
    print(table(summaries))
    write_json(
        args.json,
        summaries,
        {
            "only": args.transports,
            "case": args.case,
            "quick": args.quick,
            "repeat": args.repeat,
        },
    )
    print(f"\nwritten: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
