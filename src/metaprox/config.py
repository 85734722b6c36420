"""Run configuration: TOML (or YAML) files under ``configs/``, defaults, validation and ``--set`` overrides.

A config is a nested dict with a fixed schema (``DEFAULTS``). Unknown keys are errors (a typo must not
silently run the default), and every value is type-checked against its default. The resolved config is written
to the run directory as ``config.json``; figures and tables take their labels from it.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metaprox.composition import kinds_refusal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DEFAULTS", "ConfigError", "load_config", "resolve", "apply_overrides", "parse_value", "KIND_KEYS",
           "kind_config"]


class ConfigError(ValueError):
    """A config file or override is malformed: unknown key, wrong type or impossible value."""


# The schema: every key a run understands, with its default. ``None`` means "optional / derived".
DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 0,
    "device": "cpu",
    "algorithm": "mmp",
    "execution": "auto",
    "precision": "fp32",           # "bf16": model forward/backward under bfloat16 autocast (speed only)
    "threads": 0,                  # intra-op threads of the CLI; 0: chosen from the work size (metaprox.threads)
    "task": {
        "family": "sine",
        "train_points": 50,        # support points per meta-training task
        "query_points": 0,         # query points per meta-training task (MAML-family rules)
        "amp_range": [0.1, 5.0],
        "phase_range": [0.0, 6.283185307179586],
        "x_range": [-5.0, 5.0],
        # few-shot classification (family = "fewshot")
        "dataset": "omniglot",
        "data_path": None,         # None: $METAPROX_DATA/<dataset>
        "cache_dir": None,         # decoded-image cache (miniImageNet); None: $METAPROX_CACHE or ~/.cache/metaprox
        "decode_workers": 0,       # processes decoding images into the cache (0: one per CPU, at most 16)
        "split": "vinyals",        # omniglot: "vinyals" | "background"; others: "standard"
        "val_alphabets": 5,        # "background" split: background alphabets held out for validation
        "ways": 5,
        "shots": 1,                # support images per class of test episodes
        "train_shots": 0,          # support images per class when meta-training (0: = shots)
        "queries": 0,              # query images per class when meta-training (MAML-family rules)
        "eval_queries": 15,        # query images per class of evaluation episodes
        "rotations": False,        # 90° rotations as new training classes
        "group_by": None,          # "alphabet" (omniglot): episodes within one group, the group is the task's node
                                   # in a tree prior over the stream (prior.kind = "tree"; metaprox.tasks.grouped)
        # finite tabular task sets (family = "multitask", algorithm = "finite_mmp")
        "train_frac": 0.75,        # share of each task's rows kept from the test split (when test_frac is None)
        "split_seed": 0,
        "test_frac": None,         # share of each task's rows held out for test (None: 1 − train_frac)
        "val_frac": 0.0,           # share of each task's rows for validation (`metaprox eval RUN --split val`)
        "file": None,              # a table of one's own (.csv/.npz/.parquet; metaprox.data.table) instead of a preset
        "task_column": "task",     # its column naming each row's task
        "target": None,            # its target column, or a list of them (None: "y")
        "features": None,          # its feature columns (None: every other column)
        "task_type": None,         # "regression" | "binary" | "multiclass" (None: regression, or the preset's)
        "split_column": None,      # a column of train/val/test per row instead of test_frac/val_frac
        "standardize": "global",   # features scaled with training-row statistics: "global" | "per_task" | "none"
        "kinds": [],               # [[task.kinds]]: one table (or preset) per task kind, each with `name` and the
                                   # keys above (KIND_KEYS; unset ones from [task]); a shared trunk, per-kind
                                   # encoder and head (metaprox.finite_kinds, FiniteMultiHeadMMP); []: one table
    },
    "model": {
        "kind": "mlp",             # "mlp" | "conv4" | "resnet12" | "linear" (multitask)
        "sizes": [1, 40, 40, 1],   # mlp
        "activation": "tanh",      # mlp
        "filters": 32,             # conv4
        "widths": [64, 160, 320, 640],  # resnet12: channels of its four residual blocks
        "bn": "transductive",      # conv4, resnet12: "batch" | "transductive" | "running"
        "channels_last": True,     # conv4, resnet12
        "cosine_scale": 0.0,       # conv4: s > 0 = the head sees s·h/‖h‖ (L2-normalised features); 0 = plain
    },
    "prox": {"lam": 0.5,           # a number, or a table {glob pattern = λ}; 0 means "no prox" (MAML/Reptile);
                                   # finite_mmp: table values may also be "shared" (λ = ∞) or "private" (λ = 0)
             "robust_scale": None},  # δ > 0: the robust pull (λ/2)δ²·log(1 + ‖v − c‖²/δ²) (metaprox.prox.RobustL2)
                                     # instead of the squared ℓ2 one; task streams (mmp, reptile, fomaml), one λ
    "finite": {                    # algorithm = "finite_mmp" (metaprox.train.FiniteSetting)
        "rule": "mmp",             # the meta-gradient rule over the finite set: "mmp" (FiniteMMP) or another of
                                   # metaprox.ALGORITHMS with a TaskMemory (flat prior, gradient center step)
        "task_lam": "constant",    # per-task pull: "constant" | "size" (λ_t = λ·n̄/n_t: more data, weaker pull)
        "center_update": "gradient",  # "gradient" (the paper's envelope step) | "exact" | "fixed" | "solve"
                                      # ("solve": the joint optimum of linear least squares, metaprox.joint_ridge)
        "divergence_growth": 1e4,  # stop when J (or, for "gradient" centers, the meta-gradient norm) exceeds
                                   # this × its first value (0: off)
        "sample": "without_replacement",  # task minibatches of outer.meta_batch: | "with_replacement" | "all"
    },
    "prior": {                     # who the center is (docs/composition.md); a stream's tree: task.group_by
        "kind": "flat",            # "flat" (w) | "tree" (task → node → … → root w) | "graph" (edges between tasks)
        "task_nodes": [],          # tree: each task's node, in task order; "a/b" is node b under a under the root
        "nodes_csv": None,         # tree: or a CSV file with a header, one row per task (in task order) …
        "nodes_column": "node",    # … and the column holding the node
        "lam_levels": [1.0],       # tree: pull of a node toward its parent, per depth 1, 2, …
        "group_lr": None,          # stream tree: step size of the node centers (None: outer.lr), or one per depth
        "groups": [],              # tree: which parameters follow it, [[prior.groups]] pattern = "weight" kind = "tree"
                                   # | "flat" (first match wins; glob or "re:<regex>"; unmatched: flat; []: all)
        "edges": [],               # graph: [[t, s, λ_ts], …] (task indices, each edge once)
        "edges_csv": None,         # graph: or a CSV file with columns t, s, weight
    },
    "heads": {                     # multi-head few-shot (metaprox.MultiHeadMMP over a SharedTrunk): one kind and head
        "ways": [],                # per way, e.g. [5, 20] (kinds "5way", "20way" mixed in every meta-batch); []: off
        "head_lam": 0.0,           # ridge μ of each head toward its start (0: private heads); also task.kinds
        "head_init": "zero",       # heads start at "zero" each task, or at their seeded "module" values; also
                                   # task.kinds (a finite set's heads and encoders around a shared MLP trunk)
        "width": 0,                # task.kinds: output width of each kind's input encoder = the trunk's input
    },
    "rule": {                       # options of the meta-gradient rule (see metaprox.ALGORITHMS)
        "inner_data": "support",    # MMP, Reptile: solve on "support" or "support+query"
        "first_order": False,       # MAML
        "cg_steps": 5,              # iMAML
    },
    "inner": {"solver": "sgd", "lr": 0.02, "steps": 15, "momentum": 0.0, "beta1": 0.9, "batch_size": 0,
              "carry_moments": False},
    # outer.lr is η: the center moves by η·∇, and MMP's ∇ = λ(w − v̄), so w moves ηλ of the way to v̄ (unstable for
    # ηλ ≥ 2, refused unless outer.allow_unstable = true; metaprox.stability)
    "outer": {"optimizer": "sgd", "lr": 0.8, "schedule": "linear", "steps": 30000, "meta_batch": 5,
              "allow_unstable": False,
              "minutes": 0.0},         # > 0: meta-training ends (and is evaluated) after this many minutes
    "pretrain": {                  # cross-entropy pretraining of the backbone on all training classes (fewshot)
        "epochs": 0,               # 0: no pretraining; the run starts from the seeded initialisation
        "minutes": 0.0,            # > 0: wall-clock bound; the cosine lr spans epochs or minutes, whichever ends first
        "lr": 0.05, "batch_size": 128, "weight_decay": 5e-4, "label_smoothing": 0.1,
        "flip": True,              # random horizontal flips
        "crop_pad": 8,             # random crops of the images zero-padded by this many pixels (0: none)
        "backbone": "",            # a run directory: start from the backbone it pretrained (epochs then unused)
        "eval_every": 0,           # validation (prototype accuracy, log.eval_tasks tasks) every N steps, 0: per epoch
        "precision": "float32",    # "bfloat16": training steps under bf16 autocast (fp32 weights, fp32 validation)
    },
    "eval": {
        "shots": [5, 10],
        "tasks": 200,
        "points": 200,
        "steps": [0, 1, 15, 32],   # test-time steps reported; the curve runs to the largest
        "lam": None,               # test-time λ: a number or {glob = λ} per group (None: the training λ)
        "lr": None,                # test-time inner lr (None: the training inner lr)
        "batch_size": 0,           # test-time inner minibatch (0: all support points, full batch)
        "bn": "",                  # test-time BatchNorm protocol (Conv-4): "" = model.bn, "batch" (plain: each query
                                   # normalised with the support set), "transductive" (query batch statistics) or
                                   # "population" (statistics of w on training images; metaprox.population_bn)
        "bn_images": 2048,         # eval.bn = "population": training images of the estimate
        "head_init": "prior",      # test-time head center and start: "prior" (w's head) or "prototypes" (each
                                   # episode's support class means: step 0 = nearest centroid; metaprox.head_init)
        "views": "image",          # "flip": each image's features averaged with its mirror image's (test-time
                                   # augmentation, per image: plain; metaprox.test_views)
        "seed": 2019,              # test tasks; validation uses eval.val_seed (tune there, never on test)
        "val_seed": 7,
        "metrics": None,           # finite task sets: e.g. ["rmse", "mae", "r2"] (None: per task type)
    },
    "log": {"every": 100, "checkpoint_every": 2000, "tensorboard": "auto", "progress": True,
            "eval_every": 0,       # > 0: every N iterations, mean MSE on eval_tasks validation tasks per shot
            "eval_tasks": 25},     # setting → val_curve.jsonl (time excluded from the training clock)
    "tune": None,                  # `metaprox tune`: search space and budget, validated by metaprox.tune
}


def _check_types(cfg: Mapping[str, Any], schema: Mapping[str, Any], where: str = "") -> None:
    for key, value in cfg.items():
        path = f"{where}{key}"
        if key not in schema:
            close = [k for k in schema if k[:3] == key[:3]]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}.{hint} Valid keys here: {sorted(schema)}.")
        default = schema[key]
        if isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {path!r} must be a table/section, got {value!r}.")
            _check_types(value, default, path + ".")
        elif default is None or value is None:
            continue
        elif key == "lam" and isinstance(value, Mapping):
            continue  # a table {glob pattern = λ}: its values are checked in resolve()
        elif isinstance(default, bool):
            if not isinstance(value, bool) and not (isinstance(default, bool) and value == "auto"):
                raise ConfigError(f"config key {path!r} must be true/false, got {value!r}.")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"config key {path!r} must be a number, got {value!r}.")
            if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) \
                    and not value.is_integer() and key not in ("lr", "lam", "momentum", "beta1"):
                raise ConfigError(f"config key {path!r} must be an integer, got {value!r}.")
        elif key == "tensorboard":
            if value not in (True, False, "auto", "true", "false", "off"):
                raise ConfigError(f"config key {path!r} must be true, false or 'auto', got {value!r}.")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"config key {path!r} must be a string, got {value!r}.")
        elif isinstance(default, list):
            if not isinstance(value, list):
                raise ConfigError(f"config key {path!r} must be a list, got {value!r}.")


#: the keys a ``[[task.kinds]]`` entry may set besides its ``name``: those of one finite table or preset
KIND_KEYS = ("file", "dataset", "data_path", "task_column", "target", "features", "task_type", "split_column",
             "train_frac", "test_frac", "val_frac", "split_seed", "standardize")


def _check_kinds(kinds: list[Any]) -> None:
    """``[[task.kinds]]``: tables with a unique ``name`` (no '.') and file or dataset, each key one of KIND_KEYS."""
    seen: set[str] = set()
    for i, entry in enumerate(kinds):
        where = f"task.kinds[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} = {entry!r}: each kind is a table [[task.kinds]] with name = \"...\" and "
                              f"file = \"...\" or dataset = \"...\".")
        name = entry.get("name")
        if not isinstance(name, str) or not name or "." in name or name in seen:
            raise ConfigError(f"{where}.name = {name!r}: each kind needs a unique, non-empty name without '.' "
                              f"(it names the kind's head and encoder).")
        seen.add(name)
        _check_types({k: v for k, v in entry.items() if k != "name"},
                     {k: DEFAULTS["task"][k] for k in KIND_KEYS}, where + ".")
        if ("file" in entry) == ("dataset" in entry):
            raise ConfigError(f"{where} ({name!r}): give exactly one of file = \"<table>\" or dataset = \"<preset>\".")


def kind_config(cfg: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """The one-table config of kind ``entry``: the run's ``[task]`` with the entry's keys over it (no kinds)."""
    task = {**cfg["task"], "file": None, **{k: v for k, v in entry.items() if k != "name"}, "kinds": []}
    return {**cfg, "task": task}


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    """Parse an override value as a TOML literal (numbers, booleans, lists, quoted strings); else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (as given to ``--set``)."""
    out = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. outer.lr=0.5).")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = out
        schema: Any = DEFAULTS
        for p in parts[:-1]:
            if not isinstance(schema, dict) or p not in schema or not isinstance(schema[p], dict):
                raise ConfigError(f"unknown config section {p!r} in override {item!r}.")
            schema = schema[p]
            node = node.setdefault(p, {})
        node[parts[-1]] = parse_value(text.strip())
    return out


def resolve(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a (partial) config and fill in defaults; also cross-field checks."""
    _check_types(cfg, DEFAULTS)
    out = _merge(DEFAULTS, cfg)
    lam = out["prox"]["lam"]
    if not isinstance(lam, (dict, int, float)) or isinstance(lam, bool):
        raise ConfigError(f"prox.lam must be a number or a table of pattern = λ, got {lam!r}.")
    finite = out["algorithm"] == "finite_mmp"
    if finite != (out["task"]["family"] == "multitask"):
        raise ConfigError("algorithm = 'finite_mmp' and task.family = 'multitask' go together (a finite set of "
                          "known tasks with persistent parameters); got algorithm = "
                          f"{out['algorithm']!r}, task.family = {out['task']['family']!r}.")
    kinds = out["task"]["kinds"]
    if kinds:
        if out["task"]["family"] != "multitask":
            raise ConfigError(f"task.kinds is for finite task sets (task.family = 'multitask', algorithm = "
                              f"'finite_mmp'), got task.family = {out['task']['family']!r}.")
        _check_kinds(kinds)
        single = [k for k in ("file", "target", "features", "task_type", "split_column") if out["task"][k] is not None]
        if single:
            raise ConfigError(f"task.{single[0]} is set next to task.kinds: give each kind its own table and columns "
                              f"in its [[task.kinds]] entry.")
        why = kinds_refusal(out["finite"]["rule"], out["prior"]["kind"], out["finite"]["center_update"])
        if why is not None:
            raise ConfigError(f"task.kinds: {why}.")
    f, pr = out["finite"], out["prior"]
    if pr["kind"] not in ("flat", "tree", "graph"):
        raise ConfigError(f"prior.kind = {pr['kind']!r}: choose 'flat', 'tree' or 'graph'.")
    if pr["kind"] == "graph" and not finite:
        raise ConfigError("prior.kind = 'graph' needs algorithm = 'finite_mmp' (a graph over named tasks pulls "
                          "toward the neighbours' stored v_s); a task stream takes prior.kind = 'tree' with "
                          "task.group_by.")
    if f["rule"] != "mmp" and (f["center_update"] != "gradient" or pr["kind"] != "flat"):
        raise ConfigError(f"finite.rule = {f['rule']!r} runs with a TaskMemory: the flat prior and "
                          f"finite.center_update = 'gradient' (exact, fixed, tree and graph centers are "
                          f"FiniteMMP's, finite.rule = 'mmp'; see docs/composition.md).")
    if finite and pr["kind"] == "tree" and f["center_update"] not in ("exact", "solve"):
        raise ConfigError("prior.kind = 'tree' is updated by exact block-coordinate sweeps: set "
                          "finite.center_update = 'exact' (or 'solve' for linear least squares).")
    for key, allowed in (("rule", ("mmp", "reptile", "fomaml", "maml", "imaml")),
                         ("task_lam", ("constant", "size")), ("center_update", ("gradient", "exact", "fixed", "solve")),
                         ("sample", ("without_replacement", "with_replacement", "all"))):
        if f[key] not in allowed:
            raise ConfigError(f"finite.{key} = {f[key]!r}: choose one of {allowed}.")
    for v in (lam.values() if isinstance(lam, dict) else [lam]):
        if finite and isinstance(lam, dict) and v in ("shared", "private"):
            continue
        if not isinstance(v, (int, float)) or not v >= 0:
            raise ConfigError(f"prox.lam = {v!r}: λ must be > 0 (or 0 for no prox term, MAML/Reptile only).")
    if lam == 0 and out["algorithm"] in ("mmp", "imaml"):
        raise ConfigError(f"prox.lam = 0: {out['algorithm']} needs λ > 0 (its meta-gradient is defined by the prox).")
    if out["outer"]["meta_batch"] < 1 or out["outer"]["steps"] < 1:
        raise ConfigError("outer.meta_batch and outer.steps must be ≥ 1.")
    if out["inner"]["steps"] < 0:
        raise ConfigError("inner.steps must be ≥ 0.")
    if out["log"]["eval_every"] < 0 or out["log"]["eval_tasks"] < 1:
        raise ConfigError("log.eval_every must be ≥ 0 (0: no periodic validation) and log.eval_tasks ≥ 1.")
    if out["eval"]["bn"] not in ("", "batch", "transductive", "population"):
        raise ConfigError(f"eval.bn = {out['eval']['bn']!r}: choose '' (the model's), 'batch' (plain), "
                          f"'transductive' or 'population' (statistics of training images).")
    if out["eval"]["bn"] == "population" and out["task"]["family"] != "fewshot":
        raise ConfigError(f"eval.bn = 'population' estimates BatchNorm statistics on the training images of a "
                          f"few-shot family (task.family = 'fewshot'), not {out['task']['family']!r}.")
    if out["eval"]["bn_images"] < 2:
        raise ConfigError(f"eval.bn_images = {out['eval']['bn_images']}: needs ≥ 2 training images.")
    head_init = out["eval"]["head_init"]
    if head_init not in ("prior", "prototypes"):
        raise ConfigError(f"eval.head_init = {head_init!r}: choose 'prior' (w's head) or 'prototypes' (the support "
                          f"set's class means).")
    if head_init == "prototypes" and (out["task"]["family"] != "fewshot" or out["heads"]["ways"]):
        raise ConfigError(f"eval.head_init = 'prototypes' needs few-shot episodes with one linear head (task.family "
                          f"= 'fewshot', heads.ways unset), got task.family = {out['task']['family']!r}"
                          f"{', heads.ways = ' + repr(out['heads']['ways']) if out['heads']['ways'] else ''}; "
                          f"use 'prior'.")
    if out["eval"]["views"] not in ("image", "flip"):
        raise ConfigError(f"eval.views = {out['eval']['views']!r}: choose 'image' (each image as it is) or 'flip' "
                          f"(its features averaged with its mirror image's).")
    if out["eval"]["views"] != "image" and (out["task"]["family"] != "fewshot" or out["model"]["kind"] not in
                                             ("conv4", "resnet12")):
        raise ConfigError(f"eval.views = {out['eval']['views']!r} mirrors images: it needs few-shot images "
                          f"(task.family = 'fewshot') and a Conv-4 or ResNet-12 model, got task.family = "
                          f"{out['task']['family']!r}, model.kind = {out['model']['kind']!r}; use 'image'.")
    if out["pretrain"]["epochs"] < 0 or out["pretrain"]["minutes"] < 0 or out["outer"]["minutes"] < 0:
        raise ConfigError("pretrain.epochs, pretrain.minutes and outer.minutes must be ≥ 0.")
    if out["pretrain"]["precision"] not in ("float32", "bfloat16"):
        raise ConfigError(f"pretrain.precision = {out['pretrain']['precision']!r}: choose 'float32' or 'bfloat16' "
                          f"(bf16 autocast of the training steps; weights and validation stay float32).")
    if (out["pretrain"]["epochs"] or out["pretrain"]["backbone"]) and out["task"]["family"] != "fewshot":
        raise ConfigError("pretrain.epochs > 0 needs task.family = 'fewshot' (it classifies the training classes).")
    if any(s < 0 for s in out["eval"]["steps"]) or not out["eval"]["steps"]:
        raise ConfigError("eval.steps must be a non-empty list of step counts ≥ 0.")
    if out["threads"] < 0:
        raise ConfigError(f"threads = {out['threads']}: give a count ≥ 1, or 0 to choose from the work size.")
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a TOML/YAML/JSON config file, apply overrides, validate and fill defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (see configs/ for examples).")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:
                raise ConfigError("YAML configs need PyYAML (pip install pyyaml); or use TOML.") from e
            try:
                raw = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config {str(path)!r} is not valid YAML: {e}".replace("\n", " ")) from e
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"config {str(path)!r}: use a .toml, .yaml or .json file.")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config {str(path)!r} is not valid {path.suffix[1:].upper()}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {str(path)!r} must hold a table of keys (like configs/sine.toml) at its top "
                          f"level, not a {type(raw).__name__}.")
    return resolve(apply_overrides(raw, overrides))
