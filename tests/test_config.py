import pytest

from metaprox.config import ConfigError, apply_overrides, load_config, parse_value, resolve


def test_defaults_fill_in_and_overrides_parse():
    cfg = resolve(apply_overrides({}, ["outer.lr=0.5", "eval.shots=[5]", "name=\"x\"", "prox.lam=2"]))
    assert cfg["outer"]["lr"] == 0.5 and cfg["eval"]["shots"] == [5] and cfg["name"] == "x"
    assert cfg["inner"]["steps"] == 15
    assert parse_value("true") is True and parse_value("abc") == "abc"


@pytest.mark.parametrize("cfg,msg", [
    ({"outer": {"lrr": 1.0}}, "unknown config key 'outer.lrr'"),
    ({"optimiser": 1}, "unknown config key 'optimiser'"),
    ({"outer": {"lr": "fast"}}, "must be a number"),
    ({"outer": {"meta_batch": 2.5}}, "must be an integer"),
    ({"prox": {"lam": 0}}, "mmp needs λ > 0"),
    ({"prox": {"lam": -1.0}}, "λ must be > 0"),
    ({"inner": 3}, "must be a table"),
    ({"eval": {"steps": []}}, "non-empty"),
])
def test_bad_configs_are_named(cfg, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve(cfg)


def test_bad_override_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["outer.lr"])
    with pytest.raises(ConfigError, match="unknown config section 'outr'"):
        apply_overrides({}, ["outr.lr=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[outer\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.toml"))
    assert files
    for f in files:  # compare_*.toml are `metaprox compare` configs (a run config per algorithm inside)
        if f.name.startswith("compare_"):
            from metaprox.compare import load_compare_config

            load_compare_config(f)
        else:
            load_config(f)


def test_cosine_scale_is_conv4_only():
    from metaprox.build import build_model

    cfg = resolve({"model": {"kind": "mlp", "cosine_scale": 10.0}})
    with pytest.raises(ConfigError, match="cosine_scale applies to model.kind = 'conv4' only"):
        build_model(cfg)
    conv = resolve({"task": {"family": "fewshot", "dataset": "omniglot", "ways": 5},
                    "model": {"kind": "conv4", "filters": 4, "cosine_scale": 10.0}})
    assert build_model(conv).cosine_scale == 10.0
