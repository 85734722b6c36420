"""Models usable by every algorithm: any ``nn.Module`` works; these are the ones the recipes use."""

from metaprox.models.batched import batched_forward
from metaprox.models.mlp import MLP
from metaprox.models.shared_trunk import SharedTrunk

__all__ = ["MLP", "batched_forward", "SharedTrunk"]
