"""Evaluation metrics that torch does not ship."""

from __future__ import annotations

import numpy as np

__all__ = ["auc", "rmse", "mae", "r2", "explained_variance", "accuracy", "log_loss", "binary_auc",
           "REGRESSION_METRICS", "CLASSIFICATION_METRICS", "DEFAULT_METRICS", "metric_functions"]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with average ranks for ties); NaN if one class is absent."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    pos, neg = int(labels.sum()), int((1 - labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_s = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


# ----- metrics of a finite task set's predictions (metaprox.finite_eval) ---------------------------------------
# Each takes (outputs, targets) as numpy arrays: regression outputs (n, k) against targets (n, k); classification
# logits (n, C) against class ids (n,). NaN where the metric is undefined (AUC with one class, R² of a constant).

def rmse(out: np.ndarray, y: np.ndarray) -> float:
    """Root mean squared error over all entries."""
    return float(np.sqrt(np.mean((out - y) ** 2)))


def mae(out: np.ndarray, y: np.ndarray) -> float:
    """Mean absolute error over all entries."""
    return float(np.mean(np.abs(out - y)))


def r2(out: np.ndarray, y: np.ndarray) -> float:
    """Coefficient of determination 1 − SS_res/SS_tot (per target column, averaged); NaN for constant targets."""
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    if np.any(ss_tot == 0):
        return float("nan")
    return float(np.mean(1.0 - ((y - out) ** 2).sum(0) / ss_tot))


def explained_variance(out: np.ndarray, y: np.ndarray) -> float:
    """1 − Var(y − out)/Var(y) (per target column, averaged): R² without penalising a constant offset."""
    var = y.var(0)
    if np.any(var == 0):
        return float("nan")
    return float(np.mean(1.0 - (y - out).var(0) / var))


def accuracy(out: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose largest logit is the true class."""
    return float(np.mean(out.argmax(1) == y))


def log_loss(out: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits) (natural log)."""
    z = out - out.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(y)), y]))


def binary_auc(out: np.ndarray, y: np.ndarray) -> float:
    """AUC of the score logit₁ − logit₀ (two-class logits)."""
    return auc(out[:, 1] - out[:, 0], y)


REGRESSION_METRICS = {"rmse": rmse, "mae": mae, "r2": r2, "explained_variance": explained_variance}
CLASSIFICATION_METRICS = {"accuracy": accuracy, "log_loss": log_loss, "auc": binary_auc}
DEFAULT_METRICS = {"regression": ["rmse", "mae", "r2"], "binary": ["auc", "accuracy", "log_loss"],
                   "multiclass": ["accuracy", "log_loss"]}


def metric_functions(task_type: str, names: list[str] | None) -> dict:
    """The metric functions for ``task_type`` (``eval.metrics`` names, or the defaults); unknown or unfitting
    names are errors (AUC is for binary tasks only)."""
    names = DEFAULT_METRICS[task_type] if names is None else list(names)
    table = REGRESSION_METRICS if task_type == "regression" else CLASSIFICATION_METRICS
    allowed = [n for n in table if task_type == "binary" or n != "auc"]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"eval.metrics = {names}: for a {task_type} task set choose from {allowed}.")
    return {n: table[n] for n in names}
