"""Validation-only measure of more test-time views than eval.views offers: the flip pair against the flip pair
times five positions (the image and four diagonal shifts by S pixels of the zero-padded image; 10 views), cosine
nearest centroid on population-BN features of a run's prior — the protocol of `metaprox eval` with
eval.bn = "population", eval.head_init = "prototypes", step 0, on the same validation episodes.

    python reports/miniimagenet/shift_views_val.py runs/cpu_c64bf_5w1s_prior 500 4   # run dir, episodes, S

Stop 21 (run from /tmp as a draft of this script, the same computation): 5-way 1-shot flip 50.35 ± 0.91 %,
flip + shifts 51.06 ± 0.90 % (500 episodes, S = 4, one thread beside an evaluation, 48 min).
"""

import sys

import torch
import torch.nn.functional as F

from metaprox.build import build_family
from metaprox.population_bn import population_bn, training_images
from metaprox.pretrain import embed
from metaprox.rundir import load_learner

torch.set_num_threads(1)
run, episodes, s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
learner, cfg, _ = load_learner(run)
cfg["eval"]["tasks"] = episodes
family = build_family(cfg)
model = learner.fmodel.module
params = dict(zip(learner.names, (p.detach() for p in learner.fmodel.params()), strict=True))


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    padded = F.pad(x, (s, s, s, s))
    return padded[..., s + dy:s + dy + x.shape[-2], s + dx:s + dx + x.shape[-1]]


def features(p: dict[str, torch.Tensor], x: torch.Tensor, shifts: bool) -> torch.Tensor:
    views = [x, x.flip(-1)]
    if shifts:
        views += [shifted(v, dy, dx) for v in (x, x.flip(-1)) for dy, dx in ((s, s), (s, -s), (-s, s), (-s, -s))]
    return torch.stack([embed(model, p, v) for v in views]).mean(0)


with population_bn(learner, *training_images(family, cfg["eval"]["bn_images"], cfg["eval"]["val_seed"])), \
        torch.no_grad():
    p = {**params, **dict(model.named_buffers())}
    model.cosine_scale = 0.0  # raw features: averaged first, normalised below
    for name, tasks in family.eval_sets("val").items():
        for shifts in (False, True):
            acc = []
            for t in tasks:
                ways = int(t.y.max()) + 1
                fs, fq = (F.normalize(features(p, x, shifts), dim=-1) for x in (t.x, t.x_query))
                cents = F.normalize(torch.zeros(ways, fs.shape[1]).index_add_(0, t.y.long(), fs), dim=-1)
                acc.append(((fq @ cents.T).argmax(1) == t.y_query.long()).double().mean())
            a = torch.stack(acc)
            print(f"{name} {'flip + shifts' if shifts else 'flip'}: {100 * a.mean():.2f} ± "
                  f"{196 * a.std() / len(a) ** 0.5:.2f} % ({len(a)} episodes)", flush=True)
