"""eval.bn = "population": BatchNorm statistics of the prior on training images, against a direct computation; the
protocol is non-transductive and restores the model; the whole evaluation path (head init, solve, prediction) uses
it; and bad settings are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metaprox import population_bn as population_module
from metaprox.build import build_family, build_learner
from metaprox.cli import main
from metaprox.config import ConfigError, load_config
from metaprox.evaluate import bn_for_evaluation
from metaprox.population_bn import population_bn, training_images
from metaprox.pretrain import embed
from metaprox.train import train
from test_pretrain import tiny_cfg as pretrain_cfg

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(root: Path, **extra) -> dict:
    """test_pretrain's tiny run, shorter, with the population estimate over all 32 training images."""
    return pretrain_cfg(root, **{"pretrain.epochs": 1, "outer.steps": 2, "eval.tasks": 6, "log.eval_every": 0,
                                 "eval.bn_images": 32, **extra})


def _perturbed_learner(cfg: dict):
    """A learner whose BatchNorm affine parameters are not the identity (so a wrong normalisation shows)."""
    torch.manual_seed(3)
    learner = build_learner(cfg)
    with torch.no_grad():
        for name, p in zip(learner.names, learner.fmodel.params(), strict=True):
            if name.startswith("norm"):
                p.add_(0.3 * torch.randn_like(p))
    return learner


def _direct_statistics(params: dict[str, torch.Tensor], x: torch.Tensor, batch: int) -> list[tuple]:
    """Per layer: the average over batches of the pre-BatchNorm activations' mean and unbiased variance, each
    batch normalised by its own statistics (training-mode BatchNorm), written out with plain tensor ops."""
    sums: list[list[torch.Tensor]] = [[torch.zeros(0)] * 2 for _ in range(4)]
    count = 0
    for lo in range(0, x.shape[0], batch):
        h = x[lo:lo + batch]
        count += 1
        for i in range(4):
            a = F.conv2d(h, params[f"conv{i}.weight"], padding=1)
            mean, var = a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=True)
            sums[i] = [mean if count == 1 else sums[i][0] + mean, var if count == 1 else sums[i][1] + var]
            biased = a.var((0, 2, 3), unbiased=False)
            z = (a - mean.view(1, -1, 1, 1)) / torch.sqrt(biased.view(1, -1, 1, 1) + 1e-5)
            z = z * params[f"norm{i}.weight"].view(1, -1, 1, 1) + params[f"norm{i}.bias"].view(1, -1, 1, 1)
            h = F.relu(F.max_pool2d(z, 2))
    return [(m / count, v / count) for m, v in sums]


