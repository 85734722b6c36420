"""Check a whole run config before any work — every key training *and* evaluation use, the data files, the output
directory and the device — and report every problem at once (one :class:`~metaprox.config.ConfigError`).

:func:`metaprox.config.resolve` checks each key's type; this checks what the values mean together (a range of two
numbers, an MLP whose input width is the data's, a learning rate that is a finite number) and what exists outside
the config (folders, split lists, a writable ``--out``, a CUDA device), so that a run never fails after hours of
training on something it could have said at the start.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from metaprox.composition import RULES, kinds_refusal, refusal
from metaprox.config import ConfigError, kind_config
from metaprox.models.mlp import ACTIVATIONS
from metaprox.stability import UnstableOuterStep, check_outer_step

__all__ = ["config_problems", "validate_run", "validate_eval"]

_F32_MAX = float(torch.finfo(torch.float32).max)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive(out: list[str], key: str, v: Any, *, optional: bool = False, hint: str = "") -> None:
    if optional and v is None:
        return
    if not _is_number(v) or not math.isfinite(v) or v <= 0 or abs(v) > _F32_MAX:
        out.append(f"{key} = {v!r}: must be a finite number > 0{hint or '.'}")


def _at_least(out: list[str], key: str, v: Any, low: int, hint: str = "") -> None:
    if not _is_number(v) or v < low:
        out.append(f"{key} = {v!r}: must be an integer ≥ {low}{hint or '.'}")


def _range(out: list[str], key: str, v: Any, strict: bool) -> None:
    ok = isinstance(v, list) and len(v) == 2 and all(_is_number(x) and math.isfinite(x) for x in v)
    if not ok or (v[0] >= v[1] if strict else v[0] > v[1]):
        out.append(f"{key} = {v!r}: must be [low, high] with low {'<' if strict else '≤'} high "
                   f"(two finite numbers).")


def _training(cfg: dict[str, Any], out: list[str]) -> None:
    log, outer, inner, task = cfg["log"], cfg["outer"], cfg["inner"], cfg["task"]
    _at_least(out, "log.every", log["every"], 1, " (log every N outer steps).")
    _at_least(out, "log.checkpoint_every", log["checkpoint_every"], 1,
              " (checkpoint every N outer steps; the last step is always checkpointed).")
    if log["tensorboard"] in (True, "true"):
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            out.append("log.tensorboard = true but tensorboard is not installed: pip install 'metaprox[tensorboard]' "
                       "(or set log.tensorboard = 'auto').")
    _positive(out, "outer.lr", outer["lr"], hint=" (at most 3.4e38, the float32 maximum).")
    if _is_number(outer["lr"]) and math.isfinite(outer["lr"]):
        try:
            check_outer_step(cfg)  # ηλ ≥ 2 refused unless outer.allow_unstable (metaprox.stability)
        except UnstableOuterStep as e:
            out.append(str(e))
    if inner["solver"] != "exact_least_squares":
        _positive(out, "inner.lr", inner["lr"])
        if inner["steps"] == 0 and cfg["algorithm"] in ("mmp", "reptile"):
            out.append(f"inner.steps = 0: {cfg['algorithm']} would leave every task's solution at the prior, so its "
                       f"meta-gradient is 0 and nothing is learned; use ≥ 1 (the paper's sine runs use 15).")
    _at_least(out, "inner.batch_size", inner["batch_size"], 0, " (0: full batch).")
    for key in ("momentum", "beta1"):
        if not (_is_number(inner[key]) and 0 <= inner[key] < 1):
            out.append(f"inner.{key} = {inner[key]!r}: must be in [0, 1).")
    if cfg["algorithm"] == "finite_mmp":
        return
    if task["family"] == "sine":
        _range(out, "task.amp_range", task["amp_range"], strict=False)
        _range(out, "task.phase_range", task["phase_range"], strict=False)
        _range(out, "task.x_range", task["x_range"], strict=True)
        _at_least(out, "task.train_points", task["train_points"], 1)
        _at_least(out, "task.query_points", task["query_points"], 0)
    model = cfg["model"]
    if model["kind"] == "mlp":
        sizes = model["sizes"]
        if len(sizes) < 2 or not all(_is_number(s) and s == int(s) and s >= 1 for s in sizes):
            out.append(f"model.sizes = {sizes!r}: must list ≥ 2 layer widths ≥ 1 (input, hidden..., output).")
        elif task["family"] == "sine" and (sizes[0] != 1 or sizes[-1] != 1):
            out.append(f"model.sizes = {sizes!r}: sine tasks map 1 input to 1 output, so the first and last widths "
                       f"must be 1 (e.g. [1, 40, 40, 1]).")


def _heads(cfg: dict[str, Any], out: list[str]) -> None:
    """Multi-head few-shot (``heads.ways``): MultiHeadMMP's rule, a Conv-4 trunk, one distinct way per kind."""
    h = cfg["heads"]
    if not h["ways"]:
        return
    ways = h["ways"]
    if not all(_is_number(w) and w == int(w) and w >= 2 for w in ways) or len(set(ways)) != len(ways):
        out.append(f"heads.ways = {ways!r}: must list distinct ways ≥ 2 (one head per way, e.g. [5, 20]).")
    for key, want, why in (("algorithm", "mmp", "MultiHeadMMP is MMP's rule around a shared trunk"),
                           ("task.family", "fewshot", "the kinds are few-shot episodes of different ways"),
                           ("model.kind", "conv4", "the shared trunk is Conv-4's feature extractor")):
        section, _, name = key.rpartition(".")
        value = cfg[section][name] if section else cfg[name]
        if value != want:
            out.append(f"heads.ways is set, so {key} must be {want!r} ({why}), got {value!r}.")
    if _is_number(cfg["outer"]["meta_batch"]) and cfg["outer"]["meta_batch"] < len(ways):
        out.append(f"outer.meta_batch = {cfg['outer']['meta_batch']} < {len(ways)} kinds (heads.ways): every kind "
                   f"needs a task in each meta-batch, or its head's tasks are never trained.")
    _head_options(h, out)
    if cfg["pretrain"]["epochs"] or cfg["pretrain"]["backbone"]:
        out.append("heads.ways is set: pretraining (pretrain.epochs, pretrain.backbone) is for one-head models; "
                   "set pretrain.epochs = 0.")
    if cfg["model"]["bn"] != "transductive" or cfg["eval"]["bn"] not in ("", "transductive"):
        out.append(f"heads.ways is set: each kind's model predicts a query batch with its own BatchNorm statistics; "
                   f"set model.bn = 'transductive' and eval.bn = '' (got {cfg['model']['bn']!r}, "
                   f"{cfg['eval']['bn']!r}).")
    if cfg["execution"] in ("auto", "vmap") and cfg["model"]["channels_last"]:
        out.append(f"heads.ways is set: each kind's model (trunk → head) runs under torch.func.vmap with execution = "
                   f"{cfg['execution']!r}, which cannot run a channels_last Conv-4; set execution = 'loop' (faster "
                   f"here) or model.channels_last = false.")
    if cfg["precision"] != "fp32" or cfg["rule"]["inner_data"] != "support":
        out.append("heads.ways is set: MultiHeadMMP solves in fp32 on the support set; set precision = 'fp32' and "
                   "rule.inner_data = 'support'.")
    if cfg["inner"]["carry_moments"]:
        out.append("heads.ways is set: MultiHeadMMP does not carry inner Adam moments; set inner.carry_moments = "
                   "false.")


