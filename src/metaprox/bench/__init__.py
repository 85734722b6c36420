"""Benchmarks behind ``metaprox bench NAME``: throughput and memory, measured side by side in one run.

Never timed unit tests: machines are noisy, so results are ratios of strategies measured in the same process,
interleaved, with medians over repeats.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_bench", "BENCHMARKS"]


def _sine(quick: bool, device: str) -> dict[str, Any]:
    from metaprox.bench.sine import bench_sine

    if device != "cpu":
        raise ValueError("bench sine measures the CPU execution paths; drop --device.")
    return bench_sine(quick=quick)


def _omniglot(quick: bool, device: str) -> dict[str, Any]:
    from metaprox.bench.fewshot import bench_omniglot

    return bench_omniglot(quick=quick, device=device)


def _rules(quick: bool, device: str) -> dict[str, Any]:
    from metaprox.bench.rules import bench_rules

    if device != "cpu":
        raise ValueError("bench rules measures the CPU execution paths; drop --device.")
    return bench_rules(quick=quick)


def _miniimagenet(quick: bool, device: str) -> dict[str, Any]:
    from metaprox.bench.miniimagenet import bench_miniimagenet

    if device != "cpu":
        raise ValueError("bench miniimagenet measures CPU time per iteration; drop --device.")
    return bench_miniimagenet(quick=quick)


def _threads(quick: bool, device: str) -> dict[str, Any]:
    from metaprox.bench.threads import bench_threads

    if device != "cpu":
        raise ValueError("bench threads measures CPU thread counts; drop --device.")
    return bench_threads(quick=quick)


BENCHMARKS = {"sine": _sine, "omniglot": _omniglot, "rules": _rules, "miniimagenet": _miniimagenet,
              "threads": _threads}


def run_bench(name: str, quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {sorted(BENCHMARKS)}.")
    return BENCHMARKS[name](quick, device)
