"""A finite set whose tasks come in kinds (``[[task.kinds]]``): one table per kind, each with its own features and
targets, around one shared trunk (FiniteMultiHeadMMP) — config → train → eval with per-kind metrics, a resumed
run equal to an uninterrupted one (center and every row of every kind's store), the exact full-batch center step
(w = the mean of the trunk rows), and the refusals, on small generated tables."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import stored_checkpoint
from metaprox import sharded
from metaprox.cli import main
from metaprox.config import ConfigError, kind_config, resolve
from metaprox.finite_data import load_finite_data
from metaprox.finite_eval import evaluate_finite_run
from metaprox.finite_kinds import kinds_model, load_kinds
from metaprox.store import MemmapStore
from metaprox.train import train
from metaprox.validate import config_problems

SHOP_TASKS, CLINIC_TASKS = 4, 3


def write_table(path: Path, tasks: int, rows: int, features: int, targets: list[str], seed: int,
                binary: bool = False) -> None:
    """Per-task nonlinear targets of shared features: y_j = tanh(x·a + b_t) · j + noise (binary: y > 0)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=features)
    names = [f"f{i}" for i in range(features)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", *names, *targets])
        for t in range(tasks):
            b = rng.normal()
            for _ in range(rows):
                x = rng.normal(size=features)
                h = np.tanh(x @ a + b)
                y = [h * (j + 1) + 0.1 * rng.normal() for j in range(len(targets))]
                w.writerow([f"t{t}", *x.round(4), *(int(v > 0) if binary else round(v, 4) for v in y)])


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("kinds")
    write_table(d / "shop.csv", SHOP_TASKS, 30, 3, ["y"], seed=0)
    write_table(d / "clinic.csv", CLINIC_TASKS, 25, 5, ["y1", "y2"], seed=1)
    write_table(d / "flags.csv", 2, 40, 2, ["hit"], seed=2, binary=True)
    write_table(d / "alarms.csv", 3, 40, 4, ["hit"], seed=3, binary=True)
    return {k: d / f"{k}.csv" for k in ("shop", "clinic", "flags", "alarms")}


def kinds_cfg(tables: dict[str, Path], **sections: dict) -> dict:
    cfg = {"name": "kinds-test", "algorithm": "finite_mmp",
           "task": {"family": "multitask", "val_frac": 0.2, "test_frac": 0.2,
                    "kinds": [{"name": "shop", "file": str(tables["shop"]), "target": "y"},
                              {"name": "clinic", "file": str(tables["clinic"]), "target": ["y1", "y2"]}]},
           "model": {"kind": "mlp", "sizes": [0, 8, 0], "activation": "tanh"},
           "heads": {"width": 6},
           "prox": {"lam": 1.0},
           "inner": {"solver": "sgd", "lr": 0.2, "steps": 10},
           "outer": {"lr": 0.5, "steps": 6, "meta_batch": 3, "schedule": "constant"},
           "log": {"every": 2, "checkpoint_every": 2, "progress": False, "tensorboard": "false"}}
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return resolve(cfg)


def stored(run: Path) -> dict[str, torch.Tensor]:
    """The center of the last checkpoint and every row (and initialised flag) of every kind's store."""
    kinds = json.loads((run / "checkpoint.json").read_text())["finite"]["kinds"]
    return stored_checkpoint(run, {kind: sharded.shard_path(run, 0, 1, kind) for kind in kinds})


def test_train_and_eval_report_every_kind(tables, tmp_path):
    torch.set_num_threads(1)
    cfg = kinds_cfg(tables, log={"eval_every": 3})
    run = tmp_path / "run"
    result = train(cfg, run)
    assert result["eval"]["split"] == "val" and set(result["val"]) == {"shop", "clinic"}
    assert result["val"]["shop"]["metric"] == "rmse" and result["tasks"] == SHOP_TASKS + CLINIC_TASKS
    assert {k: v["tasks"] for k, v in result["eval"]["kinds"].items()} == {"shop": SHOP_TASKS, "clinic": CLINIC_TASKS}
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["finite"]["kinds"] == {"shop": SHOP_TASKS, "clinic": CLINIC_TASKS}
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and all(np.isfinite(r["J"]) for r in rows)
    assert rows[-1]["J"] == result["J"]  # the last row's J is the final learner's
    val = [json.loads(r) for r in (run / "val_curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == [0, 3, 6] and set(val[-1]["pooled"]) == {"shop", "clinic"}
    assert val[-1]["val"] == json.loads(json.dumps(result["val"]))

    # `metaprox eval` rebuilds the learner from the checkpoint: the same numbers, and a test table per kind
    again = evaluate_finite_run(run, "val", write=False)
    assert json.dumps(again["eval"]) == json.dumps(result["eval"]) and again["J"] == result["J"]
    assert main(["eval", str(run), "--split", "test"]) == 0
    table = (run / "eval.md").read_text()
    assert "shop: test" in table and "clinic: test" in table
    with open(run / "tasks-test.csv") as f:
        per_task = list(csv.DictReader(f))
    assert [r["kind"] for r in per_task] == ["shop"] * SHOP_TASKS + ["clinic"] * CLINIC_TASKS
    assert main(["plot", str(run)]) == 0 and (run / "plots" / "tasks-test.png").is_file()

    # ground truth of the per-kind evaluation: clinic's task t1 scored by hand from its stored row
    clinic = MemmapStore.open(sharded.shard_path(run, 0, 1, "clinic"))
    row = clinic.read([1], torch.zeros(clinic.layout.numel, dtype=torch.float64))[0]
    params = dict(zip(clinic.layout.names, [p[0] for p in clinic.layout.unflatten(row)], strict=True))
    test = json.loads((run / "eval.json").read_text())

    model = kinds_model(cfg, load_kinds(cfg)).member("clinic")
    task = load_finite_data(kind_config(cfg, cfg["task"]["kinds"][1])).tasks("test")[1]
    with torch.no_grad():
        pred = torch.func.functional_call(model, params, (task.x,))
    rmse = float(torch.sqrt(((pred - task.y.view(len(task.y), -1)) ** 2).mean()))
    t1 = [r for r in test["eval"]["per_task"] if r["kind"] == "clinic" and r["task"] == "t1"][0]
    assert t1["rmse"] == pytest.approx(rmse, rel=1e-9)


def test_classification_kinds_report_auc_per_kind(tables, tmp_path):
    binary = [{"name": k, "file": str(tables[k]), "target": "hit", "task_type": "binary"} for k in ("flags", "alarms")]
    cfg = kinds_cfg(tables, task={"kinds": binary, "val_frac": 0.0, "test_frac": 0.4},
                    finite={"task_lam": "size"})  # λ_t = λ·n̄/n_t: tasks of either kind
    result = train(cfg, tmp_path / "run")
    assert result["eval"]["split"] == "test" and {h["metric"] for h in result["test"].values()} == {"auc"}
    assert set(result["eval"]["task_mean"]) == {"flags", "alarms"}
    assert all(0.0 <= h["value"] <= 1.0 for h in result["test"].values())


def test_resume_equals_uninterrupted(tables, tmp_path):
    torch.set_num_threads(1)
    cfg = kinds_cfg(tables)
    whole = train(cfg, tmp_path / "whole")
    assert train(cfg, tmp_path / "cut", stop_at=3) == {}  # checkpoints at 2 and 3
    resumed = train(cfg, tmp_path / "cut", resume=True)
    assert json.dumps(resumed) == json.dumps(whole)
    a, b = stored(tmp_path / "whole"), stored(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert bool(a["shop/seen"].all()) and bool(a["clinic/seen"].all())
    def logged(run: Path) -> list[dict]:  # every value but the wall-clock time
        return [{k: v for k, v in json.loads(r).items() if k != "time"}
                for r in (run / "metrics.jsonl").read_text().splitlines()]

    assert logged(tmp_path / "whole") == logged(tmp_path / "cut")


def test_full_batch_step_of_one_over_lambda_puts_w_at_the_mean_of_the_trunk_rows(tables, tmp_path):
    """Module doc of FiniteMultiHeadMMP: with the full batch and outer.lr = 1/λ the center step is exact, w ← the
    (weight-1) mean over all tasks of both kinds of their solved trunk parameters."""
    lam = 2.0
    cfg = kinds_cfg(tables, prox={"lam": lam}, finite={"sample": "all"}, outer={"lr": 1 / lam, "steps": 1},
                    log={"every": 1, "checkpoint_every": 1})
    start = kinds_cfg(tables, finite={"sample": "all"}, outer={"lr": 1 / lam, "steps": 1})
    w0 = dict(kinds_model(start, load_kinds(start)).trunk.named_parameters())
    train(cfg, tmp_path / "run", evaluate=False)
    state = stored(tmp_path / "run")
    for name, p0 in w0.items():
        trunk = []
        for kind in ("shop", "clinic"):
            layout = MemmapStore.open(sharded.shard_path(tmp_path / "run", 0, 1, kind)).layout
            parts = dict(zip(layout.names, layout.unflatten(state[f"{kind}/rows"]), strict=True))
            trunk.append(parts[f"trunk.{name}"])
        mean = torch.cat(trunk).mean(0)
        w = state[f"params/{name}"]
        # the rows are stored in float32: agreement to its rounding, while the step moved w by far more
        assert torch.allclose(w, mean, rtol=0, atol=1e-6)
        assert float((w - p0.detach()).abs().max()) > 1e-3


@pytest.mark.parametrize("sections,match", [
    ({"prior": {"kind": "tree", "task_nodes": ["a"] * 7}, "finite": {"center_update": "exact"}}, "tree prior"),
    ({"prior": {"kind": "graph", "edges": [[0, 1, 1.0]]}}, "graph prior"),
    ({"finite": {"rule": "reptile"}}, "reptile over kinds is not built"),
    ({"finite": {"center_update": "exact"}}, "envelope gradient step only"),
])
def test_what_kinds_cannot_do_is_refused_with_the_reason(tables, sections, match):
    with pytest.raises(ConfigError, match=match):
        kinds_cfg(tables, **sections)


def test_config_problems_of_kinds(tables, monkeypatch):
    cfg = kinds_cfg(tables)
    mixed = copy.deepcopy(cfg)
    mixed["task"]["kinds"][1] = {"name": "flags", "file": str(tables["flags"]), "target": "hit", "task_type": "binary"}
    assert any("mixes regression and classification" in p for p in config_problems(mixed))
    with pytest.raises(ConfigError, match="mixes regression and classification"):
        load_kinds(mixed)  # also where the tables are read (a Python caller skips config_problems)
    narrow = kinds_cfg(tables, model={"sizes": [0, 0]}, heads={"width": 0})
    problems = " ".join(config_problems(narrow))
    assert "give ≥ 1 hidden width" in problems and "heads.width = 0" in problems
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert any("without torchrun" in p for p in config_problems(cfg))
    monkeypatch.delenv("WORLD_SIZE")
    assert config_problems(cfg) == []
    for bad, match in (([{"name": "a.b", "file": "x.csv"}], "without '.'"),
                       ([{"name": "a", "file": "x.csv"}, {"name": "a", "dataset": "landmine"}], "unique"),
                       ([{"name": "a"}], "exactly one of file"),
                       ([{"name": "a", "file": "x.csv", "targte": "y"}], r"key 'task.kinds\[0\].targte'")):
        with pytest.raises(ConfigError, match=match):
            resolve({**cfg, "task": {**cfg["task"], "kinds": bad}})
    with pytest.raises(ConfigError, match="task.file is set next to task.kinds"):
        resolve({**cfg, "task": {**cfg["task"], "file": "x.csv"}})
