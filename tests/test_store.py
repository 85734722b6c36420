"""Task stores: memory and memory-mapped (round trip, defaults, commit/rollback after a crash, checksums,
resume of a FiniteMMP run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import metaprox
from metaprox.algorithms.finite import FiniteMMP
from metaprox.checkpoint import CheckpointError
from metaprox.store import MemmapStore, MemoryStore, ParamLayout
from metaprox.tasks.taskset import TaskSet

LAYOUT = ParamLayout(["w", "b"], [(2, 3), (2,)])


def rows(n, seed=0):
    return torch.randn(n, LAYOUT.numel, generator=torch.Generator().manual_seed(seed))


def test_layout_round_trip():
    v = [torch.randn(4, 2, 3), torch.randn(4, 2)]
    back = LAYOUT.unflatten(LAYOUT.flatten(v))
    assert all(torch.equal(a, b) for a, b in zip(v, back, strict=True))


@pytest.mark.parametrize("kind", ["memory", "memmap"])
def test_store_defaults_and_writes(kind, tmp_path):
    store = MemoryStore(LAYOUT, 10) if kind == "memory" else MemmapStore.create(tmp_path / "s", LAYOUT, 10, chunk=3)
    default = torch.full((LAYOUT.numel,), 7.0)
    r, mask = store.read([0, 5], default)
    assert not mask.any() and torch.equal(r, default.expand(2, -1))
    new = rows(2)
    store.write([5, 9], new)
    r, mask = store.read([9, 0, 5], default)
    assert mask.tolist() == [True, False, True]
    assert torch.equal(r[0], new[1]) and torch.equal(r[2], new[0]) and torch.equal(r[1], default)
    with pytest.raises(IndexError):
        store.read([10], default)


def test_memmap_commit_reopen_and_rollback(tmp_path):
    path = tmp_path / "s"
    store = MemmapStore.create(path, LAYOUT, 100, chunk=16)
    a = rows(5)
    store.write([1, 2, 40, 41, 99], a)
    store.commit({"step": 1})
    # uncommitted writes (a crash before commit) are rolled back on open
    store.write([2, 60], rows(2, seed=1))
    assert any((path / "journal").iterdir())
    del store
    again = MemmapStore.open(path)
    assert again.meta == {"step": 1}
    r, mask = again.read([1, 2, 40, 41, 99, 60], torch.zeros(LAYOUT.numel))
    assert torch.equal(r[:5], a) and mask.tolist() == [True] * 5 + [False]
    assert not any((path / "journal").iterdir())


@pytest.mark.parametrize("how", ["commit", "two-phase"])
def test_memmap_crash_after_the_index_was_replaced(how, tmp_path, monkeypatch):
    """A crash after the new index is in place but before the journal is emptied: the commit is complete,
    so the store reopens at it (the stale undo data must not roll the chunks back)."""
    path = tmp_path / "s"
    store = MemmapStore.create(path, LAYOUT, 40, chunk=8)
    store.write([1, 30], rows(2))
    store.commit({"step": 1})
    new = rows(3, seed=1)
    store.write([1, 2, 17], new)
    monkeypatch.setattr(MemmapStore, "_clear_journal", lambda self: None)  # the crash: journal left behind
    if how == "commit":
        store.commit({"step": 2})
    else:
        store.prepare({"step": 2})
        store.finalize()
    assert len(list((path / "journal").iterdir())) == 2  # chunks 0 and 2 were journaled
    monkeypatch.undo()
    del store
    again = MemmapStore.open(path)
    assert again.meta == {"step": 2}
    r, mask = again.read([1, 2, 17, 30], torch.zeros(LAYOUT.numel))
    assert torch.equal(r[:3], new) and mask.all()
    assert not any((path / "journal").iterdir())


def test_memmap_detects_corruption(tmp_path):
    path = tmp_path / "s"
    store = MemmapStore.create(path, LAYOUT, 20, chunk=8)
    store.write([3], rows(1))
    store.commit()
    del store
    with open(path / "params.f32", "r+b") as f:
        f.seek(3 * (LAYOUT.numel + 1) * 4 + 8)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="sha256"):
        MemmapStore.open(path)
    index = json.loads((path / "index.json").read_text())
    assert index["format"] == 1 and len(index["checksums"]) == 3
    with pytest.raises(FileExistsError):
        MemmapStore.create(path, LAYOUT, 20)


def test_finite_mmp_resumes_from_memmap(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = TaskSet([metaprox.Task(torch.randn(8, 2, generator=g), torch.randn(8, 1, generator=g)) for _ in range(6)])

    def learner(store):
        torch.manual_seed(0)
        return FiniteMMP(torch.nn.Linear(2, 1), ts, lam=1.0, inner=metaprox.SGD(lr=0.1, steps=5), store=store,
                         outer_lr=0.5)

    ref = learner(None)
    for k in range(6):
        ref.step([k % 6, (k + 1) % 6])
    layout = ParamLayout.of(ref.names, ref.fmodel.params())
    run = learner(MemmapStore.create(tmp_path / "s", layout, 6))
    for k in range(3):
        run.step([k % 6, (k + 1) % 6])
    run.commit()
    state = run.state_dict()
    run.step([3, 4])  # lost: not committed
    resumed = learner(MemmapStore.open(tmp_path / "s"))
    resumed.load_state_dict(state)
    for k in range(3, 6):
        resumed.step([k % 6, (k + 1) % 6])
    assert torch.allclose(resumed.rows(np.arange(6)).float(), ref.rows(np.arange(6)).float(), atol=1e-6)
