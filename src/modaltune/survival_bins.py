"""The two survival-bin rules of the project, side by side, with names that say which is which.

* **Prompt bins** (``prompt_bin_edges`` / ``prompt_bin_index``): the authors' rule for the words of the
  Survival prompt (method 1.7): quantiles of all training durations, outer edges min/max +- 1e-6,
  rounded to whole months, LEFT-closed bins ``[e_i, e_{i+1})``.
* **Hazard bins** (``hazard_bin_edges`` / ``hazard_bin_index``): SurvPath's rule for the discrete-time
  hazard targets of the supervised survival baselines: quantiles of the uncensored training times,
  outer edges 0 and +inf, RIGHT-closed bins ``(e_i, e_{i+1}]``.

Both are fitted on a fold's training patients only (method bug 8). They differ on purpose, each
reproducing the code it comes from; numpy only (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from modaltune.errors import InputError

N_PROMPT_BINS = 4


def prompt_bin_edges(train_months, n_bins: int = N_PROMPT_BINS) -> list[float]:
    """Prompt bins: quantile edges (months) of the TRAINING patients' durations, censored and uncensored
    together (the authors' rule for the Survival prompt, method 1.7).

    edges[0] = min - 1e-6 and edges[-1] = max + 1e-6 as in the authors' code, then ``np.round``; the
    rounded edges are both written into the prompts and used for the bin index, so the two always agree.
    """
    months = np.asarray(pd.to_numeric(pd.Series(list(train_months)), errors="coerce"), dtype=float)
    months = months[np.isfinite(months)]
    if months.size == 0:
        raise InputError("survival bins: no training patient has a survival time (survival_months all NaN)")
    edges = np.quantile(months, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0] = months.min() - 1e-6
    edges[-1] = months.max() + 1e-6
    return [float(e) + 0.0 for e in np.round(edges)]  # + 0.0 turns -0.0 into 0.0


def prompt_bin_index(months, edges: Sequence[float]) -> np.ndarray:
    """Prompt bin of each duration, LEFT-closed ``edges[i] <= x < edges[i+1]``
    (``bucketize(months, edges[:-1], right=True) - 1``) clamped to the training
    range (shorter -> first bin, longer -> last bin); -1 for a missing duration."""
    values = np.atleast_1d(np.asarray(months, dtype=float))
    # np.searchsorted(side="right") is torch.bucketize(right=True): edges[i-1] <= x < edges[i]
    index = np.searchsorted(np.asarray(edges[:-1], dtype=float), values, side="right") - 1
    index = np.clip(index, 0, len(edges) - 2)
    return np.where(np.isfinite(values), index, -1).astype(np.int64)


def hazard_bin_edges(train_times, train_events, n_bins: int = 4) -> np.ndarray:
    """Hazard bins: edges (n_bins + 1) from quantiles of the TRAINING patients' uncensored times
    (SurvPath's rule, the targets of the supervised survival baselines).

    The outer edges are 0 and +inf so every val/test time falls into a bin. Fitted on train only:
    bins from all patients leak held-out follow-up (method bug 8).
    """
    t = np.asarray(train_times, float)
    e = np.asarray(train_events, float)
    ok = np.isfinite(t) & np.isfinite(e)
    unc = t[ok & (e > 0)]
    if len(unc) < n_bins:  # too few deaths for stable quantiles: use all training times
        unc = t[ok]
    if len(unc) == 0:
        raise ValueError("hazard_bin_edges: no finite training survival times")
    inner = np.quantile(unc, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.concatenate([[0.0], np.maximum.accumulate(inner), [np.inf]])


def hazard_bin_index(times, edges: np.ndarray) -> np.ndarray:
    """Hazard bin of each time in [0, n_bins), RIGHT-closed ``edges[i] < t <= edges[i+1]``; NaN -> -1."""
    t = np.asarray(times, float)
    idx = np.searchsorted(edges[1:-1], t, side="left")
    return np.where(np.isfinite(t), idx, -1).astype(np.int64)