def _head_options(h: dict[str, Any], out: list[str]) -> None:
    if not (_is_number(h["head_lam"]) and math.isfinite(h["head_lam"]) and h["head_lam"] >= 0):
        out.append(f"heads.head_lam = {h['head_lam']!r}: must be a finite number ≥ 0 (0: private heads).")
    if h["head_init"] not in ("zero", "module"):
        out.append(f"heads.head_init = {h['head_init']!r}: choose 'zero' or 'module'.")


def _kind_type(cfg: dict[str, Any], entry: dict[str, Any]) -> str:
    """The task type a kind declares: its task_type, its preset's, or regression (a table's default)."""
    from metaprox.finite_data import PRESETS

    task = kind_config(cfg, entry)["task"]
    if task["task_type"] is not None:
        return str(task["task_type"])
    return PRESETS.get(task["dataset"], "regression") if task["file"] is None else "regression"


def _kinds(cfg: dict[str, Any], out: list[str]) -> None:
    """A finite set of task kinds (``[[task.kinds]]``, FiniteMultiHeadMMP around an MLP trunk): what it cannot
    do (:func:`metaprox.composition.kinds_refusal`), one loss for all kinds, the trunk and encoder widths."""
    kinds = cfg["task"]["kinds"]
    if not kinds:
        return
    m, h = cfg["model"], cfg["heads"]
    # the rule, prior and center update are config.resolve's; here the declared task types and the world size
    why = kinds_refusal(task_types={e["name"]: _kind_type(cfg, e) for e in kinds},
                        world_size=int(os.environ.get("WORLD_SIZE", "1") or 1))
    if why is not None:
        out.append(f"task.kinds: {why}.")
    if h["ways"]:
        out.append("task.kinds and heads.ways are both set: heads.ways is for few-shot episodes; the kinds' heads "
                   "come from their tables.")
    if m["kind"] != "mlp" or m["activation"] not in ACTIVATIONS:
        out.append(f"task.kinds is set: the shared trunk is an MLP; set model.kind = 'mlp' and model.activation to "
                   f"one of {sorted(ACTIVATIONS)} (got {m['kind']!r}, {m['activation']!r}).")
    if cfg["precision"] != "fp32":
        out.append(f"precision = {cfg['precision']!r}: a finite set of kinds computes in float64 (no "
                   f"reduced-precision path); remove the precision setting.")
    sizes = m["sizes"]
    if len(sizes) < 3 or not all(_is_number(s) and s == int(s) and s >= 1 for s in sizes[1:-1]):
        out.append(f"model.sizes = {sizes!r}: with task.kinds the trunk is the hidden layers of model.sizes (its "
                   f"first and last widths come from each kind's features and targets): give ≥ 1 hidden width, "
                   f"e.g. [0, 32, 0].")
    if not (_is_number(h["width"]) and h["width"] == int(h["width"]) and h["width"] >= 1):
        out.append(f"heads.width = {h['width']!r}: with task.kinds set the output width of each kind's input "
                   f"encoder (the trunk's input), an integer ≥ 1.")
    _head_options(h, out)
    if cfg["inner"]["carry_moments"] or cfg["inner"]["solver"] == "exact_least_squares":
        out.append("task.kinds is set: FiniteMultiHeadMMP solves each task's nonlinear prox problem with 'sgd' or "
                   "'adam' and does not carry Adam moments; set inner.solver and inner.carry_moments = false.")


