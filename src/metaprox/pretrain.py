"""Pretraining the backbone with plain cross-entropy on all training classes, before meta-training.

The pretrain-then-meta-train pipeline of Meta-Baseline (Chen et al. 2021) and RFS (Tian et al. 2020): the run's
model is built with one output per *training class* (64 for miniImageNet) and trained as an ordinary classifier on
the training split — minibatch SGD with Nesterov momentum, weight decay, label smoothing, random flips and padded
random crops, a cosine learning rate. Its head is then dropped: meta-training starts from the pretrained
backbone with the ``ways``-output head set to zero (every class alike, as episode labels are a random
permutation), so the prior's test-time adaptation learns the head from the support set.

Selection uses the validation classes only: every ``pretrain.eval_every`` steps (and at the end) the backbone
is scored by nearest-centroid accuracy on ``log.eval_tasks`` validation episodes (query and support embedded as
separate batches — BatchNorm statistics of each set, the transductive protocol); the best-scoring backbone is
kept. This score selects a pretraining checkpoint; it is a prototype classifier, not MMP's test-time adaptation.

``pretrain.minutes`` (> 0) bounds pretraining by wall clock: the cosine schedule then runs over whichever of
``pretrain.epochs`` or the time budget ends first, so a short budget still anneals the learning rate.

``pretrain.precision = "bfloat16"`` runs each training step's forward and backward under bf16 autocast (the
weights, the optimizer and the validation stay float32): on a CPU with AVX512-BF16 it halves the time per step
of Conv-4 (``benchmarks/pretrain_precision.py``), so a time budget buys twice the epochs. Its effect on accuracy
is read on the validation curve, like any other setting.

``pretrain.backbone`` (a run directory) starts from the backbone another run pretrained instead (its summary and
seconds are copied into this run's ``pretrain.json``), e.g. one backbone for both the 1-shot and the 5-shot runs.

Files in the run directory: ``pretrain_curve.jsonl`` (one row per validation: step, epoch, seconds, lr, training
loss and accuracy since the previous row, validation prototype accuracy), ``pretrain.safetensors`` (the selected
backbone) and ``pretrain.json`` (its step, the seconds spent, the config); a rerun finding them reuses them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.func import functional_call

from metaprox.checkpoint import atomic_write
from metaprox.config import ConfigError
from metaprox.rundir import write_metrics

__all__ = ["pretrain_backbone", "start_from_backbone", "prototype_accuracy", "load_backbone", "embed", "PRETRAIN_CURVE",
           "HEAD_PREFIX"]

PRETRAIN_CURVE = "pretrain_curve.jsonl"
HEAD_PREFIX = "head."  # the classifier's parameters (replaced after pretraining); the rest is the backbone


def embed(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Features before the linear head: the head replaced by the identity (exact: F.linear(h, I, 0) = h)."""
    width = params["head.weight"].shape[1]
    eye = torch.eye(width, device=x.device, dtype=params["head.weight"].dtype)
    return functional_call(model, {**params, "head.weight": eye, "head.bias": eye.new_zeros(width)}, (x,))


