"""``metaprox bench omniglot``: one MMP outer iteration on Omniglot-shaped Conv-4 tasks, per execution strategy.

Issue-4 setting: 5 tasks, 5-way, 6 support images per class, 28×28 greyscale, Conv-4 (32 filters,
batch-statistics BatchNorm), 8 inner Adam steps with β1 = 0. Variants are timed interleaved (round-robin,
median of repeats) in one process, so the ratios are measured side by side. Random images of the right shape
are used (timing does not depend on pixel values). ``+bf16``: forward/backward under bfloat16 autocast
(``precision="bf16"``), parameters and gradients float32. ``device="cuda"`` times with synchronisation.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

__all__ = ["bench_omniglot"]


def _variants(filters: int) -> dict[str, tuple[str, bool, str]]:
    """name → (execution strategy, channels_last, precision)."""
    return {"loop": ("loop", False, "fp32"), "loop+channels_last": ("loop", True, "fp32"),
            "batched": ("batched", False, "fp32"), "batched+channels_last": ("batched", True, "fp32"),
            "vmap": ("vmap", False, "fp32"), "batched+channels_last+bf16": ("batched", True, "bf16")}


def bench_omniglot(quick: bool = False, device: str = "cpu", tasks: int = 5, ways: int = 5, shots: int = 6,
                   filters: int = 32, steps: int = 8) -> dict[str, Any]:
    import metaprox
    from metaprox.models.conv4 import Conv4

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    g = torch.Generator().manual_seed(0)
    batch = [metaprox.Task(torch.rand(ways * shots, 1, 28, 28, generator=g).to(device),
                           torch.arange(ways).repeat_interleave(shots).to(device)) for _ in range(tasks)]
    learners = {}
    for name, (strategy, cl, precision) in _variants(filters).items():
        torch.manual_seed(0)
        model = Conv4(1, ways, filters, 28, bn="batch", channels_last=cl).to(device)
        learners[name] = metaprox.MetaMinibatchProx(
            model, "cross_entropy", lam=1.0, inner=metaprox.Adam(lr=1e-3, steps=steps, beta1=0.0), outer_lr=1.0,
            execution=strategy, precision=precision)
    for lr in learners.values():  # warm-up (cuDNN autotuning, lazy init)
        lr.step(batch, monitor=False)
    times: dict[str, list[float]] = {n: [] for n in learners}
    for _ in range(2 if quick else 5):
        for name, lr in learners.items():
            sync()
            t0 = time.perf_counter()
            lr.step(batch, monitor=False)
            sync()
            times[name].append(time.perf_counter() - t0)
    loop = statistics.median(times["loop"])
    rows = [{"variant": n, "ms_per_iteration": 1e3 * statistics.median(t),
             "speedup_vs_loop": loop / statistics.median(t)} for n, t in times.items()]
    md = [f"### Conv-4 MMP iteration ({tasks} tasks, {ways}-way, {shots} images/class, {filters} filters, "
          f"{steps} inner Adam steps; device {device}, torch threads {torch.get_num_threads()})", "",
          "| variant | ms / iteration | speedup vs loop |", "|---|---|---|"]
    md += [f"| {r['variant']} | {r['ms_per_iteration']:.1f} | {r['speedup_vs_loop']:.2f}× |" for r in rows]
    return {"rows": rows, "markdown": "\n".join(md)}
