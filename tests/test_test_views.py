"""eval.views = "flip": the head sees each image's features averaged with its mirror image's — against the features
written out per view, in every BatchNorm mode and task layout, for Conv-4 (plain and cosine head) and ResNet-12;
the whole evaluation path uses it; running statistics see each image once; bad settings are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metaprox.build import build_family, build_learner
from metaprox.cli import main
from metaprox.config import ConfigError, load_config
from metaprox.models.conv4 import Conv4
from metaprox.models.resnet12 import ResNet12
from metaprox.population_bn import population_bn, training_images
from metaprox.pretrain import embed
from metaprox.test_views import check_views, using_views
from metaprox.train import train
from test_population_bn import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
TINY = (4, 6, 8, 8)


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    models = {"conv4": Conv4(3, 4, filters=5, image_size=20), "conv4-cosine": Conv4(3, 4, filters=5, image_size=20,
                                                                                    cosine_scale=7.0),
              "resnet12": ResNet12(3, 4, widths=TINY)}
    with torch.no_grad():  # BatchNorm affine parameters away from the identity, so a wrong normalisation shows
        for m in models.values():
            for name, p in m.named_parameters():
                if "norm" in name or "bn_" in name:
                    p.add_(0.3 * torch.randn_like(p))
    return models


def _direct_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The flip-view logits written out: the features (before any cosine normalisation) of x and of x mirrored,
    each view computed alone with the model seeing images as they are, averaged, then the head."""
    params = dict(model.named_parameters())
    scale = getattr(model, "cosine_scale", 0.0)
    model.cosine_scale = 0.0
    try:
        feats = (embed(model, params, x) + embed(model, params, torch.flip(x, dims=[3]))) / 2
    finally:
        model.cosine_scale = scale
    if scale:
        feats = F.normalize(feats, dim=-1) * scale
    return feats @ params["head.weight"].T + params["head.bias"]


@pytest.mark.parametrize("bn", ["batch", "transductive", "running"])
@pytest.mark.parametrize("name", ["conv4", "conv4-cosine", "resnet12"])
def test_flip_views_average_the_features_of_each_image_and_its_mirror(name, bn):
    model = _models()[name]
    model.bn = bn
    if bn == "running":
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean = 0.1 * torch.randn(m.num_features)
                m.running_var = 0.5 + torch.rand(m.num_features)
        model.eval()
    x = torch.randn(6, 3, 20, 20)
    assert model.test_views == "image"
    direct = _direct_logits(model, x)
    plain = model(x)
    model.test_views = "flip"
    got = model(x)
    torch.testing.assert_close(got, direct, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the mirror view changes the logits
    torch.testing.assert_close(model(torch.flip(x, dims=[3])), got, rtol=1e-5, atol=1e-6)  # the pair is the same
    # many tasks at once, either layout, equal the one-task forward per task
    params = {k: torch.stack([v, v + 0.01 * torch.randn_like(v)]) for k, v in model.named_parameters()}
    xs = torch.randn(2, 5, 3, 20, 20)
    loop = torch.stack([torch.func.functional_call(model, {k: v[i] for k, v in params.items()}, (xs[i],))
                        for i in range(2)])
    for layout in ("grouped", "per_task"):
        model.task_layout = layout
        torch.testing.assert_close(model.forward_batched(params, xs), loop, rtol=1e-4, atol=1e-5)


def test_running_statistics_see_each_image_once():
    stats = {}
    for views in ("image", "flip"):
        torch.manual_seed(0)
        model = Conv4(3, 4, filters=5, image_size=20, bn="running")
        model.test_views = views
        model.update_running_stats(torch.randn(8, 3, 20, 20, generator=torch.Generator().manual_seed(1)))
        stats[views] = [b.clone() for b in model.buffers()]
    for a, b in zip(stats["image"], stats["flip"], strict=True):
        assert torch.equal(a, b)


def test_evaluation_uses_the_views_throughout(mini_root, tmp_path, capsys):
    """Step 0 with the prototype head, population BN and flip views is the cosine nearest centroid of the
    view-averaged features — computed here from the run's prior; the model sees plain images again after."""
    torch.set_num_threads(1)
    out = tmp_path / "run"
    cfg = tiny_cfg(mini_root, **{"model.cosine_scale": 10.0})
    train(cfg, out, progress=False, evaluate=False)
    sets = ["--set", f'task.data_path="{mini_root}"', "--set", 'eval.bn="population"', "--set",
            'eval.head_init="prototypes"', "--set", "eval.bn_images=32", "--set", 'eval.views="flip"']
    assert main(["eval", str(out), "--json", *sets]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_time"]["views"] == "flip"
    stem = "eval-bn_population-head_prototypes-views_flip"
    assert (out / f"{stem}.json").is_file() and "flip views" in (out / f"{stem}.md").read_text()
    got = result["sets"]["3-way 1-shot"]["0"]["accuracy"]

    from metaprox.rundir import load_learner

    learner, run_cfg, _ = load_learner(out)
    module = learner.fmodel.module
    family = build_family({**run_cfg, "task": {**run_cfg["task"], "data_path": str(mini_root)}})
    tasks = family.eval_sets("test")["3-way 1-shot"]
    params = dict(zip(learner.names, (p.detach() for p in learner.fmodel.params()), strict=True))
    correct, plain = [], []
    with population_bn(learner, *training_images(family, 32, seed=run_cfg["eval"]["val_seed"])):
        for t in tasks:
            for views, acc in (("flip", correct), ("image", plain)):
                def features(x, views=views):
                    f = embed(module, params, x)
                    return (f + embed(module, params, x.flip(-1))) / 2 if views == "flip" else f
                fs, fq = (F.normalize(features(x), dim=-1) for x in (t.x, t.x_query))
                cents = F.normalize(torch.stack([fs[t.y == k].mean(0) for k in range(3)]), dim=-1)
                acc.append(float(((fq @ cents.T).argmax(1) == t.y_query).double().mean()))
    assert got == pytest.approx(sum(correct) / len(correct), abs=1e-12)
    assert module.test_views == "image"
    with using_views(learner, "flip"):
        assert module.test_views == "flip"
    assert module.test_views == "image"


def test_bad_settings_are_refused(mini_root):
    with pytest.raises(ConfigError, match="choose 'image'"):
        tiny_cfg(mini_root, **{"eval.views": "mirror"})
    with pytest.raises(ConfigError, match="mirrors images"):
        load_config(ROOT / "configs" / "sine.toml", ['eval.views="flip"'])
    sine = build_learner(load_config(ROOT / "configs" / "sine.toml"))
    with pytest.raises(ValueError, match="Conv-4 or ResNet-12"):
        check_views(sine, "flip")
    with using_views(sine, "image"):  # the default is accepted for any model
        pass
    model = Conv4(3, 4, filters=5, image_size=20)
    model.test_views = "mirror"
    with pytest.raises(ValueError, match="unknown test_views"):
        model(torch.randn(2, 3, 20, 20))