def _prior_groups(cfg: dict[str, Any], out: list[str]) -> None:
    """``[[prior.groups]]``: tables ``pattern = "..."``, ``kind = "tree" | "flat"`` of a tree prior."""
    from metaprox.priors import GROUP_PRIORS

    groups, kind = cfg["prior"]["groups"], cfg["prior"]["kind"]
    if groups and kind != "tree":
        out.append(f"prior.groups is set but prior.kind = {kind!r}: parameter groups choose which parameters follow "
                   f"a tree (prior.kind = 'tree').")
    for i, g in enumerate(groups):
        where = f"prior.groups[{i}]"
        if not isinstance(g, dict) or set(g) != {"pattern", "kind"}:
            out.append(f"{where} = {g!r}: give a table with exactly pattern = \"<glob or re:regex>\" and kind = "
                       f"one of {list(GROUP_PRIORS)}.")
            continue
        if not isinstance(g["pattern"], str) or not g["pattern"]:
            out.append(f"{where}.pattern = {g['pattern']!r}: a non-empty glob (or re:<regex>) over parameter names.")
        if g["kind"] not in GROUP_PRIORS:
            out.append(f"{where}.kind = {g['kind']!r}: choose one of {list(GROUP_PRIORS)}.")
    if groups and all(isinstance(g, dict) and g.get("kind") != "tree" for g in groups):
        out.append("prior.groups: no group has kind = 'tree', so no parameter would follow the tree.")


