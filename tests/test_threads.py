"""Intra-op threads: the process count by model size, overridable by the config and --threads, recorded in
config.json; each solve's count by work size, restored after the block; the FLOP count of a gradient (closed
form)."""

from __future__ import annotations

import json

import pytest
import torch

import metaprox
from metaprox import threads
from metaprox.bench import BENCHMARKS
from metaprox.cli import main
from metaprox.config import ConfigError, apply_overrides, resolve
from metaprox.execution import FunctionalModel
from metaprox.losses import resolve_loss
from metaprox.threads import SMALL_PARAMS, apply_threads, auto_threads, process_threads, usable_cores
from test_finite_table import write_config, write_table


def cfg(*over: str) -> dict:
    return resolve(apply_overrides({}, list(over)))


def test_small_models_get_one_thread_large_ones_every_core():
    assert auto_threads(cfg()) == 1  # the sine MLP 1-40-40-1
    assert auto_threads(cfg('model.kind="linear"')) == 1
    wide = cfg("model.sizes=[1, 400, 400, 1]")
    assert (1 + 1) * 400 + 401 * 400 + 401 > SMALL_PARAMS and auto_threads(wide) == usable_cores()
    assert auto_threads(cfg('model.kind="conv4"', 'task.family="fewshot"')) == usable_cores()


def test_config_and_flag_override_and_the_count_is_applied():
    assert process_threads(cfg("threads=3")) == 3
    assert process_threads(cfg("threads=3"), requested=2) == 2
    with pytest.raises(ValueError, match="--threads = 0"):
        process_threads(cfg(), requested=0)
    with pytest.raises(ConfigError, match="threads = -1"):
        cfg("threads=-1")
    before = torch.get_num_threads()
    try:
        assert apply_threads(cfg(), requested=2)["threads"] == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert "threads" in BENCHMARKS


def test_bench_threads_table():
    from metaprox.bench.threads_finite import bench_finite_threads

    before = torch.get_num_threads()
    # tiny and one thread only (several threads are slow on a loaded CI machine): the table's shape, no timings
    out = bench_finite_threads(quick=True, tasks=2, rounds=1, counts=[1])
    assert torch.get_num_threads() == before
    assert [(r["model"], r["threads"]) for r in out["rows"]] == [("linear", 1), ("mlp", 1)]
    assert all(r["vs_one_thread"] == 1.0 for r in out["rows"] if r["threads"] == 1)
    assert "| linear | 1 |" in out["markdown"]


def test_cli_records_the_thread_count(tmp_path):
    config = write_config(tmp_path / "c.toml", write_table(tmp_path / "t.csv"), **{"outer.steps": "2"})
    before = torch.get_num_threads()
    try:
        assert main(["train", str(config), "--out", str(tmp_path / "run"), "--threads", "2", "--no-eval"]) == 0
    finally:
        torch.set_num_threads(before)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["threads"] == 2


def test_choose_threads_by_work_size():
    per = threads.FLOPS_PER_THREAD
    assert threads.choose_threads(0, 8) == 1
    assert threads.choose_threads(per * 0.5, 8) == 1
    assert threads.choose_threads(per * 3.7, 8) == 3
    assert threads.choose_threads(per * 1e3, 8) == 8  # never above the ceiling
    assert threads.choose_threads(per * 1e3) == torch.get_num_threads()


def test_limited_threads_sets_and_restores():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads.limited_threads(1e3) as n:
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads.limited_threads(lambda: 1e12) as n:
            assert n == 2 and torch.get_num_threads() == 2
        threads.set_auto(False)
        with threads.limited_threads(1e3) as n:
            assert n == 2 and torch.get_num_threads() == 2
    finally:
        threads.set_auto(True)
        torch.set_num_threads(before)


def test_gradient_flops_of_an_mlp_is_the_closed_form():
    fm = FunctionalModel(metaprox.MLP([1, 40, 40, 1]))
    b, n = 7, 10
    x, y = torch.rand(b, n, 1), torch.rand(b, n, 1)
    macs = n * (1 * 40 + 40 * 40 + 40 * 1)
    # forward 2·macs, weight gradients 2·macs, input gradients of every layer but the first
    expected = b * (2 * macs + 2 * macs + 2 * n * (40 * 40 + 40 * 1))
    assert threads.gradient_flops(fm, resolve_loss("mse"), x, y) == expected
