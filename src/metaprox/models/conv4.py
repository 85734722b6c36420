"""Conv-4, the few-shot backbone of MAML / Reptile / MMP: 4 × (conv3×3 → BN → ReLU → maxpool 2) → linear.

BatchNorm behaviour is an explicit option, and every mode is a *pure function* of the parameters (no buffer is
written during a forward pass, so ``functional_call``, ``vmap`` and the batched path all agree):

- ``"batch"``: normalise with the statistics of the current batch, always (no running statistics exist).
  Training uses the support set's statistics. For a non-transductive test, :meth:`Conv4.predict` evaluates
  each query example together with the support set (Nichol et al. 2018): statistics never mix query examples.
- ``"transductive"``: batch statistics as well, and at test time :meth:`Conv4.predict` normalises the query
  batch with its own statistics (as MAML's and Reptile's reported numbers do).
- ``"running"``: BatchNorm keeps ``running_mean`` / ``running_var`` buffers. In ``train()`` mode a forward
  uses batch statistics and does *not* update the buffers; call :meth:`Conv4.update_running_stats`
  explicitly (e.g. with the meta-parameters on a minibatch of support sets after each outer step). In
  ``eval()`` mode the buffers normalise (shared by every task in :meth:`forward_batched`).

:meth:`Conv4.forward_batched` runs B tasks with B parameter sets at once: inputs ``(B, n, C, H, W)`` are
laid out as ``(n, B·C, H, W)``; each conv is one grouped convolution (``groups=B``), BatchNorm one call over
B·O channels (per-task statistics), the head one ``baddbmm``; with ``channels_last`` the first layer
is im2col + one einsum instead. ReLU is applied after the pooling (identical
values and gradients, 4× less work). ``channels_last=True`` (default) is much faster on CPU, mainly because
max-pooling in NCHW layout is slow there.

``task_layout`` chooses how :meth:`Conv4.forward_batched` stacks the tasks: ``"grouped"`` (the layout above),
``"per_task"`` (each task's network in turn, one autograd graph for all: equal to ``"grouped"`` to round-off)
or ``"auto"`` (default): per task on CPU for colour images (``in_channels`` ≥ 2), else grouped. With C ≥ 2 the
first layer's im2col + einsum costs ~3× a plain convolution and the grouped convolutions are slower than B
plain ones; with C = 1 the grouped layout wins by its lower per-call overhead. CPU seconds per gradient of 5
tasks, one thread, grouped → per task: miniImageNet 75 images 84×84 1.39 → 1.01, 5 images 0.099 → 0.083;
CIFAR 32×32 25 images 0.068 → 0.051; Omniglot 30 images 28×28 0.052 → 0.092, 1×56×56 0.20 → 0.32
(``metaprox bench miniimagenet`` measures whole outer iterations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaprox.models.bn_protocol import BN_MODES, BatchNormProtocol

__all__ = ["Conv4", "BN_MODES", "TASK_LAYOUTS"]

TASK_LAYOUTS = ("auto", "grouped", "per_task")


class Conv4(BatchNormProtocol):
    """Four conv blocks and a linear head.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for miniImageNet / CIFAR).
        num_classes: ways of the episodes (outputs of the head); 0: no head, the output is the flattened
            features (filters · s²) — a trunk for per-kind heads (:class:`~metaprox.models.SharedTrunk`).
        filters: channels of every conv layer (32 or 64 in the literature; any ≥ 1 works).
        image_size: side of the square input; sets the head's input width (filters · s², s = size halved 4×).
        bn: ``"batch"``, ``"transductive"`` or ``"running"`` (see the module docstring).
        momentum, eps: BatchNorm momentum (running mode) and epsilon.
        channels_last: compute in channels-last memory format (speed only; default True, faster on CPU).
        task_layout: ``"auto"``, ``"grouped"`` or ``"per_task"``: how :meth:`forward_batched` stacks tasks
            (speed only; see the module docstring).
        cosine_scale: 0 (default) = the plain linear head on the flattened features; s > 0 = the head sees the
            features L2-normalised and scaled by s, ``logits = W (s·h/‖h‖) + b`` (a cosine-similarity head with
            a fixed temperature, as in Baseline++ / SimpleShot's L2N: on pretrained Conv-4 features it raised
            5-way 1-shot prototype accuracy by 4.7 points, reports/miniimagenet).

    Parameter names: ``conv{i}.weight``, ``norm{i}.weight/bias`` (i = 0..3), ``head.weight/bias``. The
    convs have no bias: BatchNorm's shift makes it redundant, and with batch statistics its gradient is
    exactly zero, so an adaptive inner solver (Adam) would turn pure round-off into ±lr steps.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        filters: int = 32,
        image_size: int = 28,
        bn: str = "batch",
        momentum: float = 0.1,
        eps: float = 1e-5,
        channels_last: bool = True,
        task_layout: str = "auto",
        cosine_scale: float = 0.0,
    ):
        super().__init__()
        if not cosine_scale >= 0:
            raise ValueError(f"cosine_scale must be ≥ 0 (0 = plain linear head), got {cosine_scale}.")
        self.cosine_scale = float(cosine_scale)
        if bn not in BN_MODES:
            raise ValueError(f"unknown BatchNorm mode {bn!r}; choose one of {BN_MODES}.")
        if task_layout not in TASK_LAYOUTS:
            raise ValueError(f"unknown task_layout {task_layout!r}; choose one of {TASK_LAYOUTS}.")
        self.task_layout = task_layout
        if min(in_channels, filters) < 1 or num_classes < 0:
            raise ValueError(
                f"in_channels and filters must be ≥ 1 and num_classes ≥ 0 (0: no head), got {in_channels}, "
                f"{num_classes}, {filters}."
            )
        side = int(image_size)
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(
                f"image_size {image_size} is too small for 4 max-pool halvings (needs ≥ 16)."
            )
        self.bn, self.eps, self.momentum, self.channels_last = (
            bn,
            float(eps),
            float(momentum),
            channels_last,
        )
        self.in_channels, self.filters, self.image_size, self.feature_side = (
            in_channels,
            filters,
            image_size,
            side,
        )
        chans = [in_channels, filters, filters, filters, filters]
        for i in range(4):
            self.add_module(f"conv{i}", nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False))
            self.add_module(
                f"norm{i}",
                nn.BatchNorm2d(
                    filters, eps=eps, momentum=momentum, track_running_stats=(bn == "running")
                ),
            )
        self.head = nn.Linear(filters * side * side, num_classes) if num_classes else None

    # ----- helpers -------------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, dims: int) -> torch.Tensor:
        if x.dim() == dims - 1 and self.in_channels == 1:
            x = x.unsqueeze(-3)
        if x.dim() != dims or x.shape[-3] != self.in_channels:
            want = "(n, C, H, W)" if dims == 4 else "(B, n, C, H, W)"
            raise ValueError(
                f"Conv4 expects inputs {want} with C = {self.in_channels}, got {tuple(x.shape)}."
            )
        return x

    def _per_task(self, x: torch.Tensor) -> bool:
        if self.task_layout == "auto":
            return x.device.type == "cpu" and self.in_channels >= 2
        return self.task_layout == "per_task"

    def _features(self, h: torch.Tensor) -> torch.Tensor:
        """What the head sees: the flattened features, L2-normalised and scaled when ``cosine_scale`` > 0."""
        if self.cosine_scale == 0:
            return h
        return F.normalize(h, dim=-1, eps=1e-12) * self.cosine_scale

    def _layout(self, h: torch.Tensor) -> torch.Tensor:
        return h.contiguous(memory_format=torch.channels_last) if self.channels_last else h

    # ----- one task --------------------------------------------------------------------------------------
    def _trunk(self, p: dict[str, torch.Tensor], x: torch.Tensor, update_stats: bool) -> torch.Tensor:
        """The flattened features (n, filters·s²) of checked images ``x`` (n, C, H, W)."""
        h = self._layout(x)
        for i in range(4):
            h = F.conv2d(h, p[f"conv{i}.weight"], None, padding=1)
            norm = getattr(self, f"norm{i}")
            if update_stats:
                h = F.batch_norm(
                    h,
                    norm.running_mean,
                    norm.running_var,
                    p[f"norm{i}.weight"],
                    p[f"norm{i}.bias"],
                    True,
                    self.momentum,
                    self.eps,
                )
            elif self._use_batch_stats():
                h = F.batch_norm(
                    h, None, None, p[f"norm{i}.weight"], p[f"norm{i}.bias"], True, 0.0, self.eps
                )
            else:
                h = F.batch_norm(
                    h,
                    norm.running_mean,
                    norm.running_var,
                    p[f"norm{i}.weight"],
                    p[f"norm{i}.bias"],
                    False,
                    0.0,
                    self.eps,
                )
            h = F.relu(F.max_pool2d(h, 2))
        return h.flatten(1)

    def _forward(
        self, p: dict[str, torch.Tensor], x: torch.Tensor, update_stats: bool = False
    ) -> torch.Tensor:
        x = self._check(x, 4)
        h = self._features(self._viewed(lambda v: self._trunk(p, v, update_stats), x, update_stats))
        if self.head is None:
            return h
        return F.linear(h, p["head.weight"], p["head.bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, num_classes)`` for images ``(n, C, H, W)`` (``(n, H, W)`` when C = 1)."""
        return self._forward(self._params(None), x)

    # ----- many tasks at once ----------------------------------------------------------------------------
    def forward_batched(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n, num_classes)``: task b uses ``{k: v[b] for k, v in params.items()}`` on ``x[b]``.

        Equal, up to float round-off, to a loop of ``functional_call`` per task (tested, with gradients).
        """
        x = self._check(x, 5)
        if self._per_task(x):
            return torch.stack([self._forward({k: v[i] for k, v in params.items()}, x[i])
                                for i in range(x.shape[0])])
        feats = self._features(self._viewed(lambda v: self._grouped_trunk(params, v), x))
        if self.head is None:
            return feats
        return torch.baddbmm(
            params["head.bias"].unsqueeze(1), feats, params["head.weight"].transpose(1, 2)
        )

    def _grouped_trunk(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The flattened features (B, n, filters·s²) of B tasks' images ``x`` (B, n, C, H, W), as one grouped
        network (the tasks' channels side by side)."""
        b, n, c, hh, ww = x.shape
        batch_stats = self._use_batch_stats()
        for i in range(4):
            w = params[f"conv{i}.weight"]
            if i == 0 and self.channels_last:
                # first layer (few input channels): im2col + one einsum written straight into the
                # channels-last layout (n, H, W, B·O) — cheaper on CPU than a grouped conv with C = 1..3
                cols = F.unfold(x.reshape(b * n, c, hh, ww), 3, padding=1).view(b, n, c * 9, hh * ww)
                y = torch.einsum("bnkl,bok->nlbo", cols, w.reshape(b, w.shape[1], c * 9))
                h = y.reshape(n, hh, ww, b * w.shape[1]).permute(0, 3, 1, 2)
            else:
                if i == 0:
                    h = self._layout(x.transpose(0, 1).reshape(n, b * c, hh, ww))
                h = F.conv2d(h, w.reshape(b * w.shape[1], *w.shape[2:]), None, padding=1, groups=b)
            gamma, beta = params[f"norm{i}.weight"].reshape(-1), params[f"norm{i}.bias"].reshape(-1)
            if batch_stats:
                h = F.batch_norm(h, None, None, gamma, beta, True, 0.0, self.eps)
            else:
                norm = getattr(self, f"norm{i}")
                h = F.batch_norm(
                    h,
                    norm.running_mean.repeat(b),
                    norm.running_var.repeat(b),
                    gamma,
                    beta,
                    False,
                    0.0,
                    self.eps,
                )
            h = F.relu(F.max_pool2d(h, 2))
        return h.reshape(n, b, -1).transpose(0, 1)
