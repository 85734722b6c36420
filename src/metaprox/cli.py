"""The ``metaprox`` command: ``train``, ``eval``, ``bench`` and ``plot``.

    metaprox train CONFIG --out DIR [--set key=value ...] [--resume | --auto-resume | --resume-from STEP] [--no-eval]
    torchrun --nproc-per-node N -m metaprox.cli train ...    (task-parallel over N processes; docs/distributed.md)
    metaprox eval DIR [--split test|val] [--set eval.key=value ...] [--json]   (finite runs: per-task metrics)
    metaprox bench NAME [--json] [--device cuda]
    metaprox plot DIR
    metaprox compare CONFIG --out DIR [--set key=value ...]
    metaprox tune CONFIG [--trials N] [--out DIR] [--storage URL] [--study NAME] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from metaprox.config import ConfigError

__all__ = ["main", "build_parser"]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set outer.steps=1000 (repeatable)")
    _threads(parser)


def _threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op threads (default: the config's `threads`, else 1 for small linear/MLP "
                             "models and all cores for larger ones; metaprox.threads)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaprox", description="Proximal meta-learning (Meta-MinibatchProx).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="meta-train from a config file into a run directory")
    t.add_argument("config", help="config file (TOML/YAML/JSON), e.g. configs/sine.toml")
    t.add_argument("--out", required=True, help="run directory (created; holds config, metrics, checkpoints)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--auto-resume", action="store_true",
                   help="continue from the last checkpoint in --out if there is one, else start (use with "
                        "torchrun --max-restarts, whose restarted workers rerun the same command)")
    t.add_argument("--resume-from", type=int, metavar="STEP",
                   help="continue the run in --out from its kept checkpoint of STEP (checkpoint.json lists them)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--no-eval", action="store_true",
                   help="skip the final test evaluation (when tuning: evaluate with `metaprox eval DIR --split val`)")
    _common(t)
    e = sub.add_parser("eval", help="evaluate a run's learned prior on its test (or validation) tasks")
    e.add_argument("run_dir")
    e.add_argument("--split", choices=["test", "val"], default="test",
                   help="'val' draws fresh tasks with eval.val_seed: tune there, report 'test'")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--no-write", action="store_true", help="do not write eval files into the run directory")
    _common(e)
    b = sub.add_parser("bench", help="performance benchmarks (tasks/s, peak memory)")
    b.add_argument("name", help="benchmark name: sine (MMP strategies, memory), rules (tasks/s of every rule), "
                                "omniglot (Conv-4 strategies), miniimagenet (CPU time of Conv-4 iterations: "
                                "today's path, the fast one, the loop) or threads (1 thread vs all cores on a "
                                "finite set; per-solve threads under load)")
    b.add_argument("--device", default="cpu", help="device for the omniglot benchmark (e.g. cuda)")
    b.add_argument("--json", action="store_true")
    b.add_argument("--quick", action="store_true", help="shorter measurement (for smoke tests)")
    pl = sub.add_parser("plot", help="(re)draw a run's figures")
    pl.add_argument("run_dir")
    c = sub.add_parser("compare", help="train several algorithms under one budget; write a comparison report")
    c.add_argument("config", help="compare config, e.g. configs/compare_sine.toml")
    c.add_argument("--out", required=True, help="report directory (README.md, PNGs, results.json; runs/ inside)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a compare-config value, e.g. --set shared.outer.steps=100 (repeatable)")
    _threads(c)
    tu = sub.add_parser("tune", help="search the config's [tune.space] with Optuna on validation tasks")
    tu.add_argument("config", help="run config with [tune] and [tune.space] tables, e.g. configs/tune_sine.toml")
    tu.add_argument("--trials", type=int, default=None,
                    help="finished trials the study should reach (default: tune.trials); running again continues")
    tu.add_argument("--out", default=None, help="output directory (default: tune/<config name>)")
    tu.add_argument("--storage", default=None,
                    help="Optuna storage: sqlite:///PATH.db (default OUT/study.db), journal:PATH (several local "
                         "processes) or an RDB URL such as postgresql://... (several machines)")
    tu.add_argument("--study", default=None, help="study name in the storage (default: the config's name)")
    _common(tu)
    return p


def _eval(args: argparse.Namespace) -> int:
    from metaprox.config import apply_overrides, resolve
    from metaprox.evaluate import eval_table, evaluate_run
    from metaprox.rundir import load_learner, read_config
    from metaprox.runlock import run_lock
    from metaprox.threads import apply_threads
    from metaprox.validate import validate_eval

    where = ("eval.", "device=", "task.data_path=", "task.cache_dir=", "task.decode_workers=")  # not the model
    bad = [o for o in args.overrides if not o.strip().startswith(where)]
    if bad:
        raise ConfigError(f"eval accepts only eval.*, device, task.data_path, task.cache_dir and "
                          f"task.decode_workers overrides, got {bad}.")
    stored = resolve(apply_overrides(read_config(Path(args.run_dir)), args.overrides))
    apply_threads(stored, args.threads)
    if stored["algorithm"] == "finite_mmp":
        return _eval_finite(args, stored)
    learner, cfg, _ = load_learner(args.run_dir, stored)
    validate_eval(cfg, args.split)
    with run_lock(args.run_dir, enabled=not args.no_write):  # no eval files written into a run still training
        result = evaluate_run(args.run_dir, args.split, learner=learner, cfg=cfg, write=not args.no_write)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(eval_table(result), end="")
    return 0


def _eval_finite(args: argparse.Namespace, cfg: dict) -> int:
    """A finite run: per-task, pooled and task-mean metrics of its validation or test rows."""
    from metaprox.finite_eval import evaluate_finite_run, markdown

    result = evaluate_finite_run(args.run_dir, args.split, cfg["eval"]["metrics"], write=not args.no_write)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(markdown(result), end="")
        if not args.no_write:
            print(f"per-task table: {Path(args.run_dir) / f'tasks-{args.split}.csv'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "eval", "compare"):
        from metaprox.malloc import retain_freed_memory

        retain_freed_memory()  # this process is ours: reuse freed pages (METAPROX_MALLOC=system opts out)
    try:
        if args.command == "train":
            from metaprox.config import load_config
            from metaprox.evaluate import eval_table
            from metaprox.threads import apply_threads
            from metaprox.train import train

            cfg = apply_threads(load_config(args.config, args.overrides), args.threads)
            result = train(cfg, args.out, resume="auto" if args.auto_resume else args.resume,
                           progress=not args.quiet, evaluate=not args.no_eval, resume_from=args.resume_from)
            if result and "sets" in result:  # rank 0 only under torchrun
                print(eval_table(result), end="")
                print(f"run directory: {args.out} (plots in {args.out}/plots)")
            elif result:  # a finite task set (algorithm = "finite_mmp"): its validation rows if it has any
                from metaprox.finite_eval import markdown

                print(markdown(result), end="")
                print(f"run directory: {args.out} (per-task table: tasks-{result['eval']['split']}.csv)")
        elif args.command == "eval":
            return _eval(args)
        elif args.command == "bench":
            from metaprox.bench import run_bench

            result = run_bench(args.name, quick=args.quick, device=args.device)
            print(json.dumps(result, indent=1) if args.json else result["markdown"])
        elif args.command == "plot":
            from metaprox.rundir import read_config

            if read_config(Path(args.run_dir))["algorithm"] == "finite_mmp":
                from metaprox.finite_plots import plot_finite_run as plot_run
            else:
                from metaprox.plots import plot_run

            for path in plot_run(args.run_dir):
                print(path)
        elif args.command == "compare":
            from metaprox.compare import load_compare_config, run_compare

            cfg = load_compare_config(args.config, args.overrides)
            if args.threads is not None:  # compare sets every run's threads from OMP_NUM_THREADS (default 1)
                os.environ["OMP_NUM_THREADS"] = str(args.threads)
            threads = os.environ.get("OMP_NUM_THREADS", "(unset)")
            command = " ".join([f"OMP_NUM_THREADS={threads} metaprox compare", args.config, "--out", args.out,
                                *(f"--set '{o}'" for o in args.overrides)])
            run_compare(cfg, args.out, log=lambda m: print(m, file=sys.stderr, flush=True), command=command)
            print(f"report: {args.out}/README.md")
        elif args.command == "tune":
            from metaprox.config import load_config
            from metaprox.threads import apply_threads
            from metaprox.tune import tune_command

            # the trials train in this process: set its threads once
            used = apply_threads(load_config(args.config, args.overrides), args.threads)["threads"]
            summary = tune_command(args.config, args.out, args.trials, args.storage, args.study,
                                   [*args.overrides, f"threads={used}"],
                                   log=lambda m: print(m, file=sys.stderr, flush=True))
            print(json.dumps(summary["best"], indent=1))
    except Exception as e:  # the one error path: metaprox.errors says which are the user's and the exit codes
        return _report(e)
    return 0


def _report(e: Exception) -> int:
    from metaprox.errors import EXIT_DIVERGED, EXIT_USER, user_error_message
    from metaprox.train import TrainingDiverged

    if isinstance(e, TrainingDiverged):
        print(f"metaprox: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    message = user_error_message(e)
    if message is None:
        raise e  # a bug: keep its traceback
    print(f"metaprox: error: {message}", file=sys.stderr)
    return EXIT_USER


def run() -> None:
    """Console entry point (``metaprox``, ``python -m metaprox.cli``): :func:`main`, then exit.

    After a torchrun job whose process group is already destroyed, the process exits without the interpreter's
    teardown: torch 2.13's gloo backend sometimes aborts there ("terminate called without an active
    exception", SIGABRT after all work is done and written), which turned 1 in 11 finished 2-rank jobs (measured)
    into failures reported by torchrun. Every file is closed by then; stdout, stderr and logging are flushed first.
    """
    code = main()
    from metaprox.distributed import joined_process_group

    if joined_process_group():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
