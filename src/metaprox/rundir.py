"""A run directory: resolved config, metrics log, checkpoints, evaluation results and plots — all of one run.

    config.json      resolved config + provenance (metaprox/torch versions, git commit)
    metrics.jsonl    one JSON line per logged iteration (rewritten atomically)
    val_curve.jsonl  periodic validation (``log.eval_every``): step, training time, mean query loss (and accuracy)
                     per set and step
    checkpoint.json + checkpoint-*.safetensors
    eval.json, eval.md, plots/*.png
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from metaprox.checkpoint import CheckpointError, atomic_write, load_checkpoint
from metaprox.config import resolve

__all__ = ["write_config", "read_config", "write_metrics", "read_metrics", "load_learner", "provenance"]


def provenance() -> dict[str, Any]:
    from metaprox import __version__
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"metaprox": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "git_commit": sha}


def write_config(run_dir: Path, cfg: dict[str, Any]) -> None:
    atomic_write(run_dir / "config.json", json.dumps({"config": cfg, "provenance": provenance()}, indent=1))


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a run directory (no config.json); "
                              f"create one with `metaprox train CONFIG --out DIR`.")
    try:
        return resolve(json.loads(path.read_text())["config"])
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e


def write_metrics(run_dir: Path, rows: list[dict[str, Any]], name: str = "metrics.jsonl") -> None:
    atomic_write(run_dir / name, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(run_dir: Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    path = Path(run_dir) / name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_learner(run_dir: Path, cfg: dict[str, Any] | None = None):  # -> tuple[MetaLearner, dict, dict]
    """Rebuild the learner of a run from its config (or ``cfg``, e.g. with another device) and latest checkpoint."""
    from metaprox.build import build_learner

    cfg = read_config(run_dir) if cfg is None else cfg
    learner = build_learner(cfg)
    state, meta = load_checkpoint(run_dir)
    learner.load_state_dict(state)
    return learner, cfg, meta
