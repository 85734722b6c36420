"""Task-parallel meta-training over torch.distributed ranks (launched by ``torchrun``), and its single-process twin.

Every outer iteration is embarrassingly task-parallel: each task's inner solve and meta-gradient contribution
``a_T g_T`` depends only on the meta-parameters ``w``. So all ranks draw the *same* global task minibatch (the
task sampler is seeded identically on every rank), each solves its contiguous share ``tasks[lo:hi]``, and one
all-reduce (SUM) of a single flattened buffer

    [ Σ_local a_T g_T (all parameters, flattened) | Σ_local a_T | monitor sums ... ]

gives every rank the same meta-gradient ``Σ a_T g_T / Σ a_T``; the outer optimizer then takes the same step on
every rank, so the meta-parameters stay identical without any broadcast.

A :class:`Reducer` is the hook :class:`metaprox.MetaLearner` calls: ``part(n)`` says which slice of a minibatch
of ``n`` tasks this process solves, ``sum(tensors, scalars)`` sums them over processes. :class:`LocalReducer`
(one process: everything, identity) is the default; :class:`AllReduceReducer` does the above over a process
group. Process groups are created by :func:`process_group` from torchrun's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): gloo on CPU, nccl on CUDA. Without ``WORLD_SIZE``
(or with ``WORLD_SIZE=1``) nothing of torch.distributed is touched.

Saving follows the "save on master" rule (as in DINO's ``utils.save_on_master``): only rank 0 writes files,
with atomic writes, and no barrier is needed — the other ranks hold identical state anyway.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["Reducer", "LocalReducer", "AllReduceReducer", "process_group", "world_size", "rank",
           "is_main_process", "is_restart", "save_on_master", "shard_bounds", "DEFAULT_TIMEOUT_S"]

#: seconds a collective may wait for a peer before failing (override with METAPROX_DIST_TIMEOUT)
DEFAULT_TIMEOUT_S = 300.0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def world_size() -> int:
    """Number of processes of the job: the process group's size, else ``WORLD_SIZE`` from the env, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return _env_int("RANK", 0)


def is_main_process() -> bool:
    """True on rank 0 — the only process that writes the run directory."""
    return rank() == 0


def is_restart() -> bool:
    """True in workers that ``torchrun --max-restarts`` restarted after a failure (``TORCHELASTIC_RESTART_COUNT``)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0


def save_on_master(fn, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` on rank 0 only (no barrier); returns its result there, ``None`` elsewhere."""
    return fn(*args, **kwargs) if is_main_process() else None


def shard_bounds(n: int, world: int, r: int) -> tuple[int, int]:
    """Contiguous share ``[lo, hi)`` of ``n`` items for rank ``r`` of ``world``: sizes differ by at most one,
    the first ``n % world`` ranks take one more."""
    if not 0 <= r < world:
        raise ValueError(f"rank {r} is not in [0, {world}).")
    base, extra = divmod(n, world)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