def _stream_tree(cfg: dict[str, Any], out: list[str]) -> None:
    """A tree prior over the task stream (``prior.kind = "tree"``, not finite_mmp): each episode's node comes from
    ``task.group_by``; the rule × tree combination must be one :mod:`metaprox.composition` allows."""

    t, pr, algo = cfg["task"], cfg["prior"], cfg["algorithm"]
    if algo == "finite_mmp":
        return
    if t["group_by"] is not None:
        if t["group_by"] != "alphabet" or t["family"] != "fewshot" or t["dataset"] != "omniglot":
            out.append(f"task.group_by = {t['group_by']!r} (family {t['family']!r}, dataset {t['dataset']!r}): "
                       f"group_by = 'alphabet' is for task.family = 'fewshot', task.dataset = 'omniglot' (episodes "
                       f"within one alphabet).")
        if cfg["heads"]["ways"]:
            out.append("task.group_by and heads.ways are both set: grouped episodes have one way; drop heads.ways.")
    if pr["kind"] != "tree":
        return
    if t["group_by"] is None:
        out.append("prior.kind = 'tree' over a task stream needs each episode's node: set task.group_by = "
                   "'alphabet' (few-shot Omniglot), or use algorithm = 'finite_mmp' with prior.task_nodes.")
    if pr["task_nodes"] or pr["nodes_csv"] is not None:
        out.append("prior.task_nodes / prior.nodes_csv name the nodes of a finite set's tasks; a task stream's "
                   "nodes come from task.group_by: remove them.")
    levels = pr["lam_levels"]
    if not levels or not all(_is_number(v) and math.isfinite(v) and v > 0 for v in levels):
        out.append(f"prior.lam_levels = {levels!r}: need one λ > 0 per depth below the root (e.g. [1.0]).")
    lrs = pr["group_lr"] if isinstance(pr["group_lr"], list) else [pr["group_lr"]]
    if not all(v is None or (_is_number(v) and math.isfinite(v) and v > 0) for v in lrs):
        out.append(f"prior.group_lr = {pr['group_lr']!r}: the node centers' step size must be > 0 (or unset: "
                   f"outer.lr).")
    elif isinstance(pr["group_lr"], list) and isinstance(levels, list) and len(lrs) != len(levels):
        out.append(f"prior.group_lr = {pr['group_lr']!r}: give one number, or one per depth of prior.lam_levels "
                   f"({len(levels)}).")
    lam = cfg["prox"]["lam"]
    if isinstance(lam, dict):
        out.append("prox.lam is a table: a tree prior over the stream needs one λ (a number), the pull its unseen "
                   "levels are integrated out with (λ in series with prior.lam_levels); use [[prior.groups]] to "
                   "keep some parameters flat.")
    if cfg["eval"]["lam"] is not None:
        out.append("eval.lam is set: with a tree prior a test task's pull is λ (its node known) or λ in series with "
                   "the unknown levels' prior.lam_levels (the root); remove eval.lam.")
    rule = "fomaml" if algo == "maml" and cfg["rule"]["first_order"] else algo
    if rule in RULES:
        why = refusal(rule, "tree", "none" if lam == 0 else "l2", "none")
        if why is not None:
            out.append(f"algorithm = {algo!r} with prior.kind = 'tree' is refused: {why}.")


