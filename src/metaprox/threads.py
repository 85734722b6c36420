"""How many intra-op threads the CLI gives torch: from the size of the work, unless told.

Small models gain nothing from intra-op parallelism and lose a lot to it: every tiny matmul pays the thread
pool's wake-up and synchronisation. On a two-core machine, 50 outer steps of a finite set of 140 linear tasks
took 82 s with torch's default two threads and 2.8 s with one (``metaprox bench threads`` measures it side by
side). So linear and MLP models of fewer than :data:`SMALL_PARAMS` parameters run on one thread; larger models
(and Conv-4 episodes) use every core this process may run on. ``threads`` in the config or ``--threads`` on the
command line overrides the choice; the count used is written into the run's ``config.json`` (``threads``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["SMALL_PARAMS", "auto_threads", "choose_threads", "apply_threads"]

SMALL_PARAMS = 100_000  # below this many model parameters one thread is fastest (see the module doc)


def _cores() -> int:
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
        return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    return None


def auto_threads(cfg: dict[str, Any]) -> int:
    """1 for small linear/MLP models, else every available core."""
    params = _model_params(cfg)
    return 1 if params is not None and params < SMALL_PARAMS else _cores()


def choose_threads(cfg: dict[str, Any], requested: int | None = None) -> int:
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
    n = choose_threads(cfg, requested)
    torch.set_num_threads(n)
    return {**cfg, "threads": n}
