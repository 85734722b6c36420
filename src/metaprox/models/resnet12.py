"""ResNet-12, the standard few-shot backbone (Oreshkin et al. 2018; Lee et al. 2019, MetaOptNet; Tian et al. 2020).

Four residual blocks of widths 64-160-320-640; each block is three 3×3 convolutions with BatchNorm (LeakyReLU
0.1 after the first two), a 1×1 convolution + BatchNorm shortcut, LeakyReLU and a 2×2 max-pool
(84 → 42 → 21 → 10 → 5), then global average pooling and a linear head. Convolutions have no bias (BatchNorm
follows each). DropBlock is not included (the recipes here do not use it). LeakyReLU is applied after the
max-pool: LeakyReLU is increasing, so the values and gradients are identical, with 4× less work.

BatchNorm modes are those of :class:`~metaprox.models.conv4.Conv4` (``"batch"``, ``"transductive"``,
``"running"``; pure functions of the parameters, explicit running statistics, the same :meth:`predict`
protocols). :meth:`ResNet12.forward_batched` runs B tasks with B parameter sets: ``task_layout="grouped"`` lays
them out as ``(n, B·C, H, W)`` with grouped convolutions (``groups=B``) and per-task BatchNorm statistics over
B·C channels; ``"per_task"`` runs the tasks in turn in one autograd graph; ``"auto"`` (default) is per task on
CPU (colour images, as Conv-4's measurement found) and grouped elsewhere. Every layout equals a loop of
``functional_call`` to round-off (tested), so every rule — including second-order MAML — can use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaprox.models.bn_protocol import BN_MODES, BatchNormProtocol

__all__ = ["ResNet12", "WIDTHS"]

WIDTHS = (64, 160, 320, 640)
_LAYOUTS = ("auto", "grouped", "per_task")
_CONVS = (("conv1", 3), ("conv2", 3), ("conv3", 3), ("shortcut", 1))  # (name, kernel); BN "bn_" + name


class ResNet12(BatchNormProtocol):
    """ResNet-12 for few-shot classification.

    Args:
        in_channels: image channels (3 for miniImageNet). num_classes: ways of the episodes.
        widths: channels of the four blocks (default 64-160-320-640).
        bn: ``"batch"``, ``"transductive"`` or ``"running"``. momentum, eps: BatchNorm settings.
        negative_slope: of the LeakyReLU (0.1 in the literature).
        channels_last: compute in channels-last memory format (speed only).
        task_layout: ``"auto"``, ``"grouped"`` or ``"per_task"`` (see the module docstring; speed only).

    Parameter names: ``block{i}.{conv1,conv2,conv3,shortcut}.weight``, ``block{i}.bn_{...}.weight/bias``,
    ``head.weight/bias``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 5, widths: tuple[int, ...] | list[int] = WIDTHS,
                 bn: str = "batch", momentum: float = 0.1, eps: float = 1e-5, negative_slope: float = 0.1,
                 channels_last: bool = True, task_layout: str = "auto"):
        super().__init__()
        if bn not in BN_MODES:
            raise ValueError(f"unknown BatchNorm mode {bn!r}; choose one of {BN_MODES}.")
        if task_layout not in _LAYOUTS:
            raise ValueError(f"unknown task_layout {task_layout!r}; choose one of {_LAYOUTS}.")
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) < 1 or min(in_channels, num_classes) < 1:
            raise ValueError(f"ResNet12 needs 4 block widths ≥ 1 and in_channels, num_classes ≥ 1; got widths "
                             f"{widths}, in_channels {in_channels}, num_classes {num_classes}.")
        self.bn, self.momentum, self.eps, self.slope = bn, float(momentum), float(eps), float(negative_slope)
        self.in_channels, self.widths, self.channels_last, self.task_layout = (
            in_channels, widths, channels_last, task_layout)
        chans = (in_channels, *widths)
        for i in range(4):
            block = nn.Module()
            for name, k in _CONVS:
                cin = chans[i] if name in ("conv1", "shortcut") else chans[i + 1]
                block.add_module(name, nn.Conv2d(cin, chans[i + 1], k, padding=k // 2, bias=False))
                block.add_module("bn_" + name, nn.BatchNorm2d(chans[i + 1], eps=eps, momentum=momentum,
                                                             track_running_stats=(bn == "running")))
            self.add_module(f"block{i}", block)
        self.head = nn.Linear(widths[-1], num_classes)

    # ----- input checks and layouts ------------------------------------------------------------------
    def _check(self, x: torch.Tensor, dims: int) -> torch.Tensor:
        if x.dim() != dims or x.shape[-3] != self.in_channels or min(x.shape[-2:]) < 16:
            want = "(n, C, H, W)" if dims == 4 else "(B, n, C, H, W)"
            raise ValueError(f"ResNet12 expects inputs {want} with C = {self.in_channels} and H, W ≥ 16 (four "
                             f"2×2 poolings), got {tuple(x.shape)}.")
        return x

    def _per_task(self, x: torch.Tensor) -> bool:
        if self.task_layout == "auto":
            return x.device.type == "cpu"
        return self.task_layout == "per_task"

    # ----- the network on B tasks laid out as (n, B·C, H, W) --------------------------------------------
    def _norm(self, h: torch.Tensor, p: dict[str, torch.Tensor], key: str, b: int, update_stats: bool):
        gamma, beta = p[key + ".weight"].reshape(-1), p[key + ".bias"].reshape(-1)
        if self._use_batch_stats() and not update_stats:
            return F.batch_norm(h, None, None, gamma, beta, True, 0.0, self.eps)
        module = self.get_submodule(key)
        assert isinstance(module, nn.BatchNorm2d)
        mean, var = module.running_mean, module.running_var  # None unless bn == "running"
        if update_stats:  # b == 1: the buffers are updated in place, as nn.BatchNorm2d does in training
            return F.batch_norm(h, mean, var, gamma, beta, True, self.momentum, self.eps)
        assert mean is not None and var is not None  # not batch statistics: bn == "running" keeps buffers
        return F.batch_norm(h, mean.repeat(b), var.repeat(b), gamma, beta, False, 0.0, self.eps)

    def _grouped(self, p: dict[str, torch.Tensor], x: torch.Tensor, update_stats: bool = False) -> torch.Tensor:
        feats = self._viewed(lambda v: self._grouped_features(p, v, update_stats), x, update_stats)
        return torch.baddbmm(p["head.bias"].unsqueeze(1), feats, p["head.weight"].transpose(1, 2))

    def _grouped_features(self, p: dict[str, torch.Tensor], x: torch.Tensor, update_stats: bool) -> torch.Tensor:
        """The pooled features (B, n, width) of B tasks' images ``x`` (B, n, C, H, W)."""
        b, n, c, hh, ww = x.shape
        h = x.transpose(0, 1).reshape(n, b * c, hh, ww)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        for i in range(4):
            h = self._block(p, h, i, b, update_stats)
        return h.mean((2, 3)).reshape(n, b, -1).transpose(0, 1)

    def _block(self, p: dict[str, torch.Tensor], h: torch.Tensor, i: int, b: int, update_stats: bool):
        def conv_bn(src: torch.Tensor, name: str, k: int) -> torch.Tensor:
            w = p[f"block{i}.{name}.weight"]
            y = F.conv2d(src, w.reshape(b * w.shape[1], *w.shape[2:]), None, padding=k // 2, groups=b)
            return self._norm(y, p, f"block{i}.bn_{name}", b, update_stats)

        out = F.leaky_relu(conv_bn(h, "conv1", 3), self.slope)
        out = F.leaky_relu(conv_bn(out, "conv2", 3), self.slope)
        out = conv_bn(out, "conv3", 3) + conv_bn(h, "shortcut", 1)
        return F.leaky_relu(F.max_pool2d(out, 2), self.slope)

    # ----- public forwards -----------------------------------------------------------------------------
    def _forward(self, p: dict[str, torch.Tensor], x: torch.Tensor, update_stats: bool = False) -> torch.Tensor:
        x = self._check(x, 4)
        return self._grouped({k: v.unsqueeze(0) for k, v in p.items()}, x.unsqueeze(0), update_stats)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, num_classes)`` for images ``(n, C, H, W)``."""
        return self._forward(self._params(None), x)

    def forward_batched(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n, num_classes)``: task b uses ``{k: v[b] for k, v in params.items()}`` on ``x[b]``."""
        x = self._check(x, 5)
        if self._per_task(x):
            return torch.cat([self._grouped({k: v[i:i + 1] for k, v in params.items()}, x[i:i + 1])
                              for i in range(x.shape[0])])
        return self._grouped(params, x)
