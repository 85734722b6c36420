"""Memory points of few-shot rules on random image episodes: the learner and tasks of one ``bench.memory`` spec.

A spec ``{"fewshot": {...}, "rule": NAME}`` builds NAME (``mmp``, ``fomaml``, ``reptile``, ``imaml``, ``maml``
— second order) on a few-shot backbone (``"model": "resnet12"`` or ``"conv4"``) with random ``ways × shots``
support and ``ways × queries`` query images of ``channels × size × size`` (peak memory does not depend on
pixel values). Inner solvers: Adam (β1 = 0, lr 1e-3) for the first-order rules as in the MMP paper, plain SGD
(lr 0.01) for MAML, which differentiates through it; λ = 0.1 for MMP and iMAML; iMAML uses 5 CG steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["fewshot_learner_and_tasks", "FEWSHOT_RULES"]

FEWSHOT_RULES = ("mmp", "fomaml", "reptile", "imaml", "maml")


def fewshot_learner_and_tasks(setting: Mapping[str, Any], rule: str, steps: int, tasks: int, seed: int = 0):
    import metaprox
    from metaprox.models.conv4 import Conv4
    from metaprox.models.resnet12 import ResNet12

    ways, c, s = int(setting["ways"]), int(setting.get("channels", 3)), int(setting.get("size", 84))
    torch.manual_seed(0)
    model: torch.nn.Module
    if setting["model"] == "resnet12":
        model = ResNet12(c, ways, setting.get("widths", (64, 160, 320, 640)), bn="transductive")
    else:
        model = Conv4(c, ways, int(setting.get("filters", 32)), s, bn="transductive")
    adam = metaprox.Adam(lr=1e-3, steps=steps, beta1=0.0)
    learner = {
        "mmp": lambda: metaprox.MetaMinibatchProx(model, "cross_entropy", lam=0.1, inner=adam),
        "fomaml": lambda: metaprox.FOMAML(model, "cross_entropy", inner=adam),
        "reptile": lambda: metaprox.Reptile(model, "cross_entropy", inner=adam),
        "imaml": lambda: metaprox.IMAML(model, "cross_entropy", lam=0.1, inner=adam, cg_steps=5),
        "maml": lambda: metaprox.MAML(model, "cross_entropy", inner=metaprox.SGD(lr=0.01, steps=steps)),
    }[rule]()
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(ways).repeat_interleave(int(setting["shots"]))
    yq = torch.arange(ways).repeat_interleave(int(setting["queries"]))
    batch = [metaprox.Task(torch.rand(len(ys), c, s, s, generator=g), ys,
                           torch.rand(len(yq), c, s, s, generator=g), yq) for _ in range(tasks)]
    return learner, batch
