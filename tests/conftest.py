"""Shared fixtures: small linear least-squares task sets with closed-form answers, tiny nonlinear tasks, an outer
step that poisons a parameter, a tiny generated Omniglot."""

from __future__ import annotations

import pytest
import torch

import metaprox


def linear_tasks(n_tasks: int = 4, n: int = 12, d: int = 3, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, 1, generator=g, dtype=dtype)
    tasks = []
    for i in range(n_tasks):
        x = torch.randn(n, d, generator=g, dtype=dtype)
        w = base + 0.5 * torch.randn(d, 1, generator=g, dtype=dtype)
        y = x @ w + 0.3 + 0.1 * torch.randn(n, 1, generator=g, dtype=dtype)
        tasks.append(metaprox.Task(x, y, name=f"lin{i}"))
    return tasks


def linear_model(d: int = 3, dtype=torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(d, 1).to(dtype)


def quad_terms(task: metaprox.Task) -> tuple[torch.Tensor, torch.Tensor]:
    """L(θ) = ½ θᵀAθ − bᵀθ + const for θ = [weight, bias] and the mean squared error."""
    xa = torch.cat([task.x, torch.ones(task.num_examples, 1, dtype=task.x.dtype)], 1)
    n = task.num_examples
    return (2.0 / n) * xa.T @ xa, (2.0 / n) * (xa.T @ task.y).flatten()


def theta(params) -> torch.Tensor:
    return torch.cat([params["weight"].flatten(), params["bias"].flatten()])


@pytest.fixture
def lin_tasks():
    return linear_tasks()


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    """A tiny Omniglot in the official folder layout (tests/_tiny_omniglot.py), built once per test module."""
    from _tiny_omniglot import make_omniglot

    root = tmp_path_factory.mktemp("omniglot")
    make_omniglot(root)
    return root


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    """A miniImageNet-layout folder: 4 training, 3 validation and 3 test classes of 8 images 12×12."""
    from _tiny_miniimagenet import make_miniimagenet

    root = tmp_path_factory.mktemp("mini") / "miniimagenet"
    make_miniimagenet(root, per_class=8, side=12, classes={"train": 4, "val": 3, "test": 3})
    return root


@pytest.fixture(autouse=True)
def _image_cache(tmp_path_factory, monkeypatch):
    """Decoded-image caches of a test go to a temporary folder, never to ~/.cache."""
    monkeypatch.setenv("METAPROX_CACHE", str(tmp_path_factory.mktemp("image-cache")))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poison_outer_step(monkeypatch):
    """``poison_outer_step(step, index)``: from then on the outer step (``MetaLearner.apply_meta_gradient``, every
    learner's) that makes the step count ``step`` leaves parameter ``index`` NaN — a finite meta-gradient, a
    non-finite center."""
    from metaprox.algorithms.base import MetaLearner

    real = MetaLearner.apply_meta_gradient

    def poison(step: int, index: int) -> None:
        def poisoned(self, grads, **kw):
            diag = real(self, grads, **kw)
            if self.step_count == step:
                with torch.no_grad():
                    self.fmodel.params()[index].fill_(float("nan"))
            return diag

        monkeypatch.setattr(MetaLearner, "apply_meta_gradient", poisoned)

    return poison


def stored_checkpoint(run, shards):
    """The center of ``run``'s last checkpoint and every row (and initialised flag) of the store shards
    ``{label: path}`` (keys ``params/…``, ``label/rows``, ``label/seen``); a prepared commit left behind fails,
    and opening a shard verifies its chunk checksums."""
    import json

    import numpy as np
    from safetensors.torch import load_file

    from metaprox.store import MemmapStore, pending_meta

    meta = json.loads((run / "checkpoint.json").read_text())
    out = {k: v for k, v in load_file(run / meta["tensors"]).items() if k.startswith("params/")}
    for label, path in shards.items():
        assert pending_meta(path) is None, f"{path}: a prepared commit was left behind"
        store = MemmapStore.open(path)
        rows, seen = store.read(np.arange(store.num_tasks), torch.zeros(store.layout.numel, dtype=torch.float64))
        out[f"{label}/rows"], out[f"{label}/seen"] = rows, seen
    return out
