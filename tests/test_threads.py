"""Intra-op threads by work size, overridable by the config and --threads, recorded in config.json."""

from __future__ import annotations

import json

import pytest
import torch

from metaprox.bench import BENCHMARKS
from metaprox.cli import main
from metaprox.config import ConfigError, apply_overrides, resolve
from metaprox.threads import SMALL_PARAMS, _cores, apply_threads, auto_threads, choose_threads
from test_finite_table import write_config, write_table


def cfg(*over: str) -> dict:
    return resolve(apply_overrides({}, list(over)))


def test_small_models_get_one_thread_large_ones_every_core():
    assert auto_threads(cfg()) == 1  # the sine MLP 1-40-40-1
    assert auto_threads(cfg('model.kind="linear"')) == 1
    wide = cfg("model.sizes=[1, 400, 400, 1]")
    assert (1 + 1) * 400 + 401 * 400 + 401 > SMALL_PARAMS and auto_threads(wide) == _cores()
    assert auto_threads(cfg('model.kind="conv4"', 'task.family="fewshot"')) == _cores()


def test_config_and_flag_override_and_the_count_is_applied():
    assert choose_threads(cfg("threads=3")) == 3
    assert choose_threads(cfg("threads=3"), requested=2) == 2
    with pytest.raises(ValueError, match="--threads = 0"):
        choose_threads(cfg(), requested=0)
    with pytest.raises(ConfigError, match="threads = -1"):
        cfg("threads=-1")
    before = torch.get_num_threads()
    try:
        assert apply_threads(cfg(), requested=2)["threads"] == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert "threads" in BENCHMARKS


def test_bench_threads_table():
    from metaprox.bench.threads import bench_threads

    before = torch.get_num_threads()
    # tiny and one thread only (several threads are slow on a loaded CI machine): the table's shape, no timings
    out = bench_threads(quick=True, tasks=2, rounds=1, counts=[1])
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
