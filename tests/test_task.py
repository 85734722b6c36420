import numpy as np
import pytest
import torch

import metaprox
from metaprox import Task, TaskDataError


def test_valid_task_and_numpy_input():
    t = Task(np.zeros((4, 2), dtype=np.float32), np.zeros((4, 1), dtype=np.float32))
    assert t.num_examples == 4 and not t.has_query and isinstance(t.x, torch.Tensor)


@pytest.mark.parametrize("x,y,msg", [
    (torch.zeros(5, 1), torch.zeros(4, 1), "5 examples but y has 4"),
    (torch.zeros(0, 1), torch.zeros(0, 1), "empty"),
    (torch.tensor([[float("nan")]]), torch.zeros(1, 1), "NaN"),
    (torch.zeros(2, 1), torch.tensor([[1.0], [float("inf")]]), "NaN or infinite"),
    (torch.zeros(3, 1, dtype=torch.int64), torch.zeros(3, 1), "floating point"),
    (torch.zeros(3, 1), torch.zeros(3, 1, dtype=torch.bool), "targets must be"),
    ([1, 2], torch.zeros(2), "torch.Tensor or numpy"),
])
def test_bad_input_is_named(x, y, msg):
    with pytest.raises(TaskDataError, match=msg):
        Task(x, y)


def test_query_both_or_neither():
    with pytest.raises(TaskDataError, match="both x_query and y_query"):
        Task(torch.zeros(2, 1), torch.zeros(2, 1), x_query=torch.zeros(2, 1))
    with pytest.raises(TaskDataError, match="x_query has 2 examples but y_query has 3"):
        Task(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(3, 1))


def test_dtype_mismatch_with_model_is_named():
    mmp = metaprox.MetaMinibatchProx(metaprox.MLP([1, 4, 1]), "mse", lam=1.0)
    with pytest.raises(TypeError, match="float64 but the model's parameters are torch.float32"):
        mmp.step([Task(torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64))])


def test_shape_mismatch_of_mse_is_named():
    mmp = metaprox.MetaMinibatchProx(metaprox.MLP([1, 4, 1]), "mse", lam=1.0)
    with pytest.raises(ValueError, match=r"output has shape \(3, 1\) but targets have shape \(3,\)"):
        mmp.step([Task(torch.zeros(3, 1), torch.zeros(3))])


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf")])
def test_lambda_must_be_positive(lam):
    with pytest.raises(ValueError, match="λ must be a finite number > 0"):
        metaprox.MetaMinibatchProx(metaprox.MLP([1, 4, 1]), "mse", lam=lam)
