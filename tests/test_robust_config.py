"""prox.robust_scale: the robust pull from a config (task streams) — it is the squared pull as δ → ∞, a different
learner at finite δ, and the combinations the composition matrix refuses are listed before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metaprox.build import build_family, build_learner
from metaprox.config import apply_overrides, load_config, resolve
from metaprox.prox import RobustL2, SquaredL2
from metaprox.validate import config_problems

SINE = Path(__file__).resolve().parents[1] / "configs" / "sine.toml"


def _cfg(**sets):
    base = {"outer.steps": 3, "outer.meta_batch": 4, "inner.steps": 3, **sets}
    raw = {k: (v if isinstance(v, str) and v.startswith("{") else json.dumps(v)) for k, v in base.items()}
    return resolve(apply_overrides(load_config(SINE), [f"{k}={v}" for k, v in raw.items()]))  # tables as TOML


def _center_after_steps(cfg) -> list[torch.Tensor]:
    learner = build_learner(cfg)
    family, g = build_family(cfg), torch.Generator().manual_seed(0)
    for _ in range(cfg["outer"]["steps"]):
        learner.step(family.train_batch(cfg["outer"]["meta_batch"], g))
    return [p.detach().clone() for p in learner.fmodel.params()]


def test_robust_pull_from_config_is_squared_l2_as_delta_grows_and_differs_at_finite_delta():
    torch.set_num_threads(1)
    squared = _cfg()
    assert isinstance(build_learner(squared).prox, SquaredL2)
    wide, narrow = _cfg(**{"prox.robust_scale": 1e6}), _cfg(**{"prox.robust_scale": 0.05})
    assert isinstance(build_learner(narrow).prox, RobustL2) and build_learner(narrow).prox.delta2 == 0.05 ** 2
    ref = _center_after_steps(squared)
    for a, b in zip(_center_after_steps(wide), ref, strict=True):  # 1/(1 + ‖v − c‖²/δ²) = 1 − O(1e-12)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(_center_after_steps(narrow), ref, strict=True))


@pytest.mark.parametrize(("sets", "fragments"), [
    ({"algorithm": "imaml"}, ["algorithm = 'imaml'", "squared-ℓ2 pull"]),
    ({"algorithm": "maml", "prox.lam": 0.5}, ["algorithm = 'maml'", "unrolled"]),
    ({"prox.lam": '{"*" = 0.5}'}, ["needs one λ > 0"]),
])
def test_robust_pull_problems_are_listed(sets, fragments):
    problems = config_problems(_cfg(**{"prox.robust_scale": 1.0, **sets}), evaluate=False)
    text = "\n".join(problems)
    for f in fragments:
        assert f in text, (f, problems)


def test_bad_robust_scale_is_named():
    problems = config_problems(_cfg(**{"prox.robust_scale": -1.0}), evaluate=False)
    assert any("prox.robust_scale = -1.0" in p for p in problems), problems
