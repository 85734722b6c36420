"""``metaprox tune CONFIG``: hyperparameter search with Optuna on validation tasks, one run directory per trial.

The search is declared in the run config's ``[tune]`` table::

    [tune]
    trials = 20            # finished (complete or pruned) trials the study should reach
    steps = 500            # outer.steps of each trial (the per-trial budget; default: the config's outer.steps)
    eval_every = 50        # periodic validation interval of a trial: the curve the pruner watches
    set = "5-shot"         # the validation metric: this eval set (default: the first) ...
    step = 15              # ... after this many test-time steps (default: the largest of eval.steps)
    sampler = "tpe"        # "tpe" | "random"
    seed = 0               # sampler seed
    pruner = "median"      # "median" | "none"
    prune_startup = 5      # trials that finish before the pruner may stop one
    heartbeat = 60         # seconds (SQLite/RDB storages): a silent trial is marked failed after 2 heartbeats
    [tune.space]
    prox.lam = { log = [0.05, 20.0] }        # log-uniform
    inner.lr = { uniform = [0.005, 0.05] }   # uniform (optional step = ...)
    inner.batch_size = { int = [1, 10] }     # integer (optional step = ..., log = true)
    outer.optimizer = { choice = ["sgd", "adam"] }

The objective is the mean validation loss (accuracy for classification, maximised) of ``metaprox eval --split
val`` (``eval.tasks`` tasks drawn with ``eval.val_seed``); test tasks are never built. A trial trains in chunks of
``eval_every`` iterations (``train(stop_at=...)`` then resume, bitwise the same as one session) and reports its
periodic validation curve after each chunk, so the pruner can stop it early. Diverged trials count as pruned.

The study lives in an Optuna storage: by default ``sqlite:///OUT/study.db`` (run the same command again to
continue a killed study); ``journal:PATH`` is a journal file that several local processes share safely; any other
URL (e.g. ``postgresql://user:pass@host/db``) is an Optuna RDB storage that workers on several machines share.
Several ``metaprox tune`` processes on one storage and study split the trials between them. A trial whose worker
died (same host: its process is gone; SQLite/RDB: no heartbeat for ``2 × heartbeat`` s) is marked failed and
does not count; the study goes on until ``trials`` trials have finished.

Outputs in ``OUT``: ``trials/NNNN/`` (ordinary run directories), then from :mod:`metaprox.tune_report`:
``best.toml`` (the best trial's config at the config's full ``outer.steps``, ready for ``metaprox train``),
``trials.csv``/``trials.md``, ``best_so_far.png``, ``importances.png`` and ``summary.json``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaprox.config import DEFAULTS, ConfigError, resolve
from metaprox.stability import UnstableOuterStep, check_outer_step

__all__ = ["TUNE_DEFAULTS", "PROTOCOL_KEYS", "Dimension", "resolve_tune", "parse_space", "trial_config",
           "open_storage", "open_study", "run_study", "require_optuna"]

TUNE_DEFAULTS: dict[str, Any] = {"trials": 20, "steps": None, "eval_every": None, "set": None, "step": None,
                                 "sampler": "tpe", "seed": 0, "pruner": "median", "prune_startup": 5,
                                 "heartbeat": 60, "space": {}}

#: keys a search space may not set: they define the run's identity, the trial budget or the evaluation protocol
PROTOCOL_KEYS = ("name", "seed", "device", "tune", "log", "outer.steps", "eval.shots", "eval.tasks", "eval.points",
                 "eval.steps", "eval.seed", "eval.val_seed")

KINDS = ("log", "uniform", "int", "choice")


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError as e:
        raise ConfigError("tuning needs Optuna: pip install 'metaprox[tune]' (or pip install optuna).") from e
    return optuna


@dataclass(frozen=True)
class Dimension:
    """One searched config key: ``kind`` in :data:`KINDS`, bounds (``low``/``high``) or ``choices``."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.kind == "log")

    def candidates(self) -> list[Any]:
        """Values that bound the dimension (the ends of a range, every choice): each must make a valid config."""
        if self.kind == "choice":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"one of {list(self.choices)}"
        scale = "log-uniform" if self.kind == "log" or self.log else "uniform"
        return f"{scale}{' integer' if self.kind == 'int' else ''} in [{self.low:g}, {self.high:g}]" + (
            f", step {self.step:g}" if self.step else "")


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = copy.deepcopy(value)


