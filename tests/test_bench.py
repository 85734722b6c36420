"""metaprox.bench.rules: the side-by-side timing table (tiny sizes; no timing assertions)."""

from metaprox.bench import run_bench
from metaprox.bench.rules import RULES, bench_rules, make_rule, sine_batch, throughput_rows, time_rules


def test_bench_rules_table():
    out = bench_rules(quick=True, tasks=3, k=4, steps=1, rules=("mmp", "reptile"))
    assert [r["rule"] for r in out["rows"]] == ["mmp", "reptile"]
    assert out["rows"][0]["vs_reference"] == 1.0 and all(r["tasks_per_s"] > 0 for r in out["rows"])
    assert "| reptile |" in out["markdown"] and "B = 3 tasks" in out["markdown"]


def test_time_rules_interleaves_every_rule():
    learners = {r: make_rule(r, steps=1) for r in RULES}
    times = time_rules(learners, sine_batch(2, 3), rounds=2)
    assert {k: len(v) for k, v in times.items()} == {r: 2 for r in RULES}
    rows = throughput_rows(times, learners, 2, reference=None)
    assert all(r["vs_reference"] is None for r in rows)


def test_bench_registry_has_rules():
    import pytest

    with pytest.raises(ValueError, match="available"):
        run_bench("nope")
