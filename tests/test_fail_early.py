"""Fail early, fail clearly: every bad input of a run ends with exit 2 and one `metaprox: error:` message naming
the key, file (and row) or value, before any work and leaving no run directory behind; a run whose parameters
stop being finite stops at that step, keeps its last finite checkpoint and says so."""

import errno
import os
from pathlib import Path

import pytest
import torch

import metaprox
from metaprox.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SINE = str(CONFIGS / "sine.toml")
TINY = ["--quiet", "--set", "outer.steps=4", "--set", "outer.meta_batch=2", "--set", "inner.steps=2",
        "--set", "eval.tasks=3", "--set", "eval.steps=[0,1]", "--set", "log.every=2",
        "--set", "log.checkpoint_every=2", "--set", "log.tensorboard=false"]


def _fails(capsys, argv, *fragments):
    """``main(argv)`` exits 2 with a one-message error holding every fragment; returns the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaprox: error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    return err


BAD_KEYS = [  # the matrix: once tracebacks, checked only after training, or silently accepted
    ("log.every=0", "log.every = 0: must be an integer ≥ 1"),
    ("log.checkpoint_every=0", "log.checkpoint_every = 0"),
    ("model.sizes=[2,40,1]", "sine tasks map 1 input to 1 output"),
    ("eval.tasks=0", "eval.tasks = 0"),
    ("outer.lr=1e39", "outer.lr = 1e+39"),
    ("outer.lr=inf", "outer.lr = inf"),
    ("outer.lr=nan", "outer.lr = nan"),
    ("eval.shots=[0]", "eval.shots = [0]"),
    ("eval.points=0", "eval.points = 0"),
    ("eval.lam=0", "eval.lam = 0"),
    ('eval.lam={"*"=-1.0}', "eval.lam['*'] = -1.0"),
    ("eval.lr=-1", "eval.lr = -1"),
    ("task.x_range=[1]", "task.x_range = [1]"),
    ("inner.steps=0", "inner.steps = 0: mmp would leave every task's solution at the prior"),
    ('device="cuda:99"', "device = 'cuda:99'"),
]


@pytest.mark.parametrize(("override", "message"), BAD_KEYS, ids=[b[0] for b in BAD_KEYS])
def test_bad_values_are_refused_before_any_work(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    _fails(capsys, ["train", SINE, "--out", str(out), *TINY, "--set", override], message)
    assert not out.exists()  # nothing was started, nothing half-written


def test_all_problems_are_listed_at_once(tmp_path, capsys):
    err = _fails(capsys, ["train", SINE, "--out", str(tmp_path / "r"), *TINY, "--set", "log.every=0",
                          "--set", "eval.tasks=0", "--set", "outer.lr=nan"], "3 problems, nothing was run")
    assert all(k in err for k in ("log.every", "eval.tasks", "outer.lr"))


def test_eval_keys_are_checked_by_eval_too(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", SINE, "--out", str(run), *TINY, "--no-eval"]) == 0
    capsys.readouterr()
    _fails(capsys, ["eval", str(run), "--set", "eval.points=0", "--set", "eval.lam=-2"], "2 problems",
           "eval.points = 0", "eval.lam = -2")


def test_eval_lam_table_is_the_number_for_one_group(tmp_path, capsys):
    """A test-time λ table {glob: λ} with one group adapts exactly as the number does (both via make_prox)."""
    import json

    run = tmp_path / "run"
    assert main(["train", SINE, "--out", str(run), *TINY, "--no-eval"]) == 0
    results = []
    for lam in ("0.7", '{"*" = 0.7}', "5.0"):
        assert main(["eval", str(run), "--set", f"eval.lam={lam}", "--set", "eval.steps=[0,3]"]) == 0
        results.append(json.loads((run / "eval.json").read_text())["sets"])
    assert results[0] == results[1]
    assert results[0] != results[2]  # and λ does matter here (from step 2 on: v ≠ w after the first step)


def test_eval_without_a_checkpoint_does_not_talk_about_resume(tmp_path, capsys):
    from metaprox.config import load_config
    from metaprox.rundir import write_config

    run = tmp_path / "run"
    run.mkdir()
    write_config(run, load_config(SINE))
    err = _fails(capsys, ["eval", str(run)], "no checkpoint", "has not saved one yet")
    assert "--resume" not in err


def test_out_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:  # root may write anywhere: play a read-only parent
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == parent else real(p, mode))
    else:
        parent.chmod(0o500)
    try:
        _fails(capsys, ["train", SINE, "--out", str(parent / "run"), *TINY], "cannot be created",
               "is not writable")
        _fails(capsys, ["train", SINE, "--out", str(parent), *TINY], "is not writable")
    finally:
        parent.chmod(0o700)


def test_a_full_disk_is_an_error_naming_the_file(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    _fails(capsys, ["train", SINE, "--out", str(tmp_path / "run"), *TINY], "no space left on the device writing",
           "config.json")
    monkeypatch.undo()
    assert not list((tmp_path / "run").glob(".*.tmp"))


# ----- config files and data ---------------------------------------------------------------------------------------

def test_config_files_of_the_wrong_shape(tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    _fails(capsys, ["train", str(tmp_path / "list.json"), "--out", str(tmp_path / "r")], "list.json",
           "must hold a table of keys", "not a list")


def test_malformed_yaml(tmp_path, capsys):
    pytest.importorskip("yaml")
    (tmp_path / "bad.yaml").write_text("outer: [1, 2\n  steps: 3\n")
    _fails(capsys, ["train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "r")], "is not valid YAML")


def test_missing_data_folder_and_split_list_are_named_before_training(tmp_path, capsys):
    fewshot = ["--set", 'task.family="fewshot"', "--set", 'model.kind="conv4"', "--set", "model.filters=4"]
    _fails(capsys, ["train", SINE, "--out", str(tmp_path / "a"), *TINY, *fewshot,
                    "--set", f'task.data_path="{tmp_path / "nowhere"}"'], "nowhere' does not exist")
    root = tmp_path / "omniglot"
    (root / "images_background").mkdir(parents=True)
    for split in ("train", "val"):
        (root / f"{split}.txt").write_text("A/character01/rot000\n")
    err = _fails(capsys, ["train", SINE, "--out", str(tmp_path / "b"), *TINY, *fewshot,
                          "--set", f'task.data_path="{root}"'], "test.txt' is missing")
    assert "train.txt" not in err
    assert not (tmp_path / "b").exists()
    # without the final evaluation the test list is not needed: the run gets past validation (to the images)
    assert "test.txt" not in _fails(capsys, ["train", SINE, "--out", str(tmp_path / "c"), *TINY, *fewshot,
                                             "--no-eval", "--set", f'task.data_path="{root}"'])


@pytest.mark.parametrize(("template", "message"), [
    ("", "is empty"),
    ("subject#,total_UPDRS\n1,2\n", "column 'Jitter(%)' missing"),
    ("<H>\n", "has a header but no data rows"),
    ("<H>\n<G>\n<B>\n", "row 3: could not convert string to float: 'x'"),
], ids=["empty", "no-column", "header-only", "bad-row"])
def test_csv_problems_name_file_and_row(tmp_path, capsys, template, message):
    from metaprox.data.multitask import PARKINSONS_VOICE

    cols = ["subject#", "total_UPDRS", *PARKINSONS_VOICE]
    good, bad = ",".join(["1"] * len(cols)), ",".join(["1"] * (len(cols) - 1) + ["x"])
    text = template.replace("<H>", ",".join(cols)).replace("<G>", good).replace("<B>", bad)
    (tmp_path / "parkinsons_updrs.csv").write_text(text)
    out = tmp_path / "run"
    _fails(capsys, ["train", str(CONFIGS / "parkinsons_finite_mmp.toml"), "--out", str(out), "--quiet",
                    "--set", f'task.data_path="{tmp_path}"'], "parkinsons_updrs.csv", message)
    assert not out.exists()


# ----- the library: silent misconfiguration and misleading messages --------------------------------------------------

def _learner(**kw):
    from conftest import linear_model

    return metaprox.MetaMinibatchProx(linear_model(), "mse", lam=1.0, **kw)


def test_an_optimizer_class_gets_outer_lr():
    learner = _learner(meta_optimizer=torch.optim.SGD, outer_lr=0.25)
    assert learner.optimizer.param_groups[0]["lr"] == 0.25  # was SGD's default 0.001, outer_lr ignored


def test_fractional_steps_and_empty_minibatches_are_refused():
    from conftest import linear_tasks

    learner = _learner()
    with pytest.raises(ValueError, match="whole number"):
        learner.adapt(linear_tasks(1)[0], steps=2.5)  # ran 2 steps
    with pytest.raises(ValueError, match="got no tasks"):
        learner.step([])  # talked about task weights


def test_loss_messages_say_what_is_wrong():
    from conftest import linear_tasks

    t = linear_tasks(1)[0]
    with pytest.raises(ValueError, match="floating-point targets.*cross_entropy"):
        _learner().step([metaprox.Task(t.x, t.y.round().long())])  # int labels with mse: cast silently
    x3 = torch.randn(6, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="flatten x"):
        _learner().step([metaprox.Task(x3, torch.zeros(6, 1, dtype=torch.float64))])  # advised reshaping y
    clf = metaprox.MetaMinibatchProx(torch.nn.Linear(3, 3).double(), "cross_entropy", lam=1.0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    tasks = [metaprox.Task(t.x[:6], labels), metaprox.Task(t.x[:6], labels.clone().fill_(3))]
    with pytest.raises(ValueError, match="label is out of range for the model's 3 outputs.*0..2"):
        clf.step(tasks)  # was a raw IndexError


# ----- divergence during training ----------------------------------------------------------------------------------

def test_non_finite_parameters_stop_the_run_and_the_last_finite_checkpoint_is_kept(tmp_path, poison_outer_step,
                                                                                   capsys):
    """An update that leaves a parameter NaN (with a finite meta-gradient, which the old guard checked) stops
    the run at that step naming the parameter; the checkpoint of step 2 — not one of step 3 holding NaN — is
    kept, and every tensor in it is finite."""
    from metaprox.checkpoint import load_checkpoint

    poison_outer_step(3, 2)
    run = tmp_path / "run"
    assert main(["train", SINE, "--out", str(run), *TINY, "--set", "log.checkpoint_every=1"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("metaprox: error: training stopped at step 2: parameter '") and "(nan)" in err, err
    assert "after outer step 3" in err and "last good checkpoint (step 2" in err, err
    state, _ = load_checkpoint(run)
    assert state["step"] == 2
    assert all(bool(torch.isfinite(t).all()) for t in state["params"].values())
    assert all(bool(torch.isfinite(t).all()) for st in state["optimizer"]["state"].values() for t in st.values()
               if isinstance(t, torch.Tensor))
    assert not (run / "eval.json").exists()


def test_divergence_before_any_checkpoint_says_there_is_nothing_to_resume(tmp_path, capsys):
    # outer.lr = 1e30: the first update is finite but huge, the second one's meta-gradient is not
    run = tmp_path / "run"
    assert main(["train", SINE, "--out", str(run), *TINY, "--set", "outer.lr=1e30", "--set",
                 "log.checkpoint_every=100", "--set", "outer.allow_unstable=true"]) == 3
    err = capsys.readouterr().err
    assert "training stopped at step" in err and "No checkpoint had been written yet" in err, err
    assert "last good checkpoint" not in err
    assert not (run / "checkpoint.json").exists()


# ----- optional extras ---------------------------------------------------------------------------------------------

def test_yaml_configs_read_like_toml(tmp_path):
    pytest.importorskip("yaml")
    from metaprox.config import load_config

    (tmp_path / "c.yaml").write_text("outer:\n  steps: 7\n  lr: 0.5\nlog:\n  tensorboard: false\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg["outer"]["steps"], cfg["outer"]["lr"], cfg["log"]["tensorboard"]) == (7, 0.5, False)


def test_tensorboard_true_without_tensorboard_is_refused_up_front(tmp_path, capsys):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    _fails(capsys, ["train", SINE, "--out", str(tmp_path / "r"), *TINY, "--set", "log.tensorboard=true"],
           "log.tensorboard = true", "metaprox[tensorboard]")
    assert not (tmp_path / "r").exists()


def test_a_prior_whose_predictions_overflow_is_not_reported_as_a_result(tmp_path, capsys):
    # outer.lr = 1e9 for 3 steps: the parameters stay finite (huge), the test loss at 0 steps is inf
    run = tmp_path / "run"
    assert main(["train", SINE, "--out", str(run), *TINY, "--set", "outer.steps=3", "--set", "outer.lr=1e9",
                 "--set", "log.every=1", "--set", "outer.allow_unstable=true"]) == 3  # was exit 0: `inf ± nan`
    err = capsys.readouterr().err
    assert "the test loss of the learned prior (after 0 steps) is inf" in err and "outer.lr = 1e+09" in err, err
    assert "last good checkpoint (step 3" in err
