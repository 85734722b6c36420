"""Task-parallel meta-training over torch.distributed (gloo on 127.0.0.1): equality with one process, rank-0-only
writes, fail-fast on a lost worker, resume after it (same and other world size), torchrun elastic restarts.

The launches go through ``python -m torch.distributed.run --standalone`` (= ``torchrun``) or
``torch.multiprocessing.spawn``; every process uses one thread.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import metaprox
from _spawn_helpers import exit_without_teardown
from _tiny_omniglot import make_omniglot
from _torchrun_helpers import checkpoint_step, finish, kill_rank_after, torchrun_train
from metaprox.distributed import LocalReducer, shard_bounds
from metaprox.priors import TreePrior
from metaprox.tasks.share import TaskShare
from metaprox.tasks.sine import SineFamily

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "sine.toml")
# long enough (a few seconds) to be killed mid-run; checkpoints every 5 iterations
LONG = ["--set", "outer.steps=150", "--set", "outer.meta_batch=5", "--set", "inner.steps=30", "--set",
        "eval.tasks=4", "--set", "eval.steps=[0,1]", "--set", "eval.shots=[5]", "--set", "log.every=5",
        "--set", "log.checkpoint_every=5", "--set", "log.tensorboard=\"false\"", "--quiet"]

# 1 vs 2 processes differ by float32 round-off, which the training dynamics amplify slowly (relative parameter
# difference ~1e-7 after 30-40 iterations, ~1e-6 after 150 on sine): the ≤ 1e-6 comparisons use 30 iterations
SHORT = ["--set", "outer.steps=30"]
OVERRIDES = [a for a in LONG[:-1] if a != "--set"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _torchrun(out: Path, *args: str, nproc: int = 2, restarts: int = 0) -> subprocess.Popen:
    """``torchrun --standalone`` of ``metaprox train`` on LONG (+ ``args``, e.g. SHORT or ``--resume``)."""
    return torchrun_train(CONFIG, out, *LONG, *args, nproc=nproc, restarts=restarts)


def _params(run: Path) -> dict[str, torch.Tensor]:
    meta = json.loads((run / "checkpoint.json").read_text())
    return {k: v for k, v in load_file(run / meta["tensors"]).items() if k.startswith("params/")}


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    den = sum(float(a[k].double().square().sum()) for k in a)
    return (num / den) ** 0.5


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: an uninterrupted 2-process run of LONG."""
    out = tmp_path_factory.mktemp("dist") / "uninterrupted"
    rc, log = finish(_torchrun(out))
    assert rc == 0, log[-3000:]
    return out


@pytest.fixture(scope="module")
def short_single(tmp_path_factory) -> Path:
    """The reference for the round-off comparisons: SHORT in one process, no torch.distributed."""
    from metaprox.config import load_config
    from metaprox.train import train

    out = tmp_path_factory.mktemp("dist") / "single"
    train(load_config(CONFIG, OVERRIDES + ["outer.steps=30"]), out, progress=False)
    return out


