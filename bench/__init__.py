"""Benchmarks: alkpubsub next to the raw client doing the same work, in the same run.

Run ``make bench`` or ``python -m bench [--only inprocess,honker] [--quick] [--json PATH]``.
Each transport contributes rows through a module in ``bench/cases/``; a row measures our
transport and its raw baseline alternately (warm-up first, median of a few repetitions)
and reports the ratio ours/raw. See docs/benchmarks.md.
"""
