"""Checkpoints: tensors in safetensors, everything else (config, step, RNG states) in JSON; atomic writes.

Layout in a run directory::

    checkpoint.json                 ← points at the current tensors file and records its sha256
    checkpoint-000123.safetensors   ← meta-parameters and optimizer tensors at step 123

Every file is written to a temporary name, flushed, fsynced and renamed, so a crash never leaves a half-written
file under a real name; ``checkpoint.json`` is replaced last, so it always describes a complete tensors file.
Nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["CheckpointError", "atomic_write", "save_checkpoint", "load_checkpoint", "encode_rng", "decode_rng"]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated or does not fit the run."""


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno:  # a full disk: say which file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _split_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": opt_state["param_groups"], "state": {}}
    for idx, st in opt_state["state"].items():
        rest["state"][str(idx)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer/{idx}/{k}"] = v.detach().cpu().contiguous()
                rest["state"][str(idx)][k] = {"tensor": f"optimizer/{idx}/{k}"}
            else:
                rest["state"][str(idx)][k] = v
    return tensors, rest


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for idx, st in rest["state"].items():
        state[int(idx)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in st.items()}
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(run_dir: str | Path, learner_state: dict[str, Any], extra: dict[str, Any],
                    keep: int = 2) -> Path:
    """Save a learner state (from ``MetaLearner.state_dict``) plus JSON-able ``extra`` into ``run_dir``."""
    run_dir = Path(run_dir)
    step = int(learner_state["step"])
    tensors = {f"params/{k}": v.detach().cpu().contiguous() for k, v in learner_state["params"].items()}
    opt_tensors, opt_rest = _split_optimizer(learner_state["optimizer"])
    tensors.update(opt_tensors)
    moments = learner_state.get("inner_moments")
    if moments is not None:  # Adam(carry_moments=True): the inner solver's running moments
        for which in ("m", "s"):
            tensors.update({f"inner_{which}/{k}": v.detach().cpu().contiguous() for k, v in moments[which].items()})
        extra = {**extra, "inner_moments_t": int(moments["t"])}
    buffers = learner_state.get("buffers") or {}  # a rule's own tensors (e.g. FiniteMMP's tree node centers)
    tensors.update({f"buffers/{k}": v.detach().cpu().contiguous() for k, v in buffers.items()})
    if buffers:
        extra = {**extra, "buffer_names": list(buffers)}
    blob = st_save(tensors)
    name = f"checkpoint-{step:07d}.safetensors"
    atomic_write(run_dir / name, blob)
    meta = {
        "format": FORMAT_VERSION, "step": step, "tensors": name, "sha256": hashlib.sha256(blob).hexdigest(),
        "param_names": list(learner_state["params"]), "optimizer": opt_rest,
        "base_lrs": learner_state["base_lrs"], "generator": encode_rng(learner_state["generator"]), **extra,
    }
    atomic_write(run_dir / "checkpoint.json", json.dumps(meta, indent=1))
    for old in sorted(run_dir.glob("checkpoint-*.safetensors"))[:-keep]:
        old.unlink()
    return run_dir / "checkpoint.json"


def load_checkpoint(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``(learner_state, meta)``; raises :class:`CheckpointError` on any missing or damaged file."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "checkpoint.json"
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint in {str(run_dir)!r} (checkpoint.json missing): the run has not saved "
                              f"one yet (`metaprox train` saves one every log.checkpoint_every steps and at its end).")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt (not valid JSON: {e}).") from e
    for key in ("format", "step", "tensors", "sha256", "param_names", "optimizer", "generator"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} is incomplete: key {key!r} missing.")
    if meta["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} has format {meta['format']}, this metaprox reads {FORMAT_VERSION}.")
    tpath = run_dir / meta["tensors"]
    if not tpath.is_file():
        raise CheckpointError(f"checkpoint tensors {str(tpath)!r} are missing.")
    blob = tpath.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"checkpoint tensors {str(tpath)!r} are corrupt or truncated "
                              f"(sha256 does not match checkpoint.json).")
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint tensors {str(tpath)!r} cannot be read: {e}") from e
    params = {n: tensors[f"params/{n}"] for n in meta["param_names"]}
    state = {"step": meta["step"], "params": params, "optimizer": _join_optimizer(tensors, meta["optimizer"]),
             "base_lrs": meta["base_lrs"], "generator": decode_rng(meta["generator"])}
    if "inner_moments_t" in meta:
        state["inner_moments"] = {"t": meta["inner_moments_t"],
                                  **{w: {n: tensors[f"inner_{w}/{n}"] for n in meta["param_names"]}
                                     for w in ("m", "s")}}
    if "buffer_names" in meta:
        state["buffers"] = {n: tensors[f"buffers/{n}"] for n in meta["buffer_names"]}
    return state, meta
