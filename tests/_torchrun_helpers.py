"""Shared by the tests that launch ``metaprox train`` under ``torchrun`` and kill a worker mid-run: the launch
(this checkout's sources, one thread, 30 s collective timeout), waiting for it within a bound, and finding and
killing the worker of one rank once the run has checkpointed a given step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_MARK = b"METAPROX_DIST_TIMEOUT=30"  # set by torchrun_env(): tells our workers apart from other processes


def torchrun_env(**extra: str) -> dict[str, str]:
    """The environment of a launch: no torch.distributed variables inherited, this checkout's ``src`` first."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")}
    env.update(PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               METAPROX_DIST_TIMEOUT="30", **extra)
    return env


def torchrun_train(config: str | Path, out: Path, *args: str, nproc: int = 2, restarts: int = 0) -> subprocess.Popen:
    """``torchrun --standalone`` of ``metaprox train config --out out *args`` (stdout and stderr together)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "--monitor-interval=0.1", "-m", "metaprox.cli", "train", str(config),
           "--out", str(out), *args]
    return subprocess.Popen(cmd, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 50) -> tuple[int, str]:
    """(return code, output) of a launch; fails the test if it runs past ``timeout`` seconds (a hang)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def checkpoint_step(run: Path) -> int:
    """The step of the run's last checkpoint (``checkpoint.json``), -1 if there is none yet."""
    try:
        return int(json.loads((run / "checkpoint.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker of ``rank`` among the descendants of the torchrun process ``launcher``."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo = list(children.get(launcher, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and _MARK in env:
            return pid
    return None


def kill_rank_after(proc: subprocess.Popen, run: Path, rank: int, step: int, timeout: float = 40) -> None:
    """SIGKILL the worker of ``rank`` as soon as the run has a checkpoint at ``step`` or later."""
    t0 = time.monotonic()
    while checkpoint_step(run) < step:
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.02)
    pid = worker_pid(proc.pid, rank)
    assert pid is not None, "worker process not found"
    os.kill(pid, signal.SIGKILL)
