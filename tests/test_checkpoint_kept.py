"""Self-contained checkpoints: every kept checkpoint carries its own metadata under its file's sha256, so any of
them resumes bitwise; an edited checkpoint.json is refused; leftovers of a killed writer are cleaned; files
honour the umask; format-1 run directories still load."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from metaprox.checkpoint import CheckpointError, atomic_write, load_checkpoint
from metaprox.cli import main
from metaprox.config import resolve
from metaprox.rundir import read_metrics
from metaprox.runlock import RunLock
from metaprox.train import train


def _cfg():
    return resolve({"outer": {"steps": 40, "meta_batch": 3, "optimizer": "adam", "lr": 0.05},
                    "task": {"train_points": 10}, "inner": {"steps": 3, "batch_size": 5},
                    "log": {"every": 5, "checkpoint_every": 10, "tensorboard": False, "progress": False},
                    "eval": {"tasks": 4, "steps": [0, 1], "shots": [5]}})


def test_the_older_kept_checkpoint_resumes_bitwise(tmp_path):
    cfg = _cfg()
    train(cfg, tmp_path / "full", evaluate=False)
    run = tmp_path / "split"
    train(cfg, run, evaluate=False, stop_at=30)
    kept = json.loads((run / "checkpoint.json").read_text())["kept"]
    assert [e["step"] for e in kept] == [20, 30]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [e["tensors"] for e in kept]
    with pytest.raises(CheckpointError, match=r"no kept checkpoint of step 10 .* keeps steps \[20, 30\]"):
        load_checkpoint(run, 10)
    train(cfg, run, evaluate=False, resume_from=20)  # the step-30 checkpoint is not needed
    a, b = load_checkpoint(tmp_path / "full")[0], load_checkpoint(run)[0]
    assert a["step"] == b["step"] == 40
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert [r["step"] for r in read_metrics(run)] == [r["step"] for r in read_metrics(tmp_path / "full")]


def test_resume_from_on_the_command_line(tmp_path, capsys):
    from pathlib import Path

    config = str(Path(__file__).resolve().parents[1] / "configs" / "sine.toml")
    args = ["--quiet", "--no-eval", "--set", "outer.steps=6", "--set", "outer.meta_batch=2", "--set",
            "inner.steps=2", "--set", "log.every=2", "--set", "log.checkpoint_every=2"]
    run = tmp_path / "run"
    assert main(["train", config, "--out", str(run), *args]) == 0
    assert main(["train", config, "--out", str(run), *args, "--resume-from", "3"]) == 2
    assert "no kept checkpoint of step 3" in capsys.readouterr().err
    assert main(["train", config, "--out", str(run), *args, "--resume-from", "4"]) == 0
    assert load_checkpoint(run)[0]["step"] == 6


def test_an_edited_checkpoint_json_is_refused(tmp_path):
    run = tmp_path / "r"
    train(_cfg(), run, evaluate=False, stop_at=20)
    meta = json.loads((run / "checkpoint.json").read_text())
    meta["step"] = 30  # would skip ten steps on resume
    (run / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"disagrees with its tensors file checkpoint-0000020.safetensors on "
                                              r"\['step'\]"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError, match="disagrees"):
        train(_cfg(), run, evaluate=False, resume=True)
    assert load_checkpoint(run, 20)[0]["step"] == 20  # the kept file itself is intact


def test_leftovers_of_a_killed_writer_are_removed_on_start(tmp_path):
    run = tmp_path / "r"
    train(_cfg(), run, evaluate=False, stop_at=20)
    blob = (run / "checkpoint-0000020.safetensors").read_bytes()
    (run / "checkpoint-0000030.safetensors").write_bytes(blob)  # killed before checkpoint.json named it
    (run / ".checkpoint.json.x1y2.tmp").write_text("{half")
    RunLock(run).release()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == [
        "checkpoint-0000010.safetensors", "checkpoint-0000020.safetensors", "checkpoint.json"]
    # a kill during the very first checkpoint.json write: the tensors file alone is an orphan
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "checkpoint-0000010.safetensors").write_bytes(blob)
    RunLock(fresh).release()
    assert not list(fresh.glob("checkpoint-*"))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_format_1_run_directories_still_load(tmp_path):
    run = tmp_path / "r"
    train(_cfg(), run, evaluate=False, stop_at=10)
    meta = json.loads((run / "checkpoint.json").read_text())
    path = run / meta["tensors"]
    blob = st_save(st_load(path.read_bytes()))  # the tensors without the metadata header
    path.write_bytes(blob)
    meta.update(format=1, sha256=hashlib.sha256(blob).hexdigest())
    del meta["kept"]
    (run / "checkpoint.json").write_text(json.dumps(meta))
    state, got = load_checkpoint(run)
    assert state["step"] == 10 and got["sampler"] == meta["sampler"]
    train(_cfg(), run, evaluate=False, resume=True, stop_at=20)
    assert load_checkpoint(run)[0]["step"] == 20
