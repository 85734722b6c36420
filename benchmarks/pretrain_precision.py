"""Benchmark: one cross-entropy pretraining step of miniImageNet's Conv-4, float32 against bf16 autocast.

Setting (``metaprox.pretrain``, ``pretrain.precision``): a batch of 128 images 84×84×3, Conv-4 with ``--filters``
(64) filters and the cosine head (scale 10), 64 classes, forward + backward + SGD (Nesterov momentum) step,
channels-last. Variants are timed *interleaved* (round-robin, median of ``--reps`` steps each) so load from
other processes hits them alike; the printed speedup is a ratio of medians from this one run. Random pixels
(timing does not depend on them).

    PYTHONPATH=src python benchmarks/pretrain_precision.py [--reps 8] [--threads 1] [--filters 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from metaprox.models.conv4 import Conv4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--filters", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(128, 3, 84, 84, generator=gen), torch.randint(0, 64, (128,), generator=gen)
    variants = {}
    for name in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = Conv4(3, 64, args.filters, 84, cosine_scale=10.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        variants[name] = (model, opt)

    def step(name: str) -> float:
        model, opt = variants[name]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bfloat16"):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    for name in variants:  # warm-up (oneDNN primitive creation)
        step(name), step(name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.reps):
        for name in variants:
            times[name].append(step(name))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"Conv-4-{args.filters}, batch 128, 84×84, {args.threads} thread(s), median of {args.reps} steps:")
    for name, t in med.items():
        print(f"  {name:9s} {1000 * t:8.1f} ms/step  {128 / t:7.1f} images/s")
    print(f"  bf16 autocast speedup: {med['float32'] / med['bfloat16']:.2f}×")


if __name__ == "__main__":
    main()
