"""Test-time views: what the head sees of an image at evaluation — the image, or the mean over it and its mirror.

``eval.views = "flip"`` makes the backbone's features of every support and query image the mean of its features
and those of the horizontally mirrored image (the trunk runs twice; each view alone through BatchNorm), before the
head — and before a cosine head's normalisation. It is test-time augmentation of each image by itself, so it is a
plain (non-transductive) protocol and composes with every ``eval.bn`` and ``eval.head_init``: the test-time solve,
the prototype head and the query predictions all see the averaged features. Training never uses it; it suits a
backbone trained with random flips (``pretrain.flip``), where a mirrored image is as likely as the image itself.

It needs a few-shot backbone that implements the views (:class:`~metaprox.models.conv4.Conv4`,
:class:`~metaprox.models.resnet12.ResNet12`, through :class:`~metaprox.models.bn_protocol.BatchNormProtocol`); anything
else is refused when the views are set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from metaprox.models.bn_protocol import TEST_VIEWS, BatchNormProtocol

__all__ = ["TEST_VIEWS", "check_views", "using_views"]


def check_views(learner: Any, value: str) -> None:
    """Refuse a ``value`` that ``learner``'s model cannot use (ValueError naming the problem and what to do)."""
    if value not in TEST_VIEWS:
        raise ValueError(f"unknown eval.views {value!r}; choose one of {TEST_VIEWS}.")
    module = learner.fmodel.module
    if value != "image" and not isinstance(module, BatchNormProtocol):
        raise ValueError(f"eval.views = {value!r} needs an image backbone that averages views (Conv-4 or ResNet-12); "
                         f"this model is a {type(module).__name__}. Use eval.views = 'image'.")


@contextmanager
def using_views(learner: Any, value: str) -> Iterator[str]:
    """Within the block ``learner``'s model sees the test-time views ``value``; its own setting is restored after.
    Yields ``value``."""
    check_views(learner, value)
    module = learner.fmodel.module
    if value == "image" and not isinstance(module, BatchNormProtocol):
        yield value
        return
    own = module.test_views
    module.test_views = value
    try:
        yield value
    finally:
        module.test_views = own
