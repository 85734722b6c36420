"""Benchmarks behind ``metaprox bench NAME``: throughput and memory, measured side by side in one run.

Never timed unit tests: machines are noisy, so results are ratios of strategies measured in the same process,
interleaved, with medians over repeats.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_bench", "BENCHMARKS"]


def _sine(quick: bool) -> dict[str, Any]:
    from metaprox.bench.sine import bench_sine

    return bench_sine(quick=quick)


def _rules(quick: bool) -> dict[str, Any]:
    from metaprox.bench.rules import bench_rules

    return bench_rules(quick=quick)


BENCHMARKS = {"sine": _sine, "rules": _rules}


def run_bench(name: str, quick: bool = False) -> dict[str, Any]:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {sorted(BENCHMARKS)}.")
    return BENCHMARKS[name](quick)
