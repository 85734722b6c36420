"""The pretrain-then-meta-train pipeline on a generated miniImageNet-layout fixture: augmentation, the feature map
and the prototype score against direct computations, the start from the pretrained backbone, the wall-clock
budgets, reuse of a finished pretraining, and the separate plain / transductive BatchNorm evaluations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaprox import pretrain as pretrain_module
from metaprox.build import build_family, build_learner, build_model
from metaprox.cli import main
from metaprox.config import ConfigError, apply_overrides, load_config, resolve
from metaprox.evaluate import bn_protocol
from metaprox.pretrain import _augment, embed, pretrain_backbone, prototype_accuracy, start_from_backbone
from metaprox.rundir import read_metrics
from metaprox.train import train

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(root: Path, **extra) -> dict:
    sets = {"task.data_path": str(root), "task.ways": 3, "task.train_shots": 2, "task.eval_queries": 2,
            "task.decode_workers": 1, "model.filters": 4, "pretrain.epochs": 2, "pretrain.batch_size": 8,
            "pretrain.crop_pad": 4, "inner.steps": 2, "outer.steps": 4, "outer.meta_batch": 2, "eval.tasks": 4,
            "eval.steps": [0, 2], "log.every": 1, "log.eval_every": 2, "log.eval_tasks": 3,
            "log.checkpoint_every": 2, "log.tensorboard": "false", **extra}
    return load_config(ROOT / "configs" / "miniimagenet_5w1s_mmp_pretrain.toml",
                       [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def test_augment_flips_and_crops_each_image_by_itself():
    torch.manual_seed(0)
    x = torch.rand(16, 2, 5, 6)
    out = _augment(x, flip=True, pad=2, g=torch.Generator().manual_seed(3))
    flipped = 0
    for i in range(16):  # ground truth: some flip of image i, zero-padded, cropped at some offset
        matches = []
        for mirror in (False, True):
            src = torch.nn.functional.pad(x[i].flip(-1) if mirror else x[i], (2, 2, 2, 2))
            matches += [mirror for dy in range(5) for dx in range(5)
                        if torch.equal(src[:, dy:dy + 5, dx:dx + 6], out[i])]
        assert matches, f"image {i} is no flipped crop of its input"
        flipped += matches[0]
    assert 0 < flipped < 16  # both outcomes occur
    assert torch.equal(_augment(x, flip=False, pad=0, g=torch.Generator()), x)


def test_features_and_prototype_score_match_direct_computation(mini_root):
    cfg = tiny_cfg(mini_root)
    model = build_model(cfg)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.rand(7, 3, 84, 84)
    feats = embed(model, params, x)
    torch.testing.assert_close(feats @ params["head.weight"].T + params["head.bias"], model(x))
    batch = build_family(cfg).eval_sampler("val").sample_batch(5, torch.Generator().manual_seed(1))
    want = []
    for t in range(5):  # nearest centroid, written out
        fs, fq = embed(model, params, batch.x[t]), embed(model, params, batch.x_query[t])
        cents = torch.stack([fs[batch.y[t] == k].mean(0) for k in range(3)])
        d = ((fq[:, None] - cents[None]) ** 2).sum(-1)
        want.append(float((d.argmin(1) == batch.y_query[t]).double().mean()))
    assert prototype_accuracy(model, params, batch).tolist() == pytest.approx(want, abs=1e-12)


def test_pretrained_backbone_starts_meta_training_and_is_reused(mini_root, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = tiny_cfg(mini_root)
    family = build_family(cfg)
    backbone, summary = pretrain_backbone(cfg, family, tmp_path)
    rows = read_metrics(tmp_path, "pretrain_curve.jsonl")
    per_epoch = (4 * 8) // 8
    assert [r["step"] for r in rows] == [per_epoch, 2 * per_epoch] and summary["steps"] == 2 * per_epoch
    assert summary["step"] in (per_epoch, 2 * per_epoch)  # the validation-best of the two
    assert summary["val_prototype_accuracy"] == max(r["val_prototype_accuracy"] for r in rows)
    assert rows[-1]["lr"] < 0.1 * cfg["pretrain"]["lr"]  # the cosine schedule reached its end
    assert sorted(backbone) == sorted(n for n, _ in build_model(cfg).named_parameters() if not n.startswith("head"))

    learner = build_learner(cfg)
    start_from_backbone(learner, backbone)
    for name, p in zip(learner.names, learner.fmodel.params(), strict=True):
        if name.startswith("head."):
            assert not p.any()
        else:
            assert torch.equal(p, backbone[name])

    class Retrained(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Retrained

    monkeypatch.setattr(pretrain_module, "_augment", refuse)
    again, summary2 = pretrain_backbone(cfg, family, tmp_path)  # same settings: the stored backbone
    assert summary2 == {**summary} and all(torch.equal(again[k], backbone[k]) for k in backbone)
    other = resolve(apply_overrides(cfg, ["task.shots=2", f'pretrain.backbone="{tmp_path}"']))
    shared, summary3 = pretrain_backbone(other, family, tmp_path / "five-shot")  # another run's backbone
    assert summary3["seconds"] == summary["seconds"] and all(torch.equal(shared[k], backbone[k]) for k in backbone)
    assert json.loads((tmp_path / "five-shot" / "pretrain.json").read_text())["source"] == str(tmp_path)
    with pytest.raises(ConfigError, match="no intact pretrain"):
        pretrain_backbone(resolve(apply_overrides(cfg, [f'pretrain.backbone="{tmp_path / "x"}"'])), family, tmp_path)
    changed = resolve(apply_overrides(cfg, ["pretrain.lr=0.01"]))
    with pytest.raises(Retrained):
        pretrain_backbone(changed, family, tmp_path)


def test_time_budgets_end_both_phases_and_the_run_is_evaluated(mini_root, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_cfg(mini_root, **{"pretrain.epochs": 1000, "pretrain.minutes": 0.002, "outer.steps": 10**6,
                                 "outer.minutes": 0.001})
    result = train(cfg, tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "pretrain.json").read_text())
    assert 0.12 <= summary["seconds"] < 5 and summary["steps"] < 1000 * 4  # stopped by the clock
    val = read_metrics(tmp_path / "run", "val_curve.jsonl")
    metrics = read_metrics(tmp_path / "run")
    assert val[0]["step"] == 0 and val[0]["time"] == pytest.approx(summary["seconds"], abs=0.05)
    assert 1 <= metrics[-1]["step"] < 10**6 and metrics[-1]["time"] > summary["seconds"]
    assert val[-1]["step"] == metrics[-1]["step"]  # validated where the budget ended it
    assert result["step"] == metrics[-1]["step"] and (tmp_path / "run" / "eval.json").is_file()
    assert 0.0 <= result["sets"]["3-way 1-shot"]["2"]["accuracy"] <= 1.0
    for plot in ("val_curve.png", "adaptation.png"):  # the time-to-accuracy curve starts with pretraining
        assert (tmp_path / "run" / "plots" / plot).stat().st_size > 1000


def test_plain_and_transductive_batchnorm_are_separate_evaluations(mini_root, tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    cfg = tiny_cfg(mini_root, **{"pretrain.epochs": 1, "outer.steps": 2, "log.eval_every": 0})
    train(cfg, out, progress=False, evaluate=False)
    results = {}
    for bn in ("batch", "transductive"):
        assert main(["eval", str(out), "--json", "--set", f'eval.bn="{bn}"', "--set", 'device="cpu"',
                     "--set", f'task.data_path="{mini_root}"']) == 0
        results[bn] = json.loads(capsys.readouterr().out)
        assert results[bn]["test_time"]["bn"] == bn and (out / f"eval-bn_{bn}.json").is_file()
    assert main(["eval", str(out), "--json"]) == 0  # the model's own protocol (model.bn = "batch")
    default = json.loads(capsys.readouterr().out)
    assert default["sets"] == results["batch"]["sets"]
    assert main(["eval", str(out), "--set", "model.filters=8"]) == 2
    assert "eval accepts only" in capsys.readouterr().err
    table = subprocess.run([sys.executable, str(ROOT / "experiments" / "miniimagenet_report.py"), str(out)],
                           capture_output=True, text=True, check=True).stdout
    files = (("plain", "eval.json"), ("plain", "eval-bn_batch.json"), ("transductive", "eval-bn_transductive.json"))
    for bn, f in files:
        row = next(line for line in table.splitlines() if f"(`{f}`)" in line)
        acc = json.loads((out / f).read_text())["sets"]["3-way 1-shot"]["2"]
        assert f"| {bn} |" in row and f"{100 * acc['accuracy']:.2f} ± {100 * acc['accuracy_ci95']:.2f}" in row


def test_bn_protocol_restores_and_refuses_running_statistics(mini_root):
    model = build_model(tiny_cfg(mini_root))
    with bn_protocol(model, "transductive") as bn:
        assert bn == model.bn == "transductive"
    assert model.bn == "batch"
    running = build_model(tiny_cfg(mini_root, **{"model.bn": "running"}))
    with pytest.raises(ConfigError, match="model.bn = 'running'"):
        with bn_protocol(running, "batch"):
            pass


def test_bf16_autocast_steps_stay_close_to_float32_and_bad_precision_is_refused(mini_root, tmp_path):
    """pretrain.precision = "bfloat16" changes the arithmetic (the backbone differs from float32's) but not the
    training: after one epoch (4 SGD steps) the weights moved alike. bf16 keeps ~3 digits and BatchNorm's backward
    cancels (execution.py), so on this 4-filter net the difference is 3–47 % of the change per tensor, 18 %
    overall; a wrong cast or a lost update would be ≥ 100 %. Accuracy itself is judged on validation."""
    torch.set_num_threads(1)
    cfg = tiny_cfg(mini_root, **{"pretrain.epochs": 1})
    torch.manual_seed(cfg["seed"])  # the initialisation pretraining starts from
    start = {k: v.detach().clone() for k, v in build_model(cfg).named_parameters() if not k.startswith("head")}
    out = {}
    for precision in ("float32", "bfloat16"):
        cfg = tiny_cfg(mini_root, **{"pretrain.epochs": 1, "pretrain.precision": precision})
        out[precision], _ = pretrain_backbone(cfg, build_family(cfg), tmp_path / precision)
    flat = {k: torch.cat([v[n].flatten() for n in sorted(start)]) for k, v in out.items()}
    moved = (flat["float32"] - torch.cat([start[n].flatten() for n in sorted(start)])).norm()
    assert not torch.equal(flat["bfloat16"], flat["float32"]) and moved > 0
    assert (flat["bfloat16"] - flat["float32"]).norm() <= 0.35 * moved
    with pytest.raises(ConfigError, match="pretrain.precision"):
        tiny_cfg(mini_root, **{"pretrain.precision": "float16"})