def _evaluation(cfg: dict[str, Any], out: list[str]) -> None:
    e = cfg["eval"]
    _at_least(out, "eval.tasks", e["tasks"], 1, " (test tasks per setting).")
    if cfg["task"]["family"] == "sine":
        _at_least(out, "eval.points", e["points"], 1, " (query points per test task).")
        if not e["shots"] or not all(_is_number(s) and s == int(s) and s >= 1 for s in e["shots"]):
            out.append(f"eval.shots = {e['shots']!r}: must be a non-empty list of support sizes ≥ 1.")
    if isinstance(e["lam"], dict):  # test-time λ per parameter group, {glob: λ} as prox.lam (first match wins)
        for pattern, lam in e["lam"].items():
            _positive(out, f"eval.lam[{pattern!r}]", lam)
    else:
        _positive(out, "eval.lam", e["lam"], optional=True,
                  hint=", a table {glob pattern = λ}, or unset for the training λ.")
    _positive(out, "eval.lr", e["lr"], optional=True, hint=", or unset for the training inner lr.")
    _at_least(out, "eval.batch_size", e["batch_size"], 0, " (0: full batch).")


def _device(cfg: dict[str, Any], out: list[str]) -> None:
    name = cfg["device"]
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        out.append(f"device = {name!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'.")
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            out.append(f"device = {name!r} but this torch ({torch.__version__}) sees no CUDA device; use 'cpu' "
                       f"(or install a CUDA build of torch on a machine with a GPU).")
        elif dev.index is not None and dev.index >= torch.cuda.device_count():
            out.append(f"device = {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist.")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        out.append(f"device = {name!r} but MPS is not available here; use 'cpu'.")
    elif dev.type not in ("cpu", "cuda", "mps"):
        out.append(f"device = {name!r}: metaprox runs on 'cpu', 'cuda' or 'mps'.")


_MULTITASK_FILES = {"landmine": "landmine.npz", "computer_survey": "computer_survey.npz",
                    "parkinsons": "parkinsons_updrs.csv"}


def _data_root(cfg: dict[str, Any], sub: str) -> Path | None:
    path = cfg["task"]["data_path"]
    if path:
        return Path(path)
    env = os.environ.get("METAPROX_DATA")
    return Path(env) / sub if env else None


def _data(cfg: dict[str, Any], splits: list[str], out: list[str]) -> None:
    """The files a run will read: the data folder, and for Omniglot/miniImageNet each split's list or arrays."""
    t = cfg["task"]
    if t["family"] not in ("fewshot", "multitask"):
        return
    if t["kinds"]:  # each kind's table or preset
        for entry in t["kinds"]:
            _data(kind_config(cfg, entry), splits, out)
        return
    if t["family"] == "multitask" and t.get("file"):  # a table of one's own (metaprox.finite_data)
        f = Path(t["file"])
        if not f.is_file():
            out.append(f"task.file: {str(f)!r} does not exist (relative paths are from the current directory).")
        elif not os.access(f, os.R_OK):
            out.append(f"task.file: {str(f)!r} is not readable; fix its permissions.")
        return
    sub = "multitask" if t["family"] == "multitask" else t["dataset"]
    root = _data_root(cfg, sub)
    if root is None:
        out.append(f"task.data_path is not set and $METAPROX_DATA is empty: say where the {sub} data lie "
                   f"(e.g. --set task.data_path=\"../shared/data/{sub}\").")
        return
    if not root.exists():
        out.append(f"task.data_path: {str(root)!r} does not exist; point task.data_path (or $METAPROX_DATA) at "
                   f"the {sub} data.")
        return
    needed: list[tuple[Path, ...]] = []  # each entry: any one of these files will do
    if t["family"] == "multitask" and t["dataset"] in _MULTITASK_FILES:
        needed.append((root / _MULTITASK_FILES[t["dataset"]],))
    elif t["dataset"] == "omniglot" and root.is_dir():
        needed.append((root / "omniglot28.npz", root / "images_background"))
        if t["split"] == "vinyals":
            needed += [(root / f"{s}.txt",) for s in splits]
    elif t["dataset"] == "miniimagenet" and root.is_dir():
        needed += [(root / f"{s}.npz", root / f"{s}.csv") for s in splits]
    for options in needed:
        if not any(p.exists() for p in options):
            names = " or ".join(repr(str(p)) for p in options)
            out.append(f"data file {names} is missing (task.data_path = {str(root)!r}); the run reads it.")
        elif not any(os.access(p, os.R_OK) for p in options if p.exists()):
            out.append(f"data file {str(options[0])!r} is not readable; fix its permissions.")


