"""The benchmarks' shared setting — now in the package (:mod:`metaprox.bench.rules`); re-exported here."""

from metaprox.bench.rules import RULES, make_rule, sine_batch

__all__ = ["sine_batch", "make_rule", "RULES"]
