"""The `metaprox` command end to end on a tiny run: train → eval → plot, and clear errors."""

import json

import pytest

from metaprox.cli import main

TINY = ["--set", "outer.steps=30", "--set", "outer.meta_batch=2", "--set", "inner.steps=2", "--set", "eval.tasks=5",
        "--set", "eval.steps=[0,1,3]", "--set", "log.every=10", "--set", "log.checkpoint_every=10",
        "--set", "log.tensorboard=\"false\""]


@pytest.fixture
def config(tmp_path):
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "configs" / "sine.toml")


def test_train_eval_plot(tmp_path, config, capsys):
    out = tmp_path / "run"
    assert main(["train", config, "--out", str(out), "--quiet", *TINY]) == 0
    for name in ("config.json", "metrics.jsonl", "checkpoint.json", "eval.json", "eval.md",
                 "plots/learning_curve.png", "plots/sine_fits.png", "plots/adaptation.png"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "MSE after 3 steps" in printed
    assert main(["eval", str(out), "--json", "--split", "val", "--no-write"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and set(result["sets"]) == {"5-shot", "10-shot"}
    assert result["sets"]["5-shot"]["3"]["tasks"] == 5
    assert main(["plot", str(out)]) == 0


def test_errors_exit_2_with_a_message(tmp_path, config, capsys):
    assert main(["train", config, "--out", str(tmp_path / "a"), "--set", "outer.lrr=1"]) == 2
    assert "unknown config key 'outer.lrr'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["train", config, "--out", str(tmp_path / "b"), "--resume", *TINY]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["bench", "nope"]) == 2
