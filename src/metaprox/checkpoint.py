"""Checkpoints: tensors in safetensors, everything else (config, step, RNG states) in JSON; atomic writes.

Layout in a run directory::

    checkpoint.json                 ← names the current tensors file and the kept ones, with their sha256s
    checkpoint-000123.safetensors   ← meta-parameters and optimizer tensors at step 123, and in its header the
                                      metadata (step, RNG and optimizer state, ...): self-contained, one checksum

Every file is written to a temporary name, flushed, fsynced and renamed (with the permissions the umask gives),
so a crash never leaves a half-written file under a real name; ``checkpoint.json`` is replaced last, so it always
describes complete tensors files. Any kept checkpoint can be resumed from (``load_checkpoint(dir, step)``,
``metaprox train --resume-from STEP``); ``checkpoint.json`` repeats the current file's metadata for readers, and
a disagreement with the file's own copy (an edited ``step``) is an error. Nothing is ever unpickled.
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

__all__ = ["CheckpointError", "atomic_write", "save_checkpoint", "load_checkpoint", "remove_leftovers", "encode_rng",
           "decode_rng"]

FORMAT_VERSION = 2  # 2: the metadata also inside each tensors file (1: only in checkpoint.json; still read)
_HEADER_KEY = "metaprox"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated or does not fit the run."""


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files get the usual permissions
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    meta = {"format": FORMAT_VERSION, "step": step, "param_names": list(learner_state["params"]),
            "optimizer": opt_rest, "base_lrs": learner_state["base_lrs"],
            "generator": encode_rng(learner_state["generator"]), **extra}
    # the metadata travels inside the tensors file, so its sha256 covers both and each kept file resumes alone
    blob = st_save(tensors, metadata={_HEADER_KEY: json.dumps(meta)})
    name = f"checkpoint-{step:07d}.safetensors"
    atomic_write(run_dir / name, blob)
    entry = {"step": step, "tensors": name, "sha256": hashlib.sha256(blob).hexdigest()}
    kept = [e for e in _kept(run_dir) if e["step"] < step][-(keep - 1):] if keep > 1 else []
    kept.append(entry)
    atomic_write(run_dir / "checkpoint.json", json.dumps({**meta, **entry, "kept": kept}, indent=1))
    _remove_unlisted_tensors(run_dir)
    return run_dir / "checkpoint.json"


def _kept(run_dir: Path) -> list[dict[str, Any]]:
    """The checkpoints ``checkpoint.json`` lists as kept (oldest first); [] if none or unreadable."""
    try:
        meta = json.loads((run_dir / "checkpoint.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(meta, dict):
        return []
    if "kept" in meta:
        return list(meta["kept"])
    return [{k: meta[k] for k in ("step", "tensors", "sha256")}] if "tensors" in meta else []  # format 1


def remove_leftovers(run_dir: str | Path) -> None:
    """Delete what an interrupted writer left in ``run_dir``: temporaries of :func:`atomic_write` and tensors files
    no checkpoint names (a kill between writing them and committing ``checkpoint.json``). Only the run directory's
    lock holder calls this (:mod:`metaprox.runlock`)."""
    run_dir = Path(run_dir)
    for p in run_dir.glob(".*.tmp"):
        p.unlink(missing_ok=True)
    _remove_unlisted_tensors(run_dir)


def _remove_unlisted_tensors(run_dir: Path) -> None:
    if (run_dir / "checkpoint.json").is_file() and not _kept(run_dir):
        return  # unreadable: leave everything for the error message of load_checkpoint
    named = {e["tensors"] for e in _kept(run_dir)}
    for p in run_dir.glob("checkpoint-*.safetensors"):
        if p.name not in named:
            p.unlink(missing_ok=True)


def _header_meta(blob: bytes, where: Path) -> dict[str, Any] | None:
    """The metadata a format-2 tensors file carries in its safetensors header (None for format 1)."""
    try:
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + size])
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint tensors {str(where)!r} cannot be read: {e}") from e
    text = (header.get("__metadata__") or {}).get(_HEADER_KEY)
    return None if text is None else json.loads(text)


def load_checkpoint(run_dir: str | Path, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``(learner_state, meta)`` of the last checkpoint, or of the kept one of ``step``; raises
    :class:`CheckpointError` on any missing or damaged file, and when ``checkpoint.json`` disagrees with the
    metadata inside the tensors file (which the file's sha256 covers)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "checkpoint.json"
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint in {str(run_dir)!r} (checkpoint.json missing): the run has not saved "
                              f"one yet (`metaprox train` saves one every log.checkpoint_every steps and at its end).")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt (not valid JSON: {e}).") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is corrupt (not a JSON object).")
    for key in ("format", "step", "tensors", "sha256", "param_names", "optimizer", "generator"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} is incomplete: key {key!r} missing.")
    if meta["format"] not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{meta_path} has format {meta['format']}, this metaprox reads 1 and {FORMAT_VERSION}.")
    entry = {k: meta[k] for k in ("step", "tensors", "sha256")}
    if step is not None:
        kept = {int(e["step"]): e for e in _kept(run_dir)}
        if int(step) not in kept:
            raise CheckpointError(f"no kept checkpoint of step {step} in {str(run_dir)!r}; it keeps steps "
                                  f"{sorted(kept)}.")
        entry = kept[int(step)]
    tpath = run_dir / entry["tensors"]
    if not tpath.is_file():
        raise CheckpointError(f"checkpoint tensors {str(tpath)!r} are missing.")
    blob = tpath.read_bytes()
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"checkpoint tensors {str(tpath)!r} are corrupt or truncated "
                              f"(sha256 does not match checkpoint.json).")
    inner = _header_meta(blob, tpath)
    if inner is None:  # format 1: the metadata lives only in checkpoint.json
        inner = {k: v for k, v in meta.items() if k not in ("tensors", "sha256", "kept")}
    elif step is None:
        changed = [k for k, v in inner.items() if meta.get(k) != v]
        if changed:
            raise CheckpointError(f"{meta_path} disagrees with its tensors file {tpath.name} on {changed} (edited, "
                                  f"or mixed with another run's files); the tensors file's copy is covered by its "
                                  f"sha256: restore checkpoint.json, or resume a kept checkpoint with --resume-from.")
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint tensors {str(tpath)!r} cannot be read: {e}") from e
    names = inner["param_names"]
    state = {"step": inner["step"], "params": {n: tensors[f"params/{n}"] for n in names},
             "optimizer": _join_optimizer(tensors, inner["optimizer"]), "base_lrs": inner["base_lrs"],
             "generator": decode_rng(inner["generator"])}
    if "inner_moments_t" in inner:
        state["inner_moments"] = {"t": inner["inner_moments_t"],
                                  **{w: {n: tensors[f"inner_{w}/{n}"] for n in names} for w in ("m", "s")}}
    if "buffer_names" in inner:
        state["buffers"] = {n: tensors[f"buffers/{n}"] for n in inner["buffer_names"]}
    return state, {**inner, **entry}
