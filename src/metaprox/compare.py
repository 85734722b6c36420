"""``metaprox compare CONFIG``: train several meta-learners under one budget and write a comparison report.

A compare config (TOML/JSON) has

    name = "sine_compare"
    algorithms = ["mmp", "maml", ...]        # labels, in report order; a label names a rule or sets `algorithm`
    notes = ["...", ...]                       # optional free text copied into the report (deviations, sources)
    [shared]                                   # a run config (the `metaprox train` schema): budget + test protocol
    [per_algorithm.<label>]                    # that algorithm's own hyperparameters (+ optional `source` text)
    [bench]                                    # memory_steps, memory_tasks, throughput_tasks/steps/rounds
    [tune]                                     # optional: equal-budget tuning (metaprox.compare_tuned)

The budget (seed, task family and sizes, model, ``outer.steps``, ``outer.meta_batch``, ``inner.steps``), the
test protocol (``eval.shots/tasks/points/steps/seed/val_seed``) and logging are *shared*: a per-algorithm table
may not set them, so every algorithm sees the same tasks, the same number of them and the same number of inner
steps. Per algorithm: the rule and its options, λ, the inner and outer optimizers and learning rates, and
test-time ``eval.lam``/``eval.lr``.

:func:`run_compare` trains each algorithm in its own run directory (``OUT/runs/<label>``, via
:func:`metaprox.train.train` in a fresh subprocess whose peak RSS is recorded), evaluates it on the test (and
validation) tasks, measures memory against inner steps (:mod:`metaprox.bench.memory`) and throughput
(:mod:`metaprox.bench.rules`), writes ``OUT/results.json`` and renders the report
(:mod:`metaprox.compare_report`). A finished run (``train_stats.json`` with the same config) is reused, so an
interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from metaprox.config import DEFAULTS, ConfigError, parse_value, resolve, tomllib

__all__ = ["load_compare_config", "resolve_compare", "run_compare", "COMPARE_DEFAULTS", "SHARED_ONLY"]

COMPARE_DEFAULTS: dict[str, Any] = {
    "name": "compare",
    "algorithms": [],
    "notes": [],
    "shared": {},
    "per_algorithm": {},
    "bench": {"memory_steps": [1, 5, 15, 50, 100], "memory_tasks": 300, "throughput_tasks": 100,
              "throughput_steps": 15, "throughput_rounds": 7, "curve_step": 15},
    "tune": None,
}

#: run-config keys that define the common budget / protocol: only [shared] may set them
SHARED_ONLY = ("name", "seed", "device", "task", "model", "log", "outer.steps", "outer.meta_batch", "inner.steps",
               "eval.shots", "eval.tasks", "eval.points", "eval.steps", "eval.seed", "eval.val_seed")


def _flat_keys(d: Mapping[str, Any], where: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{where}{k}.") if isinstance(v, Mapping) else [f"{where}{k}"]
    return out


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a table.")
        node = nxt
    node[parts[-1]] = value


def resolve_compare(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Validate a compare config, apply ``key=value`` overrides, and resolve one run config per algorithm.

    Returns the config with defaults filled in and ``runs``: ``{label: resolved run config}``.
    """
    table: dict[str, Any] = copy.deepcopy(dict(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. shared.outer.steps=100).")
        key, text = item.split("=", 1)
        _set_path(table, key.strip(), parse_value(text.strip()))
    unknown = sorted(set(table) - set(COMPARE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown compare config key(s) {unknown}; valid top-level keys: "
                          f"{sorted(COMPARE_DEFAULTS)} (run settings go under [shared] or [per_algorithm.NAME]).")
    cfg = {**copy.deepcopy(COMPARE_DEFAULTS), **table}
    bench = cfg["bench"]
    if not isinstance(bench, Mapping) or set(bench) - set(COMPARE_DEFAULTS["bench"]):
        bad = sorted(set(bench) - set(COMPARE_DEFAULTS["bench"])) if isinstance(bench, Mapping) else bench
        raise ConfigError(f"unknown [bench] key(s) {bad}; valid: {sorted(COMPARE_DEFAULTS['bench'])}.")
    cfg["bench"] = {**COMPARE_DEFAULTS["bench"], **bench}
    b = cfg["bench"]
    if not b["memory_steps"] or any(not isinstance(m, int) or m < 1 for m in b["memory_steps"]):
        raise ConfigError(f"bench.memory_steps = {b['memory_steps']!r}: a non-empty list of integers ≥ 1.")
    for k in ("memory_tasks", "throughput_tasks", "throughput_steps", "throughput_rounds"):
        if not isinstance(b[k], int) or b[k] < 1:
            raise ConfigError(f"bench.{k} = {b[k]!r}: must be an integer ≥ 1.")
    labels = cfg["algorithms"]
    if not isinstance(labels, list) or not labels or not all(isinstance(a, str) for a in labels):
        raise ConfigError("`algorithms` must be a non-empty list of names, e.g. algorithms = [\"mmp\", \"maml\"].")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"`algorithms` lists a name twice: {labels}.")
    if not isinstance(cfg["notes"], list) or not all(isinstance(n, str) for n in cfg["notes"]):
        raise ConfigError("`notes` must be a list of strings.")
    per = cfg["per_algorithm"]
    if not isinstance(per, Mapping):
        raise ConfigError("[per_algorithm] must be a table of [per_algorithm.NAME] tables.")
    from metaprox.algorithms import ALGORITHMS

    extra = sorted(set(per) - set(labels) - set(ALGORITHMS))  # tables of unselected known rules are ignored
    if extra:
        raise ConfigError(f"[per_algorithm.{extra[0]}] is neither in `algorithms` {labels} nor a known rule "
                          f"{sorted(ALGORITHMS)}; add it to `algorithms` or fix its name.")
    shared = cfg["shared"]
    if not isinstance(shared, Mapping):
        raise ConfigError("[shared] must be a table (a run config: task, model, inner, outer, eval, log, ...).")
    try:
        resolve(shared)
    except ConfigError as e:
        raise ConfigError(f"[shared]: {e}") from None
    runs, sources = {}, {}
    for label in labels:
        own = copy.deepcopy(dict(per.get(label, {})))
        sources[label] = own.pop("source", "")
        if not isinstance(sources[label], str):
            raise ConfigError(f"per_algorithm.{label}.source must be a string.")
        for key in _flat_keys(own):
            if key in SHARED_ONLY or key.split(".")[0] in SHARED_ONLY:
                raise ConfigError(f"per_algorithm.{label}.{key}: {key} is part of the common budget/protocol; "
                                  f"set it once under [shared] so every algorithm gets the same.")
        own.setdefault("algorithm", label)
        if own["algorithm"] not in ALGORITHMS:
            raise ConfigError(f"algorithm {label!r}: unknown rule {own['algorithm']!r}; set "
                              f"per_algorithm.{label}.algorithm to one of {sorted(ALGORITHMS)}.")
        merged = _merge_runs(shared, own)
        merged["name"] = label
        try:
            runs[label] = resolve(merged)
        except ConfigError as e:
            raise ConfigError(f"algorithm {label!r}: {e}") from None
    first = next(iter(runs.values()))
    if b["curve_step"] not in first["eval"]["steps"]:
        raise ConfigError(f"bench.curve_step = {b['curve_step']!r} must be one of shared.eval.steps "
                          f"{first['eval']['steps']} (the validation curve is recorded at those steps).")
    cfg["runs"], cfg["sources"] = runs, sources
    from metaprox.compare_tuned import resolve_compare_tune

    cfg["tune"] = resolve_compare_tune(cfg["tune"], runs, SHARED_ONLY)
    return cfg


def _merge_runs(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = _merge_runs(out.get(k, {}), v) if isinstance(v, Mapping) and isinstance(DEFAULTS.get(k), dict) \
            else copy.deepcopy(v)
    return out


def load_compare_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a compare config (TOML or JSON), apply ``--set`` overrides, validate; see :func:`resolve_compare`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"compare config {str(path)!r} does not exist (example: configs/compare_sine.toml).")
    try:
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"compare config {str(path)!r} is not valid {path.suffix[1:].upper()}: {e}") from e
    cfg = resolve_compare(raw, overrides)
    cfg["config_path"] = str(path)
    return cfg


