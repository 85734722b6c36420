"""Intra-op thread count by work size: small operations run on one thread.

Why: on a busy machine an OpenMP team whose threads are descheduled waits at every barrier. The sine
``fused`` path at B = 100 (a gradient is ~10 MFLOP, split into dozens of tiny ops) measured 5,190 tasks/s on
two idle cores with two threads and 169 tasks/s while two other single-threaded jobs ran (issue 11); one
thread loses little when idle and nothing under load. Large operations (a Conv-4 gradient on miniImageNet
shapes is ~57 GFLOP) still gain from every thread.

:func:`choose_threads` maps the FLOPs of one unit of work (one gradient of a stack of tasks) to a thread count:
one thread per :data:`FLOPS_PER_THREAD` FLOPs, at least 1, at most the current ``torch.get_num_threads()`` (so a
user's or a launcher's setting stays the ceiling). :func:`limited_threads` applies it for the duration of a
block; :class:`metaprox.MetaLearner` wraps every inner solve in it, with the gradient's FLOPs counted once per
model and input shape (:func:`gradient_flops`). ``set_auto(False)`` (or ``METAPROX_THREADS=fixed``) turns the
adjustment off. ``metaprox bench threads`` measures it under load.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["choose_threads", "limited_threads", "gradient_flops", "set_auto", "FLOPS_PER_THREAD"]

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