# ----- pieces --------------------------------------------------------------------------------------------------
def test_shard_bounds_partition_contiguously():
    for n in range(0, 12):
        for world in range(1, 6):
            bounds = [shard_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_bounds(4, 2, 2)


def test_single_process_reducer_is_the_identity():
    r = LocalReducer()
    assert r.part(7) == slice(0, 7)
    t = [torch.ones(3)]
    out, s = r.sum(t, {"weight": 2.0})
    assert out[0] is t[0] and s == {"weight": 2.0}


# ----- every rule, 2 gloo processes vs 1 (torch.multiprocessing.spawn) ----------------------------------------
def _learner(rule: str) -> metaprox.MetaLearner:
    torch.manual_seed(0)
    model = metaprox.MLP([1, 16, 16, 1])
    sgd = metaprox.SGD(lr=0.02, steps=4)
    kw = {"outer_lr": 0.1, "total_steps": 10}
    if rule == "mmp":
        return metaprox.MetaMinibatchProx(model, "mse", lam=0.5, inner=sgd, **kw)
    if rule == "mmp_minibatch":  # inner minibatches: uniforms drawn for the global minibatch, sliced per rank
        return metaprox.MetaMinibatchProx(model, "mse", lam=0.5, inner=metaprox.SGD(lr=0.02, steps=4, batch_size=3),
                                          **kw)
    if rule == "mmp_carry":  # Adam moments carried across outer steps: all-reduced with the meta-gradient
        adam = metaprox.Adam(lr=0.01, steps=4, beta1=0.0, carry_moments=True)
        return metaprox.MetaMinibatchProx(model, "mse", lam=0.5, inner=adam, **kw)
    if rule == "maml":
        return metaprox.MAML(model, "mse", inner=sgd, **kw)
    if rule == "fomaml":
        return metaprox.FOMAML(model, "mse", inner=sgd, **kw)
    if rule == "reptile":
        return metaprox.Reptile(model, "mse", inner=sgd, **kw)
    if rule == "mmp_tree":  # a tree prior: per-node meta-gradients in the one all-reduce, then the node steps
        return metaprox.HierarchicalMMP(model, "mse", lam=0.5, lam_levels=[1.0, 2.0], inner=sgd, **kw)
    if rule == "reptile_tree":
        rep = metaprox.Reptile(model, "mse", inner=sgd, **kw)
        TreePrior(rep, [1.0, 2.0])
        return rep
    return metaprox.IMAML(model, "mse", lam=1.0, inner=sgd, cg_steps=3, **kw)


CASES = [("mmp", 5), ("mmp", 1), ("mmp_minibatch", 5), ("mmp_carry", 5), ("maml", 5), ("fomaml", 4), ("reptile", 5),
         ("imaml", 3), ("mmp_tree", 5), ("reptile_tree", 4)]
GROUPS = [("a", "x"), ("b",), ("a", "y"), ("a", "x"), ("b", "z")]  # tree paths of a minibatch's tasks
ITERS = 3


def _run_case(rule: str, batch: int, reducer, shared: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """ITERS steps of ``rule``; ``shared``: each step gets only this process's share (a TaskShare; the others'
    tasks are never built), else the whole minibatch."""
    learner = _learner(rule)
    learner.reducer = reducer
    gen = torch.Generator().manual_seed(1)
    fam = SineFamily()
    part = reducer.part(batch)
    for _ in range(ITERS):
        if shared:
            tasks = TaskShare.uniform(fam.sample(batch, 10, gen, num_query=10, part=part), batch, part, 10, 10)
        else:
            tasks = fam.sample(batch, 10, gen, num_query=10)
        weights = torch.arange(1.0, batch + 1)  # unequal task weights (of the whole minibatch)
        where = GROUPS[:batch] if rule.endswith("_tree") else None
        diag = learner.step(tasks, weights=weights, monitor=True, where=where)
    return {n: p.detach().clone() for n, p in zip(learner.names, learner.fmodel.params(), strict=True)}, diag


def _spawned(rank: int, world: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        from metaprox.distributed import AllReduceReducer

        for (rule, batch), shared in itertools.product(CASES, (False, True)):
            reducer = AllReduceReducer()
            params, diag = _run_case(rule, batch, reducer, shared)
            assert reducer.calls == ITERS  # one all-reduce per outer iteration
            if rank == 0:
                save_file(params, f"{out_dir}/{rule}-{batch}-{shared}.safetensors")
                Path(f"{out_dir}/{rule}-{batch}-{shared}.json").write_text(json.dumps(diag))
    finally:
        torch.distributed.destroy_process_group()
    exit_without_teardown()


def test_every_rule_two_processes_equal_one(tmp_path):
    # rendezvous through a file, not a probed free TCP port (no race with other processes grabbing the port)
    init = f"file://{tmp_path / 'rdzv-store'}"
    torch.multiprocessing.spawn(_spawned, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    for (rule, batch), shared in itertools.product(CASES, (False, True)):  # whole minibatch, or only the share
        ref, ref_diag = _run_case(rule, batch, LocalReducer())
        got = load_file(tmp_path / f"{rule}-{batch}-{shared}.safetensors")
        assert _rel(ref, got) <= 1e-6, (rule, batch, shared, _rel(ref, got))
        diag = json.loads((tmp_path / f"{rule}-{batch}-{shared}.json").read_text())
        assert set(diag) == set(ref_diag)
        for k, v in ref_diag.items():
            assert diag[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (rule, shared, k)


# ----- the trainer: each rank builds only its share of every minibatch -----------------------------------------
TRAIN_STEPS, META_BATCH = 6, 5


def _train_config(family: str, root: Path) -> dict:
    from metaprox.config import apply_overrides, load_config, resolve

    if family == "sine":  # the sine recipe: inner minibatches of 2 of the 50 points
        return load_config(CONFIG, OVERRIDES + [f"outer.steps={TRAIN_STEPS}", "log.every=2"])
    make_omniglot(root)
    sets = {"name": "tiny-omniglot", "task.family": "fewshot", "task.dataset": "omniglot",
            "task.data_path": str(root), "task.split": "background", "task.val_alphabets": 1, "task.ways": 2,
            "task.shots": 1, "task.queries": 1, "model.kind": "conv4", "model.filters": 4, "inner.steps": 2,
            "outer.steps": TRAIN_STEPS, "outer.meta_batch": META_BATCH, "log.every": 2,
            "log.tensorboard": "false"}
    return resolve(apply_overrides({}, [f"{k}={json.dumps(v)}" for k, v in sets.items()]))


def _spawned_train(rank: int, world: int, init_method: str, cfg: dict, out_dir: str) -> None:
    """``train`` on one rank of a gloo group, counting the Task objects this process constructs."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    built = 0
    post_init = metaprox.Task.__post_init__

    def counting(task: metaprox.Task) -> None:
        nonlocal built
        built += 1
        post_init(task)

    metaprox.Task.__post_init__ = counting  # type: ignore[method-assign]
    try:
        from metaprox.train import train

        train(cfg, Path(out_dir) / "two", progress=False, evaluate=False)
        Path(f"{out_dir}/built-{rank}.json").write_text(json.dumps(built))
    finally:
        torch.distributed.destroy_process_group()
    exit_without_teardown()


@pytest.mark.parametrize("family", ["sine", "omniglot"])
def test_train_ranks_build_only_their_share(family, tmp_path):
    from metaprox.train import train

    cfg = _train_config(family, tmp_path / "data")
    init = f"file://{tmp_path / 'rdzv-store'}"
    torch.multiprocessing.spawn(_spawned_train, args=(2, init, cfg, str(tmp_path)), nprocs=2, join=True)
    built = [json.loads((tmp_path / f"built-{r}.json").read_text()) for r in range(2)]
    assert built == [TRAIN_STEPS * 3, TRAIN_STEPS * 2]  # shares [0, 3) and [3, 5) of 5 tasks, never all 5
    train(cfg, tmp_path / "one", progress=False, evaluate=False)
    assert _rel(_params(tmp_path / "one"), _params(tmp_path / "two")) <= 1e-6


# ----- the CLI under torchrun ------------------------------------------------------------------------------------
def test_cli_two_processes_equal_one_process(short_single, tmp_path):
    run = tmp_path / "two"
    rc, log = finish(_torchrun(run, *SHORT))
    assert rc == 0, log[-3000:]
    assert log.count("MSE after 1 steps") == 1  # only rank 0 evaluates and prints
    assert _rel(_params(short_single), _params(run)) <= 1e-6
    a, b = _metrics(short_single), _metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), k
    # rank 0 wrote the whole run directory, once; no temporary files left behind
    for name in ("config.json", "metrics.jsonl", "checkpoint.json", "eval.json", "eval.md", "plots"):
        assert (run / name).exists(), name
    assert not list(run.glob(".*.tmp"))


def test_killed_worker_fails_fast_and_resume_matches(uninterrupted, tmp_path):
    run = tmp_path / "killed"
    proc = _torchrun(run)
    kill_rank_after(proc, run, rank=1, step=20)
    t_kill = time.monotonic()
    rc, log = finish(proc, timeout=40)
    assert rc != 0
    assert time.monotonic() - t_kill < 30, "the job did not fail fast"
    stopped = checkpoint_step(run)
    assert 20 <= stopped < 150
    rc, log = finish(_torchrun(run, "--resume"))
    assert rc == 0, log[-3000:]
    # same world size: bitwise equal to the uninterrupted run, metrics log included
    ref, got = _params(uninterrupted), _params(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert _metrics(run) == _metrics(uninterrupted)


def test_resume_with_another_world_size(short_single, tmp_path):
    from metaprox.config import load_config
    from metaprox.train import train

    run = tmp_path / "one-then-two"
    train(load_config(CONFIG, OVERRIDES + ["outer.steps=30"]), run, progress=False, stop_at=15)
    rc, log = finish(_torchrun(run, *SHORT, "--resume"))
    assert rc == 0, log[-3000:]
    assert _rel(_params(run), _params(short_single)) <= 1e-6  # a different split: equal up to round-off


def test_elastic_restart_resumes_automatically(uninterrupted, tmp_path):
    run = tmp_path / "elastic"
    proc = _torchrun(run, "--auto-resume", restarts=1)
    kill_rank_after(proc, run, rank=1, step=20)
    rc, log = finish(proc)
    assert rc == 0, log[-3000:]
    ref, got = _params(uninterrupted), _params(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert _metrics(run) == _metrics(uninterrupted)