# ----- running -------------------------------------------------------------------------------------------------
def _train_child(run_dir: str) -> None:
    """Subprocess body: train one run (no final evaluation), print wall-clock and peak RSS as JSON."""
    import torch

    from metaprox.rundir import read_metrics
    from metaprox.train import VAL_CURVE, train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = json.loads(sys.stdin.read())
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    train(cfg, run_dir, progress=False, evaluate=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    val_s = sum(r["eval_seconds"] for r in read_metrics(Path(run_dir), VAL_CURVE))
    print(json.dumps({"wall_s": wall, "validation_s": val_s, "train_s": wall - val_s, "cpu_s": cpu,
                      "peak_rss_mib": _peak_rss_mib(), "threads": torch.get_num_threads(),
                      "loadavg_1min": [load0, os.getloadavg()[0]]}))


def _peak_rss_mib() -> float:
    """This process's peak RSS. Linux: ``VmHWM`` of its own address space — not ``ru_maxrss``, which a child
    inherits from its parent's peak at fork/exec and would report the parent's memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train(cfg: dict[str, Any], run_dir: Path, threads: int) -> dict[str, Any]:
    stats_path = run_dir / "train_stats.json"
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        if resolve(stats.get("config", {})) == cfg:  # resolved: a run written before a schema key was added
            return {**stats, "reused": True}
        raise ConfigError(f"{str(run_dir)!r} holds a finished run with a different config; remove it or choose "
                          f"another --out.")
    if (run_dir / "checkpoint.json").is_file():  # an interrupted child: start that run again from scratch
        import shutil

        shutil.rmtree(run_dir)
    src = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "metaprox.compare", "--train-child", str(run_dir)],
                          input=json.dumps(cfg), text=True, capture_output=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training {cfg['name']!r} in {str(run_dir)!r} failed:\n{proc.stderr[-3000:]}")
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    stats["config"] = cfg
    stats_path.write_text(json.dumps(stats, indent=1))
    return {**stats, "reused": False}


def _throughput(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from metaprox.bench.rules import throughput_markdown, throughput_rows, time_rules
    from metaprox.build import build_family, build_learner

    b = cfg["bench"]
    learners = {}
    for label, run in cfg["runs"].items():
        run = copy.deepcopy(run)
        run["inner"]["steps"] = b["throughput_steps"]
        learners[label] = build_learner(run)
    first = next(iter(cfg["runs"].values()))
    tasks = build_family(first).train_batch(b["throughput_tasks"], torch.Generator().manual_seed(first["seed"]))
    ref = cfg["algorithms"][0]
    rows = throughput_rows(time_rules(learners, tasks, b["throughput_rounds"]), learners, b["throughput_tasks"], ref)
    return {"tasks": b["throughput_tasks"], "steps": b["throughput_steps"], "rounds": b["throughput_rounds"],
            "reference": ref, "threads": torch.get_num_threads(), "rows": rows,
            "markdown": throughput_markdown(rows, ref)}


def run_compare(cfg: dict[str, Any], out_dir: str | Path, log: Callable[[str], None] | None = None,
                command: str | None = None) -> dict[str, Any]:
    """Train, evaluate and benchmark every algorithm of a resolved compare config; write the report.

    Returns the results (also in ``OUT/results.json``); the report is ``OUT/README.md`` plus PNG figures.
    """
    import platform

    import torch

    from metaprox.bench.memory import memory_vs_steps
    from metaprox.compare_report import write_report
    from metaprox.evaluate import evaluate_run
    from metaprox.rundir import provenance, read_metrics
    from metaprox.train import VAL_CURVE

    say = log or (lambda m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("# training runs (checkpoints, metrics) and tuning trials are regenerated, not "
                                    "committed\nruns/\ntune/*/trials/\ntune/*/study.db\n")
    threads = torch.get_num_threads()
    t_start, load_start = time.perf_counter(), os.getloadavg()
    cpu_start = _cpu_seconds()
    algos: dict[str, Any] = {}
    for i, (label, run) in enumerate(cfg["runs"].items()):
        run_dir = out / "runs" / label
        say(f"[{i + 1}/{len(cfg['runs'])}] training {label} ({run['outer']['steps']} iterations) in {run_dir}")
        stats = _train(run, run_dir, threads)
        say(f"      {'reused' if stats['reused'] else 'trained'}: {stats['train_s']:.1f} s training, "
            f"peak RSS {stats['peak_rss_mib']:.0f} MiB; evaluating")
        algos[label] = {"config": run, "source": cfg["sources"][label], "train": stats,
                        "test": evaluate_run(run_dir, "test"), "val": evaluate_run(run_dir, "val"),
                        "val_curve": read_metrics(run_dir, VAL_CURVE)}
    b = cfg["bench"]
    say(f"memory vs inner steps {b['memory_steps']} at B = {b['memory_tasks']} (fresh process per point)")
    memory = memory_vs_steps({label: {"config": run} for label, run in cfg["runs"].items()}, b["memory_steps"],
                             b["memory_tasks"], log=say)
    say(f"throughput at B = {b['throughput_tasks']}, M = {b['throughput_steps']}")
    throughput = _throughput(cfg)
    tuned = None
    if cfg["tune"] is not None:
        from metaprox.compare_tuned import run_tuned

        tuned = run_tuned(cfg, out, lambda run, run_dir: _train(run, run_dir, threads), say)
    machine = {"cpu": _cpu_name(), "platform": platform.platform(), "threads": threads, **provenance()}
    results = {"name": cfg["name"], "config_path": cfg.get("config_path"), "command": command,
               "algorithms": algos, "memory": {"tasks": b["memory_tasks"], "points": memory},
               "throughput": throughput, "tuned": tuned, "notes": cfg["notes"], "bench": b, "machine": machine,
               "total_seconds": time.perf_counter() - t_start, "cpu_seconds": _cpu_seconds() - cpu_start,
               "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    say(f"report: {out / 'README.md'} ({results['total_seconds'] / 60:.1f} min)")
    return results


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished subprocesses so far."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


if __name__ == "__main__":  # internal: the training subprocess of run_compare
    if len(sys.argv) == 3 and sys.argv[1] == "--train-child":
        _train_child(sys.argv[2])
    else:
        sys.exit("usage: python -m metaprox.compare --train-child RUN_DIR  (internal; use `metaprox compare`)")
