"""How much does normalising a pretrained backbone's features help a nearest-centroid few-shot classifier?

A diagnostic for choosing ``model.cosine_scale`` (reports/miniimagenet): embeds validation episodes with a run's
``pretrain.safetensors`` (support and query as separate batches, the transductive protocol of the pretraining
score) and scores nearest-centroid accuracy on the raw features (UN), L2-normalised features (L2N), and features
centred by the mean of 1,000 training images, then L2-normalised (CL2N; SimpleShot, Wang et al. 2019).
Validation classes only; it selects nothing by itself.

    python experiments/feature_norm_probe.py RUN_DIR --data /path/to/miniimagenet --shots 1 --episodes 300
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from metaprox.build import build_family, build_model
from metaprox.config import resolve
from metaprox.evaluate import mean_ci
from metaprox.pretrain import embed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    cfg = resolve(json.loads((args.run / "config.json").read_text())["config"])  # defaults of newer keys
    cfg["task"].update(data_path=args.data, shots=args.shots)
    cfg.update(device="cpu")
    family = build_family(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    params = {k: v.detach() for k, v in model.named_parameters()}
    params.update(load_file(args.run / "pretrain.safetensors"))
    train = family.train
    pick = torch.randperm(train.data.shape[0], generator=torch.Generator().manual_seed(0))[:1000]
    val = family.eval_sampler("val").sample_batch(args.episodes, torch.Generator().manual_seed(args.seed))
    ways = int(val.y.max()) + 1
    scores: dict[str, list[float]] = {"UN": [], "L2N": [], "CL2N": []}
    with torch.no_grad():
        base = torch.cat([embed(model, params, train.data[pick[i:i + 250]].float() * train.scale)
                          for i in range(0, len(pick), 250)]).mean(0)
        for t in range(args.episodes):
            fs, fq = embed(model, params, val.x[t]), embed(model, params, val.x_query[t])
            for name in scores:
                s, q = (fs - base, fq - base) if name == "CL2N" else (fs, fq)
                if name != "UN":
                    s, q = F.normalize(s, dim=1), F.normalize(q, dim=1)
                centroids = torch.zeros(ways, s.shape[1]).index_add_(0, val.y[t], s) / args.shots
                scores[name].append(float((torch.cdist(q, centroids).argmin(1) == val.y_query[t]).float().mean()))
    for name, acc in scores.items():
        m, h = mean_ci(torch.tensor(acc))
        print(f"{name:5s} {100 * m:.2f} ± {100 * h:.2f} % ({args.episodes} validation episodes, {args.shots}-shot)")


if __name__ == "__main__":
    main()