def _out_dir(run_dir: Path, out: list[str]) -> None:
    if run_dir.exists():
        if not run_dir.is_dir():
            out.append(f"--out {str(run_dir)!r} is a file, not a run directory; choose another --out.")
        elif not os.access(run_dir, os.W_OK | os.X_OK):
            out.append(f"--out {str(run_dir)!r} is not writable; choose a writable --out (or fix its permissions).")
        return
    parent = run_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        out.append(f"--out {str(run_dir)!r} cannot be created: {str(parent)!r} is a file.")
    elif not os.access(parent, os.W_OK | os.X_OK):
        out.append(f"--out {str(run_dir)!r} cannot be created: {str(parent)!r} is not writable; choose a "
                   f"writable --out.")


def _robust_pull(cfg: dict[str, Any], out: list[str]) -> None:
    """prox.robust_scale: one λ, a task-stream rule whose meta-gradient does not assume the squared pull."""
    delta, lam, algo = cfg["prox"]["robust_scale"], cfg["prox"]["lam"], cfg["algorithm"]
    if delta is None:
        return
    _positive(out, "prox.robust_scale", delta, hint=" (δ of the robust pull), or unset for the squared ℓ2 pull.")
    if not _is_number(lam) or lam <= 0:
        out.append(f"prox.robust_scale needs one λ > 0 (prox.lam = {lam!r}): the robust pull has one λ for all "
                   f"parameters.")
    if algo == "finite_mmp" or cfg["heads"]["ways"] or cfg["prior"]["kind"] != "flat":
        out.append("prox.robust_scale runs on a task stream with the flat prior (no finite_mmp, heads or tree) "
                   "from a config; build RobustL2 in Python for the others (docs/composition.md).")
    rule = "fomaml" if algo == "maml" and cfg["rule"]["first_order"] else algo
    why = refusal(rule, "flat", "robust", "none") if rule in RULES else None
    if why:
        out.append(f"prox.robust_scale with algorithm = {algo!r}: {why}.")


def config_problems(cfg: dict[str, Any], run_dir: str | Path | None = None, *, evaluate: bool = True) -> list[str]:
    """Every problem of a resolved training config (empty if none); ``evaluate``: the test split is read too."""
    out: list[str] = []
    _training(cfg, out)
    _robust_pull(cfg, out)
    _heads(cfg, out)
    _kinds(cfg, out)
    _prior_groups(cfg, out)
    _stream_tree(cfg, out)
    _evaluation(cfg, out)
    _device(cfg, out)
    splits = ["train"] + (["val"] if cfg["log"]["eval_every"] else []) + (["test"] if evaluate else [])
    _data(cfg, splits, out)
    if run_dir is not None:
        _out_dir(Path(run_dir), out)
    return out


def _raise(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems, nothing was run:\n" + "\n".join(f"  - {p}" for p in problems))


def validate_run(cfg: dict[str, Any], run_dir: str | Path | None = None, *, evaluate: bool = True) -> None:
    """Raise one :class:`ConfigError` listing every problem of a training run's config, data and ``run_dir``."""
    _raise(config_problems(cfg, run_dir, evaluate=evaluate))


def validate_eval(cfg: dict[str, Any], split: str) -> None:
    """The same for ``metaprox eval``: the evaluation keys, the device and the ``split``'s data."""
    out: list[str] = []
    _evaluation(cfg, out)
    _device(cfg, out)
    _data(cfg, [split], out)
    _raise(out)
