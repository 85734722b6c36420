"""The ``population`` BatchNorm test protocol: every example normalised with statistics of the training classes.

A backbone trained with batch statistics (``model.bn = "batch"`` or ``"transductive"``, e.g. one pretrained with
cross-entropy, :mod:`metaprox.pretrain`) has no running statistics. The two test protocols it already has both
take statistics from the episode: ``"transductive"`` from the query batch (information flows between queries),
``"batch"`` from the support set plus one query (6 images in 5-way 1-shot: noisy). ``eval.bn = "population"``
takes them from neither: before an evaluation, each BatchNorm layer's mean and variance are estimated for the
prior ``w`` on ``eval.bn_images`` images of the *training* classes (a fixed seeded draw, no augmentation) —
the average of per-batch means and unbiased variances over batches of ``BATCH`` images, as BatchNorm's
running estimate would converge to ("precise BN", Wu & Johnson 2021). Within the protocol the model is in
``eval()`` mode with ``bn = "running"``: the test-time solve, the prototype head init and the query predictions
all normalise with these fixed statistics, so each query's prediction depends only on the support set and
itself (non-transductive), as the eval-mode BatchNorm of Meta-Baseline / RFS evaluations.

The statistics are those of ``w``; adapted task parameters reuse them (they move little from ``w``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["training_images", "population_bn", "BATCH"]

BATCH = 128  # images per batch of the estimate (the pretraining's batch size)


def training_images(family: Any, count: int, seed: int) -> tuple[torch.Tensor, float]:
    """``count`` images of ``family``'s training split (a seeded draw without replacement), as stored (e.g.
    uint8), and the factor that turns them into the model's float input."""
    sampler: Any = getattr(family, "train", None)
    data = getattr(sampler, "data", None)
    if not isinstance(data, torch.Tensor) or data.dim() != 4:
        raise ValueError(f"eval.bn = 'population' estimates BatchNorm statistics on the training images of a "
                         f"few-shot image family (task.family = 'fewshot'); {type(family).__name__} has none. "
                         f"Use eval.bn = 'batch' or 'transductive'.")
    if count < 2:
        raise ValueError(f"eval.bn_images = {count}: the estimate needs at least 2 training images.")
    rows = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return data[rows.to(data.device)], float(sampler.scale)


def _norm_layers(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@contextmanager
def population_bn(learner: Any, images: torch.Tensor, scale: float) -> Iterator[str]:
    """Within the block ``learner``'s backbone normalises with the population statistics of its prior ``w`` on
    ``images`` (times ``scale``); its own BatchNorm mode, train/eval state and (absent) buffers are restored after.
    Yields ``"population"``."""
    from metaprox.config import ConfigError

    module: Any = learner.fmodel.module
    layers = _norm_layers(module)
    own = getattr(module, "bn", "")
    if own not in ("batch", "transductive") or not layers or not callable(getattr(module, "update_running_stats",
                                                                                    None)):
        raise ConfigError(f"eval.bn = 'population' needs a BatchNorm backbone trained with batch statistics "
                          f"(Conv-4 or ResNet-12 with model.bn = 'batch' or 'transductive'); this "
                          f"{type(module).__name__} has model.bn = {own!r}.")
    was_training, momentum, fmodel_buffers = module.training, module.momentum, learner.fmodel.buffers
    params = dict(zip(learner.names, (p.detach() for p in learner.fmodel.params()), strict=True))
    dev = params[learner.names[0]].device
    try:
        for layer in layers:  # registered as None buffers (track_running_stats=False): give them tensors
            layer.running_mean = torch.zeros(layer.num_features, device=dev)
            layer.running_var = torch.ones(layer.num_features, device=dev)
        module.bn = "running"
        with torch.no_grad():
            for k, lo in enumerate(range(0, images.shape[0], BATCH)):
                x = images[lo:lo + BATCH].to(dev).float() * scale
                if x.shape[0] < 2:  # a lone image has no variance: the last ragged batch of one is skipped
                    break
                module.momentum = 1.0 / (k + 1)  # cumulative average of the per-batch statistics
                module.update_running_stats(x, params)
        module.eval()  # momentum is restored below; eval mode never reads it
        learner.fmodel.buffers = dict(module.named_buffers())  # functional_call (strict) sees the statistics
        yield "population"
    finally:
        module.momentum, module.bn = momentum, own
        module.train(was_training)
        learner.fmodel.buffers = fmodel_buffers
        for layer in layers:
            layer.running_mean = None
            layer.running_var = None