def _flatten_space(space: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``{"prox": {"lam": {"log": [..]}}}`` or ``{"prox.lam": {"log": [..]}}`` → ``{"prox.lam": {"log": [..]}}``."""
    out: dict[str, Any] = {}
    for k, v in space.items():
        key = f"{where}{k}"
        if isinstance(v, Mapping) and not set(v) & set(KINDS) and v and not _schema_leaf(key):
            out.update(_flatten_space(v, key + "."))
        else:
            out[key] = v
    return out


def _schema_leaf(key: str) -> bool:
    node: Any = DEFAULTS
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return False
        node = node[p]
    return not isinstance(node, dict)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_space(space: Mapping[str, Any], cfg: dict[str, Any], forbidden: tuple[str, ...] = PROTOCOL_KEYS) \
        -> list[Dimension]:
    """Validate a ``[tune.space]`` table against the config schema and ``cfg``; returns its dimensions.

    Every error names the key: an unknown or protocol key, a malformed spec, an empty range, a choice of a
    type the config key does not accept (each range end and each choice is resolved into ``cfg`` to check).
    """
    from metaprox.build import build_learner

    if not isinstance(space, Mapping):
        raise ConfigError("[tune.space] must be a table of KEY = { log | uniform | int | choice = ... }.")
    dims = []
    for key, spec in _flatten_space(space).items():
        where = f"tune.space.{key}"
        if not _schema_leaf(key):
            raise ConfigError(f"{where}: {key!r} is not a config key (the searched keys are those of the run "
                              f"config schema, e.g. prox.lam, inner.lr, outer.lr, eval.lam).")
        if key in forbidden or key.split(".")[0] in forbidden:
            raise ConfigError(f"{where}: {key!r} is part of the budget or evaluation protocol and cannot be "
                              f"searched (forbidden here: {list(forbidden)}).")
        if not isinstance(spec, Mapping) or len(set(spec) & set(KINDS)) != 1 or set(spec) - {*KINDS, "step"}:
            raise ConfigError(f"{where} = {spec!r}: write one of {{ log = [low, high] }}, {{ uniform = [low, high] "
                              f"}}, {{ int = [low, high] }} (each with optional step = ...) or {{ choice = [...] }}.")
        kind = next(k for k in KINDS if k in spec)
        arg, step = spec[kind], spec.get("step")
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"{where}: choice needs a non-empty list of values, got {arg!r}.")
            if any(not isinstance(c, (bool, int, float, str)) for c in arg) or len({json.dumps(c) for c in arg}) \
                    != len(arg):
                raise ConfigError(f"{where}: choices must be distinct numbers, strings or booleans, got {arg!r}.")
            dim = Dimension(key, kind, choices=tuple(arg))
        else:
            if not isinstance(arg, list) or len(arg) != 2 or not all(_number(a) for a in arg):
                raise ConfigError(f"{where}: {kind} needs [low, high] (two finite numbers), got {arg!r}.")
            low, high = float(arg[0]), float(arg[1])
            if not low < high:
                raise ConfigError(f"{where}: empty range [{arg[0]}, {arg[1]}] (low must be < high; to fix a value, "
                                  f"set it in the config instead of the search space).")
            if kind == "log" and low <= 0:
                raise ConfigError(f"{where}: a log-uniform range needs low > 0, got {arg[0]}.")
            if kind == "int" and not all(isinstance(a, int) for a in arg):
                raise ConfigError(f"{where}: int needs integer bounds, got {arg!r}.")
            if step is not None and (not _number(step) or step <= 0 or kind == "log"):
                raise ConfigError(f"{where}: step must be a number > 0 (and not with log), got {step!r}.")
            dim = Dimension(key, kind, low, high, step=step)
        for value in dim.candidates():
            trial_cfg = copy.deepcopy(cfg)
            set_dotted(trial_cfg, key, value)
            try:
                build_learner(resolve(trial_cfg))  # also checks names (optimizer, solver, ...) resolve leaves open
            except (ConfigError, ValueError, TypeError) as e:
                raise ConfigError(f"{where}: the value {value!r} does not fit the config: {e}") from None
        dims.append(dim)
    if not dims:
        raise ConfigError("[tune.space] is empty: declare at least one searched key, e.g. "
                          "prox.lam = { log = [0.1, 10.0] }.")
    return dims


def resolve_tune(tune: Mapping[str, Any] | None, cfg: dict[str, Any],
                 forbidden: tuple[str, ...] = PROTOCOL_KEYS) -> dict[str, Any]:
    """Fill the ``[tune]`` table's defaults and validate it against the run config ``cfg``.

    Returns the table with ``dims`` (the parsed search space), ``direction`` and the resolved ``set``/``step``.
    """
    if tune is None:
        raise ConfigError("the config has no [tune] table: add [tune] and [tune.space] (see metaprox.tune).")
    if not isinstance(tune, Mapping):
        raise ConfigError(f"[tune] must be a table, got {tune!r}.")
    unknown = sorted(set(tune) - set(TUNE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown [tune] key(s) {unknown}; valid: {sorted(TUNE_DEFAULTS)}.")
    t = {**copy.deepcopy(TUNE_DEFAULTS), **copy.deepcopy(dict(tune))}
    if cfg["algorithm"] == "finite_mmp":
        raise ConfigError("tune supports meta-learners with validation tasks (sine, fewshot), not finite_mmp.")
    t["steps"] = cfg["outer"]["steps"] if t["steps"] is None else t["steps"]
    for key in ("trials", "steps", "prune_startup", "heartbeat", "seed"):
        if not isinstance(t[key], int) or isinstance(t[key], bool) or t[key] < (0 if key in ("seed",
                                                                                               "prune_startup") else 1):
            raise ConfigError(f"tune.{key} = {t[key]!r}: must be an integer ≥ {0 if key == 'seed' else 1}.")
    t["eval_every"] = max(1, t["steps"] // 10) if t["eval_every"] is None else t["eval_every"]
    if not isinstance(t["eval_every"], int) or not 1 <= t["eval_every"] <= t["steps"]:
        raise ConfigError(f"tune.eval_every = {t['eval_every']!r}: an integer in [1, tune.steps = {t['steps']}].")
    if t["sampler"] not in ("tpe", "random"):
        raise ConfigError(f"tune.sampler = {t['sampler']!r}: choose 'tpe' or 'random'.")
    if t["pruner"] not in ("median", "none"):
        raise ConfigError(f"tune.pruner = {t['pruner']!r}: choose 'median' or 'none'.")
    sets = [f"{s}-shot" for s in cfg["eval"]["shots"]] if cfg["task"]["family"] == "sine" else None
    if t["set"] is None:
        t["set"] = sets[0] if sets else None  # fewshot: resolved from the first validation row
    elif sets is not None and t["set"] not in sets:
        raise ConfigError(f"tune.set = {t['set']!r}: the validation sets of this config are {sets}.")
    t["step"] = max(cfg["eval"]["steps"]) if t["step"] is None else t["step"]
    if t["step"] not in cfg["eval"]["steps"]:
        raise ConfigError(f"tune.step = {t['step']!r} must be one of eval.steps {cfg['eval']['steps']}.")
    t["dims"] = parse_space(t["space"], cfg, forbidden)
    t["direction"] = "minimize" if cfg["task"]["family"] == "sine" else "maximize"
    return t


def trial_config(cfg: dict[str, Any], tune: Mapping[str, Any], params: Mapping[str, Any],
                 steps: int | None = None) -> dict[str, Any]:
    """``cfg`` with ``params`` applied, ``tune`` removed; ``steps`` (default ``tune.steps``) outer iterations and
    periodic validation every ``tune.eval_every`` (quiet, no tensorboard)."""
    out = copy.deepcopy(cfg)
    out["tune"] = None
    for key, value in params.items():
        set_dotted(out, key, value)
    if steps is None:
        out["outer"]["steps"] = tune["steps"]
        out["log"].update(eval_every=tune["eval_every"], checkpoint_every=tune["steps"], progress=False,
                          tensorboard="false")
    else:
        out["outer"]["steps"] = steps
    resolved = resolve(out)
    check_outer_step(resolved)  # raises UnstableOuterStep: this η and λ together overshoot
    return resolved


# ----- storage and study ----------------------------------------------------------------------------------------
def default_storage(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'study.db'}"


def open_storage(url: str, heartbeat: int = 60) -> Any:
    """An Optuna storage for ``url``: ``journal:PATH`` (a journal file), else an RDB URL (``sqlite:///PATH``,
    ``postgresql://...``, ``mysql://...``) with a heartbeat, so trials of dead workers are marked failed."""
    optuna = require_optuna()
    hint = ("use sqlite:///PATH.db (one machine), journal:PATH (several local processes) or a reachable RDB URL "
            "such as postgresql://user:password@host/db (several machines; needs its driver, e.g. psycopg2).")
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = Path(url[len("journal:"):])
            if not path.parent.is_dir():
                raise FileNotFoundError(f"directory {str(path.parent)!r} does not exist")
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if "://" not in url:
            raise ValueError("not a storage URL")
        if url.startswith("sqlite:///"):
            parent = Path(url[len("sqlite:///"):]).parent
            if not parent.is_dir():
                raise FileNotFoundError(f"directory {str(parent)!r} does not exist")
        with warnings.catch_warnings():  # the heartbeat is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat)
    except Exception as e:  # noqa: BLE001 — any driver/connection failure: one clear message before any trial
        raise ConfigError(f"cannot open the study storage {url!r}: {type(e).__name__}: {e}. {hint}") from None


def _fingerprint(cfg: dict[str, Any], tune: Mapping[str, Any]) -> str:
    """What a study was created for: the config (without [tune]) and the search-relevant [tune] keys."""
    keep = {k: v for k, v in tune.items() if k in ("steps", "eval_every", "set", "step", "space", "pruner",
                                                    "prune_startup")}
    return json.dumps({"config": {**cfg, "tune": None}, "tune": keep}, sort_keys=True, default=str)


def open_study(storage: Any, name: str, cfg: dict[str, Any], tune: Mapping[str, Any]) -> Any:
    """Create the study, or load it when it exists and was created for the same config and search."""
    optuna = require_optuna()
    pruner = optuna.pruners.NopPruner() if tune["pruner"] == "none" else optuna.pruners.MedianPruner(
        n_startup_trials=tune["prune_startup"], n_warmup_steps=1)
    study = optuna.create_study(storage=storage, study_name=name, direction=tune["direction"], pruner=pruner,
                                load_if_exists=True)
    mine = _fingerprint(cfg, tune)
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", mine)
    elif stored != mine:
        raise ConfigError(f"study {name!r} in this storage was created for another config or search space; "
                          f"continue it with the same config, or start a new one with --study NEW_NAME.")
    if study.direction.name.lower() != tune["direction"]:
        raise ConfigError(f"study {name!r} is a {study.direction.name.lower()} study; this config needs "
                          f"{tune['direction']}.")
    return study


# ----- workers -----------------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str:
    """The start time of a process (Linux /proc; '' elsewhere): a pid together with it names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def worker_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def _alive(worker: str) -> bool:
    host, pid, start = worker.rsplit(":", 2)
    if host != socket.gethostname():
        return True  # another machine: the storage heartbeat decides
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _process_start(int(pid)) == start


def fail_dead_trials(study: Any) -> list[int]:
    """Mark failed the running trials whose worker process on this host is gone; returns their numbers."""
    optuna = require_optuna()
    from optuna.exceptions import UpdateFinishedTrialError

    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker and not _alive(worker):
            try:
                # the reason first: a finished trial's attributes can no longer be set
                study._storage.set_trial_system_attr(t._trial_id, "fail_reason", f"worker {worker} died")
                if study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL):
                    failed.append(t.number)
            except (UpdateFinishedTrialError, RuntimeError):
                pass  # another worker (or the heartbeat) got there first
    return failed


def _sampler(tune: Mapping[str, Any], study: Any) -> Any:
    """A sampler seeded by ``tune.seed`` and the number of trials so far: one worker's study is reproducible; a
    concurrent worker (a trial is running) also mixes in its pid so that two workers do not propose alike."""
    optuna = require_optuna()
    trials = study.get_trials(deepcopy=False)
    seed = tune["seed"] * 1_000_003 + len(trials)
    if any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
        seed += 7919 * os.getpid()
    seed %= 2**32
    if tune["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, min(10, tune["trials"] // 3)))


def counted(study: Any) -> int:
    """Trials that use up the budget: finished (complete, pruned) and those in progress or queued."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                                        TrialState.WAITING)))


def _metric(row: Mapping[str, Any], tune: Mapping[str, Any]) -> float:
    table = row["sets"] if tune["direction"] == "minimize" else row["accuracy"]
    name = tune["set"] or next(iter(table))
    return float(table[name][str(tune["step"])])


def run_trial(trial: Any, cfg: dict[str, Any], tune: Mapping[str, Any], out_dir: Path) -> float:
    """Train one trial in ``out_dir/trials/NNNN`` chunk by chunk, reporting its validation curve to the pruner;
    returns the validation metric of the trained prior (``evaluate_run(split="val")``)."""
    optuna = require_optuna()
    from metaprox.evaluate import evaluate_run
    from metaprox.rundir import read_metrics
    from metaprox.train import VAL_CURVE, TrainingDiverged, train

    params = {d.key: d.suggest(trial) for d in tune["dims"]}
    try:
        run_cfg = trial_config(cfg, tune, params)
    except UnstableOuterStep as e:  # this η and λ together overshoot (metaprox.stability): a failed trial
        trial.set_user_attr("diverged", str(e))
        raise optuna.TrialPruned(f"unstable outer step: {e}") from None
    run_dir = out_dir / "trials" / f"{trial.number:04d}"
    if run_dir.exists():
        raise ConfigError(f"{str(run_dir)!r} already exists but trial {trial.number} is new: this --out belongs to "
                          f"another study; choose another --out or --study.")
    trial.set_user_attr("run_dir", str(run_dir.relative_to(out_dir)))
    reported = -1
    for end in range(tune["eval_every"], tune["steps"] + tune["eval_every"], tune["eval_every"]):
        try:
            train(run_cfg, run_dir, resume=reported >= 0, progress=False, evaluate=False, stop_at=end)
        except TrainingDiverged as e:
            trial.set_user_attr("diverged", str(e))
            raise optuna.TrialPruned(f"diverged: {e}") from None
        for row in read_metrics(run_dir, VAL_CURVE):
            if row["step"] > reported:
                value = _metric(row, tune)
                if not math.isfinite(value):
                    trial.set_user_attr("diverged", f"validation metric {value} at step {row['step']}")
                    raise optuna.TrialPruned(f"non-finite validation metric at step {row['step']}")
                trial.report(value, row["step"])
                reported = row["step"]
        if end < tune["steps"] and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {reported}")
    result = evaluate_run(run_dir, "val")
    key = "loss" if tune["direction"] == "minimize" else "accuracy"
    name = tune["set"] or next(iter(result["sets"]))
    value = float(result["sets"][name][str(tune["step"])][key])
    if not math.isfinite(value):
        trial.set_user_attr("diverged", f"final validation metric {value}")
        raise optuna.TrialPruned("non-finite final validation metric")
    return value


def run_study(cfg: dict[str, Any], tune: dict[str, Any], out_dir: str | Path, storage: str | None = None,
              study_name: str | None = None, log: Callable[[str], None] | None = None,
              objective: Callable[[Any], float] | None = None) -> Any:
    """Run (or continue, or join) the study until ``tune.trials`` trials have finished; returns the study.

    ``objective`` replaces :func:`run_trial` (tests: a closed-form function of the trial's parameters).
    """
    optuna = require_optuna()
    out = Path(out_dir)
    say = log or (lambda m: None)
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
    opened = open_storage(storage or default_storage(out), tune["heartbeat"])  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(opened, study_name or cfg["name"], cfg, tune)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    me = worker_id()

    mine: list[int] = []

    def body(trial: Any) -> float:
        trial.set_user_attr("worker", me)
        mine.append(trial.number)
        return objective(trial) if objective is not None else run_trial(trial, cfg, tune, out)

    while True:
        for n in fail_dead_trials(study):
            say(f"trial {n}: its worker died; marked failed")
        done = counted(study)
        if done >= tune["trials"]:
            break
        study.sampler = _sampler(tune, study)
        study.optimize(body, n_trials=1)
        last = next(t for t in study.get_trials(deepcopy=False) if t.number == mine[-1])
        value = f", value {last.value:.5g}" if last.state.name == "COMPLETE" else ""
        say(f"trial {last.number}: {last.state.name.lower()}{value} ({done + 1}/{tune['trials']})")
    return study


def tune_command(config: str | Path, out_dir: str | Path | None = None, trials: int | None = None,
                 storage: str | None = None, study_name: str | None = None, overrides: Sequence[str] = (),
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``metaprox tune``: validate everything (config, space, storage) before any trial, run or join the study,
    then write its outputs; returns the summary."""
    from metaprox.config import load_config
    from metaprox.tune_report import write_outputs

    cfg = load_config(config, overrides)
    tune = resolve_tune(cfg["tune"], cfg)
    if trials is not None:
        if trials < 0:
            raise ConfigError(f"--trials {trials}: must be ≥ 0 (0: only write the outputs of the study).")
        tune["trials"] = trials
    out = Path(out_dir) if out_dir is not None else Path("tune") / cfg["name"]
    study = run_study(cfg, tune, out, storage, study_name, log)
    threads = os.environ.get("OMP_NUM_THREADS", "(unset)")
    command = " ".join([f"OMP_NUM_THREADS={threads} metaprox tune", str(config), "--trials", str(tune["trials"]),
                        "--out", str(out), *([f"--storage {storage}"] if storage else []),
                        *([f"--study {study_name}"] if study_name else []), *(f"--set '{o}'" for o in overrides)])
    return write_outputs(study, cfg, tune, out, command=command)