class Reducer:
    """How one process takes part in an outer iteration: which tasks it solves, and how partial sums combine."""

    rank: int = 0
    world_size: int = 1

    def part(self, n: int) -> slice:
        """The slice of a global minibatch of ``n`` tasks that this process solves."""
        lo, hi = shard_bounds(n, self.world_size, self.rank)
        return slice(lo, hi)

    def sum(self, tensors: Sequence[torch.Tensor],
            scalars: Mapping[str, float]) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Sum ``tensors`` and ``scalars`` over all processes (every process gets the totals)."""
        raise NotImplementedError


class LocalReducer(Reducer):
    """One process: it solves every task and its sums are the totals (the identity)."""

    def sum(self, tensors, scalars):
        return list(tensors), dict(scalars)


class AllReduceReducer(Reducer):
    """Sum over the ranks of a torch.distributed process group with *one* all-reduce per call.

    The tensors (flattened) and the scalars are packed into a single buffer of the tensors' dtype (so the
    scalars travel at that precision: float32 for float32 models), all-reduced with SUM, and unpacked onto the
    tensors' own devices. The buffer lives where the backend needs it: on the current CUDA device for nccl
    (also when a caller passes CPU tensors or only scalars, as the finite-task path does), else on the
    tensors' device. Scalar names must be the same, in the same order, on every rank.
    """

    def __init__(self, group: Any = None):
        dist = torch.distributed
        if not dist.is_initialized():
            raise RuntimeError("AllReduceReducer needs an initialised process group (see process_group()).")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.calls = 0  # number of all-reduces issued (tests check: one per outer iteration)
        self.nccl = _backend_of(group) == "nccl"

    def sum(self, tensors, scalars):
        tensors = list(tensors)
        keys = list(scalars)
        dtype = tensors[0].dtype if tensors else torch.float64
        device = tensors[0].device if tensors else torch.device("cpu")
        if self.nccl:  # nccl reduces CUDA tensors only
            device = torch.device("cuda", torch.cuda.current_device())
        parts = [t.detach().reshape(-1).to(device, dtype) for t in tensors]
        parts.append(torch.tensor([float(scalars[k]) for k in keys], dtype=dtype, device=device))
        buf = torch.cat(parts)
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM, group=self.group)
        self.calls += 1
        out, i = [], 0
        for t in tensors:
            out.append(buf[i:i + t.numel()].view_as(t).to(t.device, t.dtype))
            i += t.numel()
        return out, {k: float(v) for k, v in zip(keys, buf[i:].tolist(), strict=True)}

    def check_same(self, value: float, what: str) -> None:
        """Raise on every rank unless all ranks hold the same ``value`` (startup consistency check; also a
        synchronisation point, so no rank writes files before every rank has looked at them)."""
        t = torch.tensor([value, -value], dtype=torch.float64)
        if self.nccl:
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        hi, lo = float(t[0]), -float(t[1])
        if hi != lo:
            raise RuntimeError(f"ranks disagree on {what}: values range over [{lo}, {hi}] (rank {self.rank} "
                               f"has {value}). Is the run directory on a filesystem every rank sees?")


def _backend_of(group: Any) -> str:
    return str(torch.distributed.get_backend(group))


def _timeout_s() -> float:
    value = os.environ.get("METAPROX_DIST_TIMEOUT")
    return DEFAULT_TIMEOUT_S if not value else float(value)


_JOINED = False  # set once this process has initialised (and so later destroyed) a process group


def joined_process_group() -> bool:
    """Whether :func:`process_group` initialised a torch.distributed group in this process (see cli.run)."""
    return _JOINED


@contextmanager
def process_group(device: str = "cpu") -> Iterator[Reducer]:
    """The :class:`Reducer` for this process, joining torchrun's process group when there is one.

    Under torchrun with ``WORLD_SIZE > 1`` (and no group yet): ``init_process_group`` with gloo (CPU) or nccl
    (CUDA; each rank uses ``cuda:LOCAL_RANK``), a collective timeout of ``METAPROX_DIST_TIMEOUT`` seconds
    (default 300) so a lost peer fails the job instead of hanging it; the group is destroyed on exit. With a
    group already initialised by the caller, that group is used and left alone. Otherwise: a
    :class:`LocalReducer` and no torch.distributed call at all.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        yield AllReduceReducer()
        return
    if _env_int("WORLD_SIZE", 1) <= 1:
        yield LocalReducer()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=_timeout_s())
    backend = "nccl" if cuda else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one TCPStore server across elastic restarts, so the keys a failed attempt's
        # workers wrote (gloo's peer addresses) are still there when the restarted workers rendezvous: they
        # read a dead peer's address and time out ("Connect timeout"). A key prefix per restart isolates them.
        agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                    _env_int("WORLD_SIZE", 1), is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"metaprox/restart-{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", agent_store)
        dist.init_process_group(backend=backend, store=store, rank=_env_int("RANK", 0),
                                world_size=_env_int("WORLD_SIZE", 1), timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    global _JOINED
    _JOINED = True
    try:
        yield AllReduceReducer()
    finally:
        dist.destroy_process_group()