@torch.no_grad()
def prototype_accuracy(model: torch.nn.Module, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
    """Per-episode nearest-centroid accuracy (Euclidean) of the features of ``params`` on an EpisodeBatch.

    Support and query are embedded as separate batches (each normalised by its own BatchNorm statistics).
    """
    out = []
    for t in range(batch.x.shape[0]):
        ways = int(batch.y[t].max()) + 1
        fs, fq = embed(model, params, batch.x[t]), embed(model, params, batch.x_query[t])
        centroids = torch.zeros(ways, fs.shape[1], device=fs.device).index_add_(0, batch.y[t], fs)
        centroids /= torch.bincount(batch.y[t], minlength=ways).unsqueeze(1)
        pred = torch.cdist(fq, centroids).argmin(1)
        out.append((pred == batch.y_query[t]).double().mean())
    return torch.stack(out).cpu()


def _augment(x: torch.Tensor, flip: bool, pad: int, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random crops of the zero-padded images, per image, vectorised."""
    n, _, h, w = x.shape
    dev = x.device
    if flip:
        mirror = (torch.rand(n, generator=g) < 0.5).to(dev)
        x = torch.where(mirror.view(n, 1, 1, 1), x.flip(-1), x)
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(dev)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(dev)
        rows = (dy.view(n, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w)
        chans = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
        x = xp[torch.arange(n, device=dev).view(n, 1, 1, 1), chans, rows, cols]  # (n, C, h, w) by broadcasting
    return x


def _settings_key(cfg: dict[str, Any]) -> str:
    """What the pretrained backbone depends on: a rerun reuses pretrain.safetensors only when this matches."""
    keep = {"seed": cfg["seed"], "task": cfg["task"], "model": cfg["model"], "pretrain": cfg["pretrain"],
            "val": [cfg["eval"]["val_seed"], cfg["log"]["eval_tasks"]]}
    keep["task"] = {k: v for k, v in keep["task"].items() if k not in ("data_path", "cache_dir", "decode_workers")}
    if keep["pretrain"].get("precision") == "float32":  # the default: keys of runs from before the option match
        keep["pretrain"] = {k: v for k, v in keep["pretrain"].items() if k != "precision"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def load_backbone(run_dir: Path, cfg: dict[str, Any] | None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The backbone pretrained in ``run_dir`` (intact, and with the settings of ``cfg`` unless None), or None."""
    meta_path, tensors_path = run_dir / "pretrain.json", run_dir / "pretrain.safetensors"
    if not (meta_path.is_file() and tensors_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    blob = tensors_path.read_bytes()
    if (cfg is not None and meta.get("settings") != _settings_key(cfg)) or \
            hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        return None
    return st_load(blob), meta


def pretrain_backbone(cfg: dict[str, Any], family: Any, run_dir: Path, progress: bool = False
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pretrain (or reuse) the backbone of ``cfg``'s model; returns (backbone parameters, summary).

    ``family`` is the run's few-shot task family (its training sampler holds the training images, grouped by
    class); the summary has the selected step, the seconds spent and the validation score.
    """
    from metaprox.build import build_model

    source = cfg["pretrain"]["backbone"]
    if source:  # another run's pretrained backbone (e.g. one backbone for the 1-shot and the 5-shot runs)
        found = load_backbone(Path(source), None)
        if found is None:
            raise ConfigError(f"pretrain.backbone = {source!r}: no intact pretrain.safetensors + pretrain.json there.")
        backbone, summary = found
        atomic_write(run_dir / "pretrain.json", json.dumps({**summary, "source": str(source)}, indent=1))
        return backbone, summary
    reused = load_backbone(run_dir, cfg)
    if reused is not None:
        return reused
    p, dev = cfg["pretrain"], torch.device(cfg["device"])
    if cfg["model"].get("bn") == "running":
        raise ConfigError("pretraining needs model.bn = 'batch' or 'transductive' (batch statistics), not 'running'.")
    sampler = family.train
    if sampler.rotations:
        raise ConfigError("pretraining classifies the training classes; it does not support task.rotations.")
    counts = sampler.counts
    labels = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts).to(dev)
    data, scale = sampler.data, sampler.scale
    n, num_classes = labels.shape[0], len(counts)
    batch = int(p["batch_size"])
    if batch < 2 or batch > n:
        raise ConfigError(f"pretrain.batch_size = {batch}: must lie in 2..{n} (the training images).")
    per_epoch = n // batch
    total = max(1, int(round(p["epochs"] * per_epoch)))
    budget = 60.0 * p["minutes"] if p["minutes"] > 0 else math.inf

    torch.manual_seed(cfg["seed"])
    model = build_model({**cfg, "task": {**cfg["task"], "ways": num_classes}}).to(dev)
    if not any(name.startswith(HEAD_PREFIX) for name, _ in model.named_parameters()):
        raise ConfigError(f"pretraining needs a model whose classifier parameters are named '{HEAD_PREFIX}*'.")
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=0.9, nesterov=True,
                          weight_decay=p["weight_decay"])
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    val = family.eval_sampler("val").sample_batch(int(cfg["log"]["eval_tasks"]),
                                                   torch.Generator().manual_seed(cfg["eval"]["val_seed"]))

    rows: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] = (-1.0, 0, {})
    seen_loss, seen_correct, seen_n = 0.0, 0, 0
    clock, step, order = 0.0, 0, torch.empty(0, dtype=torch.long)

    def validate(lr: float) -> None:
        nonlocal best, seen_loss, seen_correct, seen_n
        params = {k: v.detach() for k, v in model.named_parameters()}
        acc = float(prototype_accuracy(model, params, val).mean())
        rows.append({"step": step, "epoch": step / per_epoch, "time": clock, "lr": lr,
                     "train_loss": seen_loss / max(seen_n, 1), "train_accuracy": seen_correct / max(seen_n, 1),
                     "val_prototype_accuracy": acc, "val_tasks": int(val.x.shape[0])})
        write_metrics(run_dir, rows, PRETRAIN_CURVE)
        if progress:
            print(f"pretrain step {step} (epoch {step / per_epoch:.2f}, {clock / 60:.1f} min): train loss "
                  f"{rows[-1]['train_loss']:.3f} acc {rows[-1]['train_accuracy']:.3f}, val prototype acc {acc:.4f}",
                  flush=True)
        if acc > best[0]:
            best = (acc, step, {k: v.clone() for k, v in params.items() if not k.startswith(HEAD_PREFIX)})
        seen_loss, seen_correct, seen_n = 0.0, 0, 0

    run_dir.mkdir(parents=True, exist_ok=True)
    every = int(p["eval_every"]) or per_epoch
    low_precision = p["precision"] == "bfloat16"  # the forward/backward only: weights, SGD and validation are fp32
    lr = p["lr"]
    while step < total and clock < budget:
        start = time.perf_counter()
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=g)
        idx = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch].to(dev)
        x = _augment(data[idx].float() * scale, p["flip"], int(p["crop_pad"]), g)
        y = labels[idx]
        lr = 0.5 * p["lr"] * (1.0 + math.cos(math.pi * min(1.0, max(step / total, clock / budget))))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=low_precision):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=p["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen_loss += float(loss.detach()) * len(y)
        seen_correct += int((logits.argmax(1) == y).sum())
        seen_n += len(y)
        step += 1
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        clock += time.perf_counter() - start  # validation time is excluded, as in the meta-training clock
        if step % every == 0:
            validate(lr)
    if not rows or rows[-1]["step"] != step:
        validate(lr)
    acc, best_step, backbone = best
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in backbone.items()})
    summary = {"step": best_step, "steps": step, "epochs": step / per_epoch, "seconds": clock,
               "val_prototype_accuracy": acc, "val_tasks": int(val.x.shape[0]), "classes": num_classes,
               "images": n, "settings": _settings_key(cfg), "sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write(run_dir / "pretrain.safetensors", blob)
    atomic_write(run_dir / "pretrain.json", json.dumps(summary, indent=1))
    return {k: v.cpu() for k, v in backbone.items()}, summary


def start_from_backbone(learner: Any, backbone: dict[str, torch.Tensor]) -> None:
    """Set a learner's prior to the pretrained backbone and a zero head (no class favoured before adaptation)."""
    names = [n for n in learner.names if not n.startswith(HEAD_PREFIX)]
    if sorted(names) != sorted(backbone):
        raise ConfigError(f"the pretrained backbone has parameters {sorted(backbone)}, the model {sorted(names)}.")
    with torch.no_grad():
        for name, param in zip(learner.names, learner.fmodel.params(), strict=True):
            if name.startswith(HEAD_PREFIX):
                param.zero_()
            else:
                param.copy_(backbone[name])
