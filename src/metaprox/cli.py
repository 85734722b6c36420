"""The ``metaprox`` command: ``train``, ``eval``, ``bench`` and ``plot``.

    metaprox train CONFIG --out DIR [--set key=value ...] [--resume | --auto-resume] [--no-eval]
    torchrun --nproc-per-node N -m metaprox.cli train ...    (task-parallel over N processes; docs/distributed.md)
    metaprox eval DIR [--split test|val] [--set eval.key=value ...] [--json]
    metaprox bench NAME [--json] [--device cuda]
    metaprox plot DIR
    metaprox compare CONFIG --out DIR [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from metaprox.checkpoint import CheckpointError
from metaprox.config import ConfigError

__all__ = ["main", "build_parser"]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set outer.steps=1000 (repeatable)")


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
    b.add_argument("name", help="benchmark name: sine (MMP strategies, memory), rules (tasks/s of every rule) or "
                                "omniglot (Conv-4 strategies)")
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
    return p


def _eval(args: argparse.Namespace) -> int:
    from metaprox.config import apply_overrides, resolve
    from metaprox.evaluate import _table, evaluate_run
    from metaprox.rundir import load_learner, read_config

    where = ("eval.", "device=", "task.data_path=", "task.cache_dir=", "task.decode_workers=")  # not the model
    bad = [o for o in args.overrides if not o.strip().startswith(where)]
    if bad:
        raise ConfigError(f"eval accepts only eval.*, device, task.data_path, task.cache_dir and "
                          f"task.decode_workers overrides, got {bad}.")
    cfg = resolve(apply_overrides(read_config(Path(args.run_dir)), args.overrides))
    learner, cfg, _ = load_learner(args.run_dir, cfg)
    result = evaluate_run(args.run_dir, args.split, learner=learner, cfg=cfg, write=not args.no_write)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(_table(result), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from metaprox.config import load_config
            from metaprox.evaluate import _table
            from metaprox.train import train

            cfg = load_config(args.config, args.overrides)
            result = train(cfg, args.out, resume="auto" if args.auto_resume else args.resume,
                           progress=not args.quiet, evaluate=not args.no_eval)
            if result and "sets" in result:  # rank 0 only under torchrun
                print(_table(result), end="")
                print(f"run directory: {args.out} (plots in {args.out}/plots)")
            elif result:  # a finite task set (algorithm = "finite_mmp")
                print((Path(args.out) / "eval.md").read_text(), end="")
                print(f"run directory: {args.out}")
        elif args.command == "eval":
            return _eval(args)
        elif args.command == "bench":
            from metaprox.bench import run_bench

            result = run_bench(args.name, quick=args.quick, device=args.device)
            print(json.dumps(result, indent=1) if args.json else result["markdown"])
        elif args.command == "plot":
            from metaprox.plots import plot_run

            for path in plot_run(args.run_dir):
                print(path)
        elif args.command == "compare":
            from metaprox.compare import load_compare_config, run_compare

            cfg = load_compare_config(args.config, args.overrides)
            threads = os.environ.get("OMP_NUM_THREADS", "(unset)")
            command = " ".join([f"OMP_NUM_THREADS={threads} metaprox compare", args.config, "--out", args.out,
                                *(f"--set '{o}'" for o in args.overrides)])
            run_compare(cfg, args.out, log=lambda m: print(m, file=sys.stderr, flush=True), command=command)
            print(f"report: {args.out}/README.md")
    except (ConfigError, CheckpointError, ValueError, TypeError, KeyError) as e:
        print(f"metaprox: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from metaprox.train import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            print(f"metaprox: {e}", file=sys.stderr)
            return 3
        raise
    return 0


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
