"""Shared by the tests that spawn torch.distributed worker processes."""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from pathlib import Path

import torch


def exit_without_teardown() -> None:
    """End a spawned worker whose outputs are on disk and whose process group is destroyed, skipping the
    interpreter's teardown: torch 2.13's gloo backend aborts there now and then ("terminate called without an
    active exception", SIGABRT after the work finished), which made ~10% of runs of a passing test fail.
    Call it only on success: an exception raised before it still reaches ``torch.multiprocessing.spawn``."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo(fn, *args, nprocs: int = 2) -> None:
    """Run ``fn(rank, reducer, *args)`` in ``nprocs`` spawned processes of one gloo group (one thread each);
    ``reducer`` is that rank's :class:`~metaprox.distributed.AllReduceReducer`. ``fn`` writes its results to disk."""
    # rendezvous through a fresh file, not a probed free TCP port: no race with other processes grabbing the port
    rdzv = Path(tempfile.mkdtemp(prefix="metaprox-rdzv-")) / "store"
    torch.multiprocessing.spawn(_worker, args=(fn, f"file://{rdzv}", nprocs, *args), nprocs=nprocs, join=True)


def _worker(rank: int, fn, init_method: str, world: int, *args) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        from metaprox.distributed import AllReduceReducer

        fn(rank, AllReduceReducer(), *args)
    finally:
        torch.distributed.destroy_process_group()
    exit_without_teardown()
