"""The test-time BatchNorm protocols shared by the few-shot backbones (:class:`Conv4`, :class:`ResNet12`).

A backbone that derives from :class:`BatchNormProtocol` provides ``bn`` (``"batch"``, ``"transductive"`` or
``"running"``), ``_params(params)``, ``_check(x, dims)``, ``_forward(params, x, update_stats=False)`` (one task)
and ``forward_batched(params, x)`` (a leading task axis); this class adds :meth:`predict` and
:meth:`update_running_stats` with the semantics documented in :mod:`metaprox.models.conv4`, and the test-time
views (``test_views``, :meth:`_viewed`; set through :mod:`metaprox.test_views`, ``eval.views``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["BatchNormProtocol", "BN_MODES", "TEST_VIEWS"]

BN_MODES = ("batch", "transductive", "running")
TEST_VIEWS = ("image", "flip")


class BatchNormProtocol(nn.Module):
    bn: str
    test_views: str = "image"  # "flip": the head sees the mean features of each image and its mirror image

    def _viewed(self, features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                update_stats: bool = False) -> torch.Tensor:
        """``features(x)``; with ``test_views == "flip"`` the mean of ``features(x)`` and ``features(x mirrored)``
        (the last axis of ``x`` is the image width). The two views pass the trunk separately, so each keeps the
        BatchNorm statistics its batch would have alone; estimating running statistics always sees ``x`` once."""
        if self.test_views == "image" or update_stats:
            return features(x)
        if self.test_views != "flip":
            raise ValueError(f"unknown test_views {self.test_views!r}; choose one of {TEST_VIEWS}.")
        return (features(x) + features(x.flip(-1))) / 2

    def _params(self, params: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters()) if params is None else params

    def _use_batch_stats(self) -> bool:
        return self.bn != "running" or self.training

    @torch.no_grad()
    def predict(
        self,
        x_support: torch.Tensor,
        x_query: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Query logits ``(m, num_classes)`` of one adapted task, by the BatchNorm mode's test protocol.

        ``"transductive"``: the query batch is normalised with its own statistics. ``"batch"``: each query
        example is normalised with the statistics of (support set + that example) — no information flows
        between query examples. ``"running"``: eval-mode running statistics (independent of the support set).
        """
        p = self._params(params)
        xq = self._check(x_query, 4)
        if self.bn == "transductive":
            return self._forward(p, xq)
        if self.bn == "running":
            was = self.training
            self.eval()
            try:
                return self._forward(p, xq)
            finally:
                self.train(was)
        xs = self._check(x_support, 4)
        m = xq.shape[0]
        x = torch.cat([xs.unsqueeze(0).expand(m, *xs.shape), xq.unsqueeze(1)], 1)  # (m, n + 1, C, H, W)
        stacked = {k: v.unsqueeze(0).expand(m, *v.shape) for k, v in p.items()}
        return self.forward_batched(stacked, x)[:, -1]

    @torch.no_grad()
    def update_running_stats(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> None:
        """``"running"`` mode: fold the batch statistics of ``x`` (n, C, H, W) into the running buffers.

        Statistics of layer i are computed with ``params`` (default: the module's own, i.e. the
        meta-parameters) and blended with ``momentum`` exactly as ``nn.BatchNorm2d`` does in training.
        """
        if self.bn != "running":
            raise RuntimeError(
                f"update_running_stats needs bn='running'; this {type(self).__name__} uses bn={self.bn!r}, "
                f"which keeps no running statistics."
            )
        self._forward(self._params(params), x, update_stats=True)

    # provided by the backbone
    def _check(self, x: torch.Tensor, dims: int) -> torch.Tensor:
        raise NotImplementedError

    def _forward(self, p: dict[str, torch.Tensor], x: torch.Tensor, update_stats: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward_batched(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
