"""Divergence is an error: ηλ ≥ 2 refused up front (unless allowed), and a finite run whose meta-gradient norm or
objective explodes stops with a message naming the step — with monitoring on or off."""

from __future__ import annotations

import json

import pytest

from metaprox.cli import main
from metaprox.config import ConfigError, apply_overrides, resolve
from metaprox.stability import DivergenceGuard, check_outer_step, outer_interpolation
from metaprox.train import TrainingDiverged
from test_finite_table import write_config, write_table


def test_outer_step_eta_lambda_at_least_two_is_refused_unless_allowed():
    base = ["algorithm=\"finite_mmp\"", "task.family=\"multitask\"", "prox.lam={ weight = 10.0, bias = \"private\" }"]
    assert outer_interpolation(resolve(apply_overrides({}, base + ["outer.lr=0.1"]))) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match=r"ηλ = 5 \(λ = 10\).*outer.lr < 0.2.*outer.allow_unstable = true"):
        check_outer_step(resolve(apply_overrides({}, base + ["outer.lr=0.5"])))
    check_outer_step(resolve(apply_overrides({}, base + ["outer.lr=0.5", "outer.allow_unstable=true"])))
    # not a plain gradient step on the envelope: nothing to refuse
    for extra in (["finite.center_update=\"exact\""], ["outer.optimizer=\"adam\""]):
        assert outer_interpolation(resolve(apply_overrides({}, base + ["outer.lr=0.5", *extra]))) is None
    with pytest.raises(ConfigError, match="ηλ = 2"):  # the infinite-task MMP too
        check_outer_step(resolve(apply_overrides({}, ["prox.lam=4.0", "outer.lr=0.5"])))


def test_guard_stops_on_growth_and_non_finite_values():
    guard = DivergenceGuard(100.0)
    guard.check(1, meta_grad_norm=2.0, J=None)
    guard.check(2, meta_grad_norm=150.0, J=10.0)  # 75× the first gradient norm: still allowed
    with pytest.raises(TrainingDiverged, match=r"outer step 3: meta_grad_norm = 201 is 100× its first value 2"):
        guard.check(3, meta_grad_norm=201.0)
    with pytest.raises(TrainingDiverged, match="outer step 4: J = nan"):
        guard.check(4, J=float("nan"))
    DivergenceGuard(0.0).check(5, meta_grad_norm=1e300)  # 0 turns the growth test off


@pytest.mark.parametrize("every", [1, 1000])  # monitoring on every step, or (almost) never
def test_unstable_finite_run_stops_naming_the_step(tmp_path, capsys, every):
    cfg = write_config(tmp_path / "c.toml", write_table(tmp_path / "t.csv"), **{
        "prox.lam": '{ weight = 10.0, bias = "private" }', "outer.lr": "3.0", "outer.allow_unstable": "true",
        "inner.solver": '"exact_least_squares"',  # exact envelope gradients: the iteration is plain GD on Σ φ_t
        "outer.steps": "300", "log.every": str(every), "log.checkpoint_every": "1000", "finite.sample": '"all"'})
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "metaprox: error: training diverged at outer step" in err and "ηλ = outer.lr × λ" in err
    step = int(err.split("outer step ")[1].split(":")[0])
    assert step < 100  # it grows geometrically: caught long before the end
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == (step if every == 1 else 0)  # the rows up to the step, the exploding one included
    if rows:
        assert json.loads(rows[-1])["step"] == step
