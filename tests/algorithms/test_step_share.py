"""`MetaLearner.step` on this process's share of a minibatch (a TaskShare, the other tasks never built) gives
bitwise what it gives on the whole list, for every rule, with inner minibatches too; a wrong share is refused."""

from __future__ import annotations

import pytest
import torch
from _helpers import flat

import metaprox
from metaprox.distributed import Reducer
from metaprox.tasks.share import TaskShare
from metaprox.tasks.sine import SineFamily

B, K, KQ = 5, 10, 6
RULES = ["mmp", "mmp_support_query", "reptile", "fomaml", "maml", "imaml"]  # MAML: full-batch inner GD only


class _Rank(Reducer):
    """Rank ``rank`` of ``world`` without the other processes: its partial sums stand for the totals."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world_size = rank, world

    def sum(self, tensors, scalars):
        return list(tensors), dict(scalars)


def _learner(rule: str, batch_size: int | None) -> metaprox.MetaLearner:
    torch.manual_seed(0)
    model = metaprox.MLP([1, 8, 8, 1])
    sgd = metaprox.SGD(lr=0.02, steps=3, batch_size=batch_size)
    make = {"mmp": lambda: metaprox.MetaMinibatchProx(model, lam=0.5, inner=sgd, outer_lr=0.1),
            "mmp_support_query": lambda: metaprox.MetaMinibatchProx(model, lam=0.5, inner=sgd, outer_lr=0.1,
                                                                    inner_data="support+query"),
            "reptile": lambda: metaprox.Reptile(model, inner=sgd, outer_lr=0.1),
            "fomaml": lambda: metaprox.FOMAML(model, inner=sgd, outer_lr=0.1),
            "maml": lambda: metaprox.MAML(model, inner=sgd, outer_lr=0.1),
            "imaml": lambda: metaprox.IMAML(model, lam=1.0, inner=sgd, cg_steps=2, outer_lr=0.1)}
    return make[rule]()


# the inner problems are barely solved in 3 steps (irrelevant here: both sides solve them alike)
@pytest.mark.filterwarnings("ignore::metaprox.InexactInnerSolveWarning")
@pytest.mark.parametrize("rule,batch_size", [(r, None) for r in RULES] + [(r, 4) for r in RULES if r != "maml"])
@pytest.mark.parametrize("rank", [0, 1])
def test_share_step_equals_list_step(rule, batch_size, rank):
    reducer, fam = _Rank(rank, 2), SineFamily()
    part = reducer.part(B)
    weights = torch.arange(1.0, B + 1)  # global weights: the share uses its slice
    ref, got = _learner(rule, batch_size), _learner(rule, batch_size)
    ref.reducer = got.reducer = reducer
    g_ref, g_got = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(2):
        d_ref = ref.step(fam.sample(B, K, g_ref, num_query=KQ), weights=weights)
        share = TaskShare.uniform(fam.sample(B, K, g_got, num_query=KQ, part=part), B, part, K, KQ)
        assert len(share.tasks) == part.stop - part.start < B
        d_got = got.step(share, weights=weights)
    assert torch.equal(flat(ref.center()), flat(got.center()))
    assert d_got == d_ref
    assert torch.equal(ref.generator.get_state(), got.generator.get_state())  # same inner-minibatch draws


def test_a_share_of_another_rank_is_refused():
    learner = _learner("mmp", None)
    learner.reducer = _Rank(1, 2)  # solves tasks [3, 5) of 5
    tasks = SineFamily().sample(B, K, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"solves tasks \[3, 5\) of a minibatch of 5.*share \[0, 3\)"):
        learner.step(TaskShare.of(tasks, slice(0, 3)))
    with pytest.raises(ValueError, match="got 2 task weights for 5 tasks"):
        learner.step(TaskShare.of(tasks, slice(3, 5)), weights=[1.0, 1.0])


def test_missing_query_sets_are_counted_over_the_whole_minibatch():
    learner = _learner("fomaml", None)
    learner.reducer = _Rank(1, 2)
    share = TaskShare.uniform(SineFamily().sample(B, K, torch.Generator(), part=slice(3, 5)), B, slice(3, 5), K, 0)
    with pytest.raises(ValueError, match="5 of 5 tasks have none"):
        learner.step(share)
