"""Paired comparisons: every model scored on the same test patients, and bootstrap CIs over test patients.

When patients without slides are kept for the models that read no slides
(``training.keep_slideless_for_non_slide_models``), the test partitions of a fold differ between models.
One comparison table must still score every model on the same patients: ``common_test_patients`` gives
the intersection per (seed, fold) with the counts, ``paired_metrics`` recomputes each model's metrics on it
from per-patient predictions (the columns of predictions.parquet: ``patient_id``, ``partition``,
``label``, ``time``, ``event``, ``subtype_pred``, ``subtype_prob_*``, ``risk``).

``bootstrap_ci`` is the percentile bootstrap over test patients (resampled with replacement, seeded) used
for the 95 % intervals. No torch here: aggregation runs in CPU-only rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from modaltune.errors import InputError
from modaltune.probes import bootstrap_weights, harrell_c, percentile_ci


# ------------------------------------------------------------------------------------------------ metrics
def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float | None:
    """sklearn's balanced accuracy on rows with a label >= 0; None without two classes."""
    from sklearn.metrics import balanced_accuracy_score

    y, pred = np.asarray(y), np.asarray(pred)
    keep = y >= 0
    if len(np.unique(y[keep])) < 2:
        return None
    return float(balanced_accuracy_score(y[keep], pred[keep]))


def auroc(y: np.ndarray, prob: np.ndarray) -> float | None:
    """sklearn's ROC AUC (binary: P(class 1); more classes: one-vs-rest macro); None without two classes."""
    from sklearn.metrics import roc_auc_score

    y, prob = np.asarray(y), np.asarray(prob, float)
    keep = y >= 0
    if len(np.unique(y[keep])) < 2:
        return None
    p = prob[keep]
    if p.ndim == 1 or p.shape[1] == 2:
        return float(roc_auc_score(y[keep], p if p.ndim == 1 else p[:, 1]))
    return float(roc_auc_score(y[keep], p, multi_class="ovr", average="macro", labels=list(range(p.shape[1]))))


def cindex(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float | None:
    """lifelines' Harrell C with higher ``risk`` = shorter survival; None without a comparable pair."""
    time, event, risk = (np.asarray(a, float) for a in (time, event, risk))
    return harrell_c(time, risk, event)


def bootstrap_ci(stat: Callable[..., float | None], *arrays, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> list[float] | None:
    """Percentile CI of ``stat(*arrays)`` over rows resampled with replacement (all arrays alike).

    The resamples and the percentile rule are the evaluator's (``probes.bootstrap_weights``,
    ``probes.percentile_ci``); this variant takes any statistic. Resamples on which it is undefined
    (None/NaN, e.g. one class drawn) are skipped; None when fewer than half are defined or ``n_boot`` is 0.
    """
    if n_boot <= 0:
        return None
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if n == 0 or any(len(a) != n for a in arrays):
        raise InputError(f"bootstrap_ci: arrays must have the same non-zero length, got {[len(a) for a in arrays]}")
    rows = np.arange(n)
    vals = np.full(int(n_boot), np.nan)
    for b, w in enumerate(bootstrap_weights(n, int(n_boot), seed)):
        idx = np.repeat(rows, w.astype(np.int64))
        v = stat(*(a[idx] for a in arrays))
        if v is not None:
            vals[b] = v
    return percentile_ci(vals, level)


# ------------------------------------------------------------------------------------------------ pairing
def common_test_patients(test_patients: Mapping[str, Sequence[str]]) -> tuple[list[str], dict[str, int]]:
    """(patients in every model's test partition, {model: its own test count}) for one (seed, fold)."""
    if not test_patients:
        raise InputError("common_test_patients: no runs given")
    sets = {m: set(map(str, ids)) for m, ids in test_patients.items()}
    common = set.intersection(*sets.values())
    return sorted(common), {m: len(s) for m, s in sets.items()}


def _prob_columns(df: pd.DataFrame) -> list[str]:
    cols = [c for c in df.columns if c.startswith("subtype_prob_")]
    return sorted(cols, key=lambda c: int(c.rsplit("_", 1)[1]))


def score_predictions(df: pd.DataFrame, n_boot: int = 0, seed: int = 0) -> dict:
    """Subtype balanced accuracy / AUROC and C-index of one run's predictions (rows = patients scored)."""
    y = df["label"].to_numpy(int) if "label" in df else np.full(len(df), -1)
    out: dict = {"n": int(len(df)), "bacc": None, "auroc": None, "cindex": None,
                 "bacc_ci95": None, "cindex_ci95": None}
    if "subtype_pred" in df and (df["subtype_pred"] >= 0).any():
        pred = df["subtype_pred"].to_numpy(int)
        out["bacc"] = balanced_accuracy(y, pred)
        probs = _prob_columns(df)
        if probs:
            out["auroc"] = auroc(y, df[probs].to_numpy(float))
        if len(df):
            out["bacc_ci95"] = bootstrap_ci(balanced_accuracy, y, pred, n_boot=n_boot, seed=seed)
    if "risk" in df and np.isfinite(df["risk"].to_numpy(float)).any():
        t, e, r = (df[c].to_numpy(float) for c in ("time", "event", "risk"))
        out["cindex"] = cindex(t, e, r)
        if len(df):
            out["cindex_ci95"] = bootstrap_ci(cindex, t, e, r, n_boot=n_boot, seed=seed)
    return out


def paired_metrics(predictions: Mapping[str, pd.DataFrame], n_boot: int = 0, seed: int = 0) -> pd.DataFrame:
    """Each model's test metrics on the test patients every model has (one (seed, fold)).

    ``predictions``: model -> predictions table of that run (all partitions). Returns one row per model
    with ``n_test`` (own test patients), ``n_common`` (the intersection the metrics are computed on) and the
    metrics. Patients are matched by id; a model lacking some common patient cannot happen by construction.
    """
    tests = {m: df.loc[df["partition"] == "test"].drop_duplicates("patient_id").set_index("patient_id")
             for m, df in predictions.items()}
    common, counts = common_test_patients({m: t.index.tolist() for m, t in tests.items()})
    rows = []
    for m, t in tests.items():
        scored = score_predictions(t.loc[common].reset_index(), n_boot=n_boot, seed=seed)
        rows.append({"model": m, "n_test": counts[m], "n_common": len(common),
                     **{k: v for k, v in scored.items() if k != "n"}})
    return pd.DataFrame(rows)


__all__ = ["auroc", "balanced_accuracy", "bootstrap_ci", "cindex", "common_test_patients", "paired_metrics",
           "score_predictions"]
