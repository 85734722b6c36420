"""Intra-op threads, at two levels: the process's ceiling (from the config), and each inner solve's share of it
(from the FLOPs of one gradient).

**The process** (:func:`apply_threads`, called by the CLI). Small models gain nothing from intra-op parallelism
and lose a lot to it: every tiny matmul pays the thread pool's wake-up and synchronisation. On a two-core
machine, 50 outer steps of a finite set of 140 linear tasks took 82 s with torch's default two threads and 2.8 s
with one (``metaprox bench threads`` measures it side by side). So linear and MLP models of fewer than
:data:`SMALL_PARAMS` parameters run on one thread; larger models (and Conv-4 episodes) use every core this
process may run on. ``threads`` in the config or ``--threads`` on the command line overrides the choice; the count
used is written into the run's ``config.json`` (``threads``).

**Each inner solve** (:func:`limited_threads` around every group in :func:`metaprox.solve.solve_groups`). On a
busy machine an OpenMP team whose threads are descheduled waits at every barrier. The sine ``fused`` path at
B = 100 (a gradient is ~10 MFLOP, split into dozens of tiny ops) measured 5,190 tasks/s on two idle cores with two
threads and 169 tasks/s while two other single-threaded jobs ran (issue 11); one thread loses little when idle
and nothing under load. Large operations (a Conv-4 gradient on miniImageNet shapes is ~57 GFLOP) still gain from
every thread. :func:`choose_threads` maps the FLOPs of one gradient of a stack of tasks to one thread per
:data:`FLOPS_PER_THREAD` FLOPs, at least 1, at most the current ``torch.get_num_threads()`` (so the process's
setting stays the ceiling), counted once per model and input shape (:func:`gradient_flops`).
``set_auto(False)`` (or ``METAPROX_THREADS=fixed``) turns this per-solve adjustment off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["SMALL_PARAMS", "usable_cores", "auto_threads", "process_threads", "apply_threads", "choose_threads",
           "limited_threads", "gradient_flops", "solve_threads", "set_auto", "FLOPS_PER_THREAD"]

SMALL_PARAMS = 100_000  # below this many model parameters one thread is fastest (see the module doc)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _model_params(cfg: dict[str, Any]) -> int | None:
    """Parameter count of a linear/MLP model of the config (None for other models: image networks)."""
    m = cfg["model"]
    if m["kind"] == "linear":
        return 0  # a few hundred at most: always small
    if m["kind"] == "mlp":
        sizes = m["sizes"]
        return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    return None


def auto_threads(cfg: dict[str, Any]) -> int:
    """1 for small linear/MLP models, else every available core."""
    params = _model_params(cfg)
    return 1 if params is not None and params < SMALL_PARAMS else usable_cores()


def process_threads(cfg: dict[str, Any], requested: int | None = None) -> int:
    """``--threads`` if given, else the config's ``threads`` if > 0, else :func:`auto_threads`."""
    for value, where in ((requested, "--threads"), (cfg.get("threads") or None, "threads")):
        if value is not None:
            if int(value) < 1:
                raise ValueError(f"{where} = {value}: give a thread count ≥ 1 (or leave it out to choose "
                                 f"from the work size).")
            return int(value)
    return auto_threads(cfg)


def apply_threads(cfg: dict[str, Any], requested: int | None = None) -> dict[str, Any]:
    """Set torch's intra-op thread count for ``cfg`` and return the config with ``threads`` = the count used."""
    n = process_threads(cfg, requested)
    torch.set_num_threads(n)
    return {**cfg, "threads": n}


# ----- each inner solve ----------------------------------------------------------------------------------------
#: FLOPs of work per gradient that justify one more intra-op thread
FLOPS_PER_THREAD = 5e7

_auto = os.environ.get("METAPROX_THREADS", "").strip().lower() != "fixed"
_flops_cache: dict[tuple, float] = {}


def set_auto(enabled: bool) -> None:
    """Turn the work-size thread choice of :func:`limited_threads` on or off (process-wide)."""
    global _auto
    _auto = bool(enabled)


def choose_threads(work_flops: float, max_threads: int | None = None) -> int:
    """Intra-op threads for a unit of work of ``work_flops`` FLOPs: ``work / FLOPS_PER_THREAD``, clipped to
    ``[1, max_threads]`` (default ``torch.get_num_threads()``)."""
    ceiling = torch.get_num_threads() if max_threads is None else int(max_threads)
    if not work_flops > 0:
        return 1
    return max(1, min(ceiling, int(work_flops // FLOPS_PER_THREAD)))


@contextlib.contextmanager
def limited_threads(work_flops: float | Callable[[], float]) -> Iterator[int]:
    """Run the block with :func:`choose_threads` threads (when enabled); the previous count is restored.

    ``work_flops`` may be a callable, evaluated only when there is a choice to make (more than one thread)."""
    before = torch.get_num_threads()
    n = before
    if _auto and before > 1:
        n = choose_threads(work_flops() if callable(work_flops) else work_flops, before)
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if n != before:
            torch.set_num_threads(before)


def gradient_flops(fmodel: Any, loss: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """FLOPs (matrix products and convolutions, forward + backward) of one gradient of the stack ``x`` (B, n, …):
    counted with ``torch.utils.flop_counter`` on the first task, × B; cached per (model, shapes, dtype)."""
    key = (id(fmodel.module), tuple(x.shape), x.dtype, x.device.type)
    if key not in _flops_cache:
        from torch.utils.flop_counter import FlopCounterMode

        params = [p.detach().requires_grad_(True) for p in fmodel.params()]
        try:
            with FlopCounterMode(display=False) as counter, torch.enable_grad():
                torch.autograd.grad(loss.single(fmodel.single(params, x[0]), y[0]), params, allow_unused=True)
            _flops_cache[key] = float(counter.get_total_flops()) * x.shape[0]
        except Exception:  # a model the counter cannot trace: keep every thread
            _flops_cache[key] = float("inf")
    return _flops_cache[key]


def solve_threads(oracle: Any, x: torch.Tensor, y: torch.Tensor) -> contextlib.AbstractContextManager[int]:
    """:func:`limited_threads` for one inner solve of the stack ``x, y`` by ``oracle`` (every thread for an
    oracle without a model and loss: nothing to count)."""
    fmodel, loss = getattr(oracle, "fmodel", None), getattr(oracle, "loss", None)
    if fmodel is None or loss is None:
        return contextlib.nullcontext(torch.get_num_threads())
    return limited_threads(lambda: gradient_flops(fmodel, loss, x, y))