@pytest.mark.parametrize("batch", [8, 128])  # four batches of the 32 images, or all of them at once
def test_statistics_match_a_direct_computation_and_the_model_is_restored(mini_root, monkeypatch, batch):
    torch.set_num_threads(1)
    cfg = tiny_cfg(mini_root)
    family = build_family(cfg)
    learner = _perturbed_learner(cfg)
    module = learner.fmodel.module
    monkeypatch.setattr(population_module, "BATCH", batch)
    images, scale = training_images(family, 32, seed=5)
    assert images.dtype == torch.uint8 and images.shape[0] == 32
    params = dict(zip(learner.names, (p.detach() for p in learner.fmodel.params()), strict=True))
    want = _direct_statistics(params, images.float() * scale, batch)
    module.train()
    with population_bn(learner, images, scale) as bn:
        assert bn == "population" and module.bn == "running" and not module.training
        for i, (mean, var) in enumerate(want):
            norm = getattr(module, f"norm{i}")
            torch.testing.assert_close(norm.running_mean, mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(norm.running_var, var, rtol=1e-4, atol=1e-5)
    assert module.bn == "batch" and module.training and learner.fmodel.buffers == {}
    assert all(getattr(module, f"norm{i}").running_mean is None for i in range(4))


def test_predictions_are_non_transductive_and_normalised_by_the_statistics(mini_root):
    torch.set_num_threads(1)
    cfg = tiny_cfg(mini_root)
    family = build_family(cfg)
    learner = _perturbed_learner(cfg)
    module = learner.fmodel.module
    episode = family.eval_sampler("val").sample_batch(1, torch.Generator().manual_seed(2)).tasks()[0]
    params = dict(zip(learner.names, (p.detach() for p in learner.fmodel.params()), strict=True))
    with population_bn(learner, *training_images(family, 32, seed=5)):
        logits = module.predict(episode.x, episode.x_query, params)
        alone = torch.cat([module.predict(episode.x, episode.x_query[j:j + 1], params)
                           for j in range(episode.x_query.shape[0])])
        torch.testing.assert_close(alone, logits, rtol=1e-5, atol=1e-6)  # no query sees another
        h = episode.x_query
        for i in range(4):  # eval-mode BatchNorm with the estimated statistics, written out
            norm = getattr(module, f"norm{i}")
            a = F.conv2d(h, params[f"conv{i}.weight"], padding=1)
            z = (a - norm.running_mean.view(1, -1, 1, 1)) / torch.sqrt(norm.running_var.view(1, -1, 1, 1) + 1e-5)
            h = F.relu(F.max_pool2d(z * params[f"norm{i}.weight"].view(1, -1, 1, 1)
                                    + params[f"norm{i}.bias"].view(1, -1, 1, 1), 2))
        direct = h.flatten(1) @ params["head.weight"].T + params["head.bias"]
        torch.testing.assert_close(logits, direct, rtol=1e-4, atol=1e-5)
    transductive = module.predict(episode.x, episode.x_query, params)  # the model's own protocol again
    assert not torch.allclose(transductive, logits, atol=1e-3)


def test_evaluation_uses_the_statistics_throughout(mini_root, tmp_path, capsys):
    """Step 0 with the prototype head under population BN is the nearest centroid (cosine rows: the head sees
    normalised features) of features normalised with the statistics — computed here from the run's prior."""
    torch.set_num_threads(1)
    out = tmp_path / "run"
    cfg = tiny_cfg(mini_root, **{"model.cosine_scale": 10.0})
    train(cfg, out, progress=False, evaluate=False)
    sets = ["--set", f'task.data_path="{mini_root}"', "--set", 'eval.bn="population"', "--set",
            'eval.head_init="prototypes"', "--set", "eval.bn_images=32"]
    assert main(["eval", str(out), "--json", *sets]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_time"]["bn"] == "population" and (out / "eval-bn_population-head_prototypes.json").is_file()
    assert "population BN" in (out / "eval-bn_population-head_prototypes.md").read_text()
    got = result["sets"]["3-way 1-shot"]["0"]["accuracy"]

    from metaprox.rundir import load_learner

    learner, run_cfg, _ = load_learner(out)
    family = build_family({**run_cfg, "task": {**run_cfg["task"], "data_path": str(mini_root)}})
    tasks = family.eval_sets("test")["3-way 1-shot"]
    params = dict(zip(learner.names, (p.detach() for p in learner.fmodel.params()), strict=True))
    correct = []
    with population_bn(learner, *training_images(family, 32, seed=run_cfg["eval"]["val_seed"])):
        for t in tasks:
            fs, fq = (F.normalize(embed(learner.fmodel.module, params, x), dim=-1) for x in (t.x, t.x_query))
            cents = F.normalize(torch.stack([fs[t.y == k].mean(0) for k in range(3)]), dim=-1)
            correct.append(float(((fq @ cents.T).argmax(1) == t.y_query).double().mean()))
    assert got == pytest.approx(sum(correct) / len(correct), abs=1e-12)


def test_bad_settings_are_refused(mini_root):
    with pytest.raises(ConfigError, match="few-shot family"):
        load_config(ROOT / "configs" / "sine.toml", ['eval.bn="population"'])
    with pytest.raises(ConfigError, match="bn_images"):
        tiny_cfg(mini_root, **{"eval.bn_images": 1})
    with pytest.raises(ConfigError, match="choose"):
        tiny_cfg(mini_root, **{"eval.bn": "populations"})
    running = tiny_cfg(mini_root, **{"model.bn": "running"})
    learner = build_learner(running)
    with pytest.raises(ConfigError, match="model.bn = 'running'"):
        with bn_for_evaluation(learner, "population", (torch.zeros(4, 3, 12, 12, dtype=torch.uint8), 1 / 255)):
            pass
