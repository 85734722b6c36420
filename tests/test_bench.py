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


def test_bench_miniimagenet_table_and_flop_count():
    from metaprox.bench.miniimagenet import bench_miniimagenet, network_flops

    shape = {"tasks": 2, "ways": 3, "shots": 2, "channels": 3, "size": 16, "filters": 4, "steps": 2}
    n = shape["ways"] * shape["shots"]
    macs = [16 * 16 * 4 * 27, 8 * 8 * 4 * 36, 4 * 4 * 4 * 36, 2 * 2 * 4 * 36, 4 * 3]  # convs at 16, 8, 4, 2; head
    per_gradient = 2 * n * sum(macs) * 2 + 2 * n * sum(macs[1:])  # forward, weight grads, input grads but the first
    assert network_flops(shape) == per_gradient * shape["tasks"] * shape["steps"]
    out = bench_miniimagenet(quick=True, shapes={"tiny": shape}, variants=("default", "fast"), gemm_size=256,
                             log=lambda m: None)
    assert [r["variant"] for r in out["rows"]] == ["default", "fast"]
    assert all(r["cpu"] > 0 and 0 <= r["sys_share"] <= 1 for r in out["rows"])
    assert out["rows"][0]["cpu_ratio_vs_default"] == 1.0
    assert "| tiny | fast |" in out["markdown"] and "GEMM rate" in out["markdown"]
