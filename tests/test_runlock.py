"""One writer per run directory: a second `metaprox train` on a busy --out exits 2 naming the holder's PID; the
lock of a SIGKILLed holder is taken over at once; nothing is left of a directory a refused run created."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _torchrun_helpers import torchrun_env
from metaprox.cli import main
from metaprox.runlock import LOCK_NAME, RunDirectoryBusy, RunLock

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "sine.toml")
TINY = ["--quiet", "--no-eval", "--set", "outer.steps=4", "--set", "outer.meta_batch=2", "--set", "inner.steps=2",
        "--set", "log.every=2", "--set", "log.checkpoint_every=2", "--set", "log.tensorboard=false"]


def _holder_pid(run: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    """Wait until ``proc`` holds the lock of ``run`` (its PID is in the lock file)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        try:
            pid = json.loads((run / LOCK_NAME).read_text())["pid"]
        except (OSError, ValueError, KeyError):
            pid = None
        if pid == proc.pid:
            return pid
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the first writer did not take the lock")


def test_second_writer_exits_2_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    # a long run without checkpoints: it holds the lock until killed
    first = subprocess.Popen(
        [sys.executable, "-m", "metaprox.cli", "train", CONFIG, "--out", str(run), *TINY,
         "--set", "outer.steps=1000000", "--set", "log.checkpoint_every=1000000"],
        env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid = _holder_pid(run, first)
        for extra in ([], ["--resume"], ["--auto-resume"]):
            assert main(["train", CONFIG, "--out", str(run), *TINY, *extra]) == 2
            err = capsys.readouterr().err
            assert err.startswith("metaprox: error: run directory") and f"in use by process {pid}" in err, err
        assert first.poll() is None  # the refused writers did not disturb it
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # the dead holder's lock file is still there, and blocks nobody
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == pid
    assert main(["train", CONFIG, "--out", str(run), *TINY]) == 0
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 4


def test_eval_writing_into_a_busy_run_is_refused_and_no_write_is_not(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", CONFIG, "--out", str(run), *TINY]) == 0
    lock = RunLock(run)  # a writer in this process: another open file description conflicts just the same
    try:
        assert main(["eval", str(run), "--set", "eval.tasks=3", "--set", "eval.steps=[0,1]"]) == 2
        assert f"in use by process {os.getpid()}" in capsys.readouterr().err
        assert main(["eval", str(run), "--no-write", "--set", "eval.tasks=3", "--set", "eval.steps=[0,1]"]) == 0
        with pytest.raises(RunDirectoryBusy):
            RunLock(run)
    finally:
        lock.release()
    assert not (run / "eval.json").exists()
    RunLock(run).release()


def test_a_refused_run_leaves_no_directory_and_stale_temporaries_are_removed(tmp_path, capsys):
    assert main(["train", CONFIG, "--out", str(tmp_path / "new"), "--resume", *TINY]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".checkpoint.json.abc123.tmp").write_text("half")
    RunLock(run).release()
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]


def test_out_naming_a_file_is_an_error(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["train", CONFIG, "--out", str(tmp_path / "f"), *TINY]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err
