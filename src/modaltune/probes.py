"""Linear probes on frozen embeddings: logistic regression (subtype) and Cox (survival), Harrell's C,
the per-site probe loop of pan-cancer cohorts, and bootstrap confidence intervals.

Used by the trainer (per-epoch validation probes, method 3.4) and the evaluator (test probes, method 4.2).
Every probe is fitted on the rows the caller marks "train" and only scored elsewhere.
No torch here: probes work on numpy arrays.
"""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError, ConvergenceWarning
from lifelines.utils import concordance_index
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from modaltune.errors import InputError

log = logging.getLogger(__name__)

LR_MODES = ("standard", "paper")
# Defaults of the ``probes`` config block (config/schemas/config.schema.yaml holds the same values).
PROBE_DEFAULTS = {"lr": "standard", "lr_max_iter": 1000, "cox_penalizer": 0.1, "cox_pca": "auto",
                  "max_patches": None, "bootstrap": 1000}


# --------------------------------------------------------------------------------------- classification
def fit_lr_probe(x_train: np.ndarray, y_train: np.ndarray, seed: int = 0, max_iter: int = 1000,
                 mode: str = "standard"):
    """Logistic-regression probe on rows with a label >= 0; None when fewer than two classes.

    ``mode="standard"``: StandardScaler + lbfgs multinomial LogisticRegression (max_iter ``max_iter``).
    ``mode="paper"``: the authors' evaluation (method 3.4): raw (unstandardised) embeddings,
    ``LogisticRegression(solver="liblinear", max_iter=200, random_state=0)``; liblinear fits one binary
    problem per class (one-vs-rest, ``OneVsRestClassifier``) for more than two classes. No class weights in either mode.
    """
    if mode not in LR_MODES:
        raise InputError(f"probes.lr={mode!r}: use one of {list(LR_MODES)}")
    keep = y_train >= 0
    if len(np.unique(y_train[keep])) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs / liblinear iteration warnings on tiny folds
        if mode == "paper":
            model = LogisticRegression(solver="liblinear", max_iter=200, random_state=0)
            if len(np.unique(y_train[keep])) > 2:  # liblinear is binary: one-vs-rest as older sklearn did
                model = OneVsRestClassifier(model)
        else:
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
        model.fit(x_train[keep], y_train[keep])
    return model


def class_metrics(y: np.ndarray, pred: np.ndarray, prob: np.ndarray | None, classes) -> dict:
    """Balanced accuracy and AUROC (binary: P(class 1); > 2 classes: one-vs-rest macro) of labelled rows.

    AUROC is None when the rows do not contain two classes or contain a class the scorer never saw.
    """
    out = {"bacc": None, "auroc": None}
    keep = y >= 0
    if not keep.any():
        return out
    y, pred = y[keep], pred[keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" on small resamples
        out["bacc"] = float(balanced_accuracy_score(y, pred))
    classes = list(classes)
    present = set(np.unique(y).tolist())
    if prob is None or len(present) < 2 or not present <= set(classes):
        return out
    prob = prob[keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(classes) == 2:
            out["auroc"] = float(roc_auc_score(y, prob[:, 1]))
        elif len(present) == len(classes):
            out["auroc"] = float(roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=classes))
    return out


def score_classifier(model, x: np.ndarray, y: np.ndarray) -> dict:
    """Balanced accuracy and AUROC of a fitted probe on rows with a label >= 0."""
    keep = y >= 0
    out = {"bacc": None, "auroc": None, "n": int(keep.sum())}
    if model is None or keep.sum() == 0:
        return out
    out.update(class_metrics(y[keep], model.predict(x[keep]), model.predict_proba(x[keep]), model.classes_))
    return out


# --------------------------------------------------------------------------------------------- survival
def harrell_c(times: np.ndarray, risk: np.ndarray, events: np.ndarray) -> float | None:
    """lifelines' Harrell C of -risk (higher risk = shorter survival); None when no pair is comparable."""
    ok = np.isfinite(times) & np.isfinite(events) & np.isfinite(risk)
    if ok.sum() < 2 or events[ok].sum() < 1:
        return None
    try:
        return float(concordance_index(times[ok], -risk[ok], events[ok]))
    except ZeroDivisionError:
        return None


def _cox_components(pca, n_events: int, n_dims: int) -> int | None:
    if pca is None:
        return None
    if pca == "auto":
        # Events-per-variable rule of thumb for Cox models: at least 5 events per covariate.
        return max(1, n_events // 5) if n_dims > max(1, n_events // 5) else None
    if isinstance(pca, bool) or not isinstance(pca, int) or pca < 1:
        raise InputError(f"probes.cox_pca={pca!r}: use null (all dims), 'auto' or a positive integer")
    return int(pca)


def fit_cox_probe(x_train: np.ndarray, times: np.ndarray, events: np.ndarray, penalizer: float = 0.1,
                  pca: int | str | None = None, retries: int = 2) -> dict:
    """lifelines CoxPHFitter on standardised embedding dims, fitted on training rows only.

    ``pca``: None keeps every dim (the paper: 256 covariates, penalizer 0.1); "auto" projects to
    n_events // 5 principal components when there are fewer than 5 events per dim; an int fixes the
    number of components. PCA is fitted on the training rows only.
    A failed fit -- lifelines' ConvergenceError, its ConvergenceWarning ("Newton-Raphson failed to
    converge", which lifelines only warns about), a singular matrix or non-finite coefficients -- is
    retried with a 10x larger penalizer; after ``retries`` the failure is recorded, never replaced by
    0 or 0.5. Every attempt is listed under ``attempts``.
    """
    ok = np.isfinite(times) & np.isfinite(events)
    x, t, e = x_train[ok], times[ok], events[ok]
    res = {"model": None, "scaler": None, "pca": None, "keep": None, "penalizer": float(penalizer),
           "converged": False, "error": None, "n_components": None, "attempts": []}
    n_events = int(e.sum())
    if n_events < 2:
        res["error"] = f"only {n_events} events among training patients; Cox probe not fitted"
        return res
    scaler = StandardScaler().fit(x)
    # lifelines rescales every covariate by its std: a constant dim (dead ReLU unit) would give NaN.
    keep = scaler.var_ > 1e-12
    if not keep.any():
        res["error"] = "every embedding dim is constant on the training patients; Cox probe not fitted"
        return res
    res["keep"] = keep
    z = scaler.transform(x)[:, keep]
    n_comp = _cox_components(pca, n_events, z.shape[1])
    if n_comp is not None:
        n_comp = max(1, min(n_comp, z.shape[0] - 1, z.shape[1]))
        res["pca"] = PCA(n_components=n_comp, random_state=0).fit(z)
        z = res["pca"].transform(z)
    res["n_components"] = int(z.shape[1])
    df = pd.DataFrame(z, columns=[f"x{i}" for i in range(z.shape[1])])
    df["T"], df["E"] = np.maximum(t, 1e-6), e
    pen = float(penalizer)
    for attempt in range(retries + 1):
        error = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cph = CoxPHFitter(penalizer=pen).fit(df, duration_col="T", event_col="E")
                if not np.all(np.isfinite(cph.params_.to_numpy())):
                    raise FloatingPointError("non-finite Cox coefficients")
            except (ConvergenceError, FloatingPointError, np.linalg.LinAlgError, ValueError) as exc:
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        if error is None:
            # lifelines also raises ConvergenceWarning as advice on fits that converged (see _NOT_CONVERGED).
            conv = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
            failed = [m for m in conv if _NOT_CONVERGED.search(m)]
            if failed:
                error = f"ConvergenceWarning: {failed[0].splitlines()[0][:300]}"
            elif conv:
                res.setdefault("warnings", []).extend(m.splitlines()[0][:300] for m in conv)
        res["attempts"].append({"penalizer": pen, "error": error})
        if error is None:
            res.update(model=cph, scaler=scaler, penalizer=pen, converged=True, error=None)
            return res
        res["error"] = f"{error} (penalizer {pen})"
        res["penalizer"] = pen
        log.warning("Cox probe attempt %d failed: %s", attempt + 1, res["error"])
        pen = pen * 10.0 if pen > 0 else 0.1
    return res


# lifelines' words for a fit that did not reach a unique optimum (non-convergence, complete separation);
# "very low variance" / collinearity notes on a converged fit are advice and do not fail it.
_NOT_CONVERGED = re.compile(r"failed to converge|did not converge|norm\(delta\) is still high", re.IGNORECASE)


def cox_design(probe: dict, x: np.ndarray) -> pd.DataFrame:
    """Embeddings -> the covariate frame the fitted Cox probe takes (its scaler, kept dims, PCA)."""
    z = probe["scaler"].transform(x)
    if probe.get("keep") is not None:
        z = z[:, probe["keep"]]
    if probe["pca"] is not None:
        z = probe["pca"].transform(z)
    return pd.DataFrame(z, columns=[f"x{i}" for i in range(z.shape[1])])


def cox_risk(probe: dict | None, x: np.ndarray) -> np.ndarray | None:
    """Partial hazard (higher = worse) of every row; None when the probe was not fitted."""
    if probe is None or probe.get("model") is None or len(x) == 0:
        return None
    risk = np.asarray(probe["model"].predict_partial_hazard(cox_design(probe, x)), float)
    return risk if np.all(np.isfinite(risk)) else None


def cox_cindex(probe: dict | None, x: np.ndarray, times: np.ndarray, events: np.ndarray) -> float | None:
    """Harrell's C of -partial hazard (higher hazard = shorter survival); None when not computable."""
    ok = np.isfinite(times) & np.isfinite(events)
    if ok.sum() < 2 or events[ok].sum() < 1:
        return None
    risk = cox_risk(probe, x[ok])
    return None if risk is None else harrell_c(times[ok], risk, events[ok])


def cox_record(probe: dict) -> dict:
    """The JSON part of a Cox probe: converged, penalizer, error, components and attempts."""
    return {"converged": bool(probe["converged"]), "penalizer": probe["penalizer"], "error": probe["error"],
            "n_components": probe.get("n_components"), "attempts": probe.get("attempts", [])}


# ------------------------------------------------------------------------------------------------ probes
def probe_embeddings(emb: np.ndarray, part: np.ndarray, labels: np.ndarray, times: np.ndarray,
                     events: np.ndarray, *, penalizer: float = 0.1, pca=None, seed: int = 0,
                     survival: bool = True, lr_max_iter: int = 1000, lr_mode: str = "standard",
                     score_on=("val", "test"), predictions: bool = False) -> dict:
    """Fit both probes on the rows with ``part == "train"``, score them on ``score_on`` partitions.

    With ``predictions`` the result also holds "_pred": row-aligned arrays (every row, all partitions)
    ``subtype_prob`` (n, n_classes) / ``subtype_pred`` / ``risk`` (Cox partial hazard) and ``classes``.
    """
    tr = part == "train"
    model = fit_lr_probe(emb[tr], labels[tr], seed=seed, max_iter=lr_max_iter, mode=lr_mode)
    out: dict = {}
    for p in score_on:
        s = score_classifier(model, emb[part == p], labels[part == p])
        out[f"{p}_bacc"], out[f"{p}_auroc"] = s["bacc"], s["auroc"]
    cox = None
    if survival:
        cox = fit_cox_probe(emb[tr], times[tr], events[tr], penalizer=penalizer, pca=pca)
        for p in score_on:
            m = part == p
            out[f"{p}_cindex"] = cox_cindex(cox, emb[m], times[m], events[m])
        out["cox"] = cox_record(cox)
    if predictions:
        pred = {"classes": None, "subtype_prob": None, "subtype_pred": None, "risk": None}
        if model is not None and len(emb):
            pred.update(classes=[int(c) for c in model.classes_], subtype_prob=model.predict_proba(emb),
                        subtype_pred=model.predict(emb).astype(int))
        if cox is not None:
            pred["risk"] = cox_risk(cox, emb)
        out["_pred"] = pred
    return out


def site_groups(sites: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """[(site, row mask)] of a pan-cancer cohort (several sites); one group of all rows otherwise."""
    uniq = sorted(set(map(str, sites)) - {""})
    if len(uniq) > 1:
        return [(s, sites == s) for s in uniq]
    return [("", np.ones(len(sites), bool))]


def mean_or_none(values) -> float | None:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def probe_sites(emb: np.ndarray, part: np.ndarray, labels: np.ndarray, times: np.ndarray, events: np.ndarray,
                sites: np.ndarray, **kw) -> tuple[dict, dict]:
    """Probes per site for pan-cancer cohorts (method 3.6 / 4.2), or once for a single-site cohort.

    Returns (result, per_site): ``result`` holds the scores (mean over sites for pan-cancer; the single
    fit otherwise), ``per_site`` maps each site to its own probe result ({} for one site).
    """
    groups = site_groups(sites)
    if len(groups) == 1:
        return probe_embeddings(emb, part, labels, times, events, **kw), {}
    per_site = {s: probe_embeddings(emb[m], part[m], labels[m], times[m], events[m], **kw) for s, m in groups}
    keys = [k for k in next(iter(per_site.values())) if k.endswith(("_bacc", "_auroc", "_cindex"))]
    result = {k: mean_or_none(r.get(k) for r in per_site.values()) for k in keys}
    if "cox" in next(iter(per_site.values())):
        result["cox"] = {s: r["cox"] for s, r in per_site.items()}
    return result, per_site


# ---------------------------------------------------------------------------------------------- bootstrap
# Hand-written on purpose: a bootstrap CI needs each metric on 1000 resamples, and sklearn's / lifelines'
# scorers cost about 1 ms per call (input validation), i.e. seconds per run and minutes per demo. A resample
# is a row of multiplicities W (B, n) (how often each test patient is drawn), so the metrics below are
# weighted pair / class sums, vectorised over all resamples. With W = 1 they equal balanced_accuracy_score,
# roc_auc_score and lifelines' concordance_index (tests/test_evaluation.py checks this).
def bootstrap_weights(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n) multiplicities of ``n_boot`` resamples with replacement of n rows (seeded)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (int(n_boot), n))
    w = np.zeros((int(n_boot), n))
    np.add.at(w, (np.repeat(np.arange(int(n_boot)), n), idx.ravel()), 1.0)
    return w


def weighted_bacc(w: np.ndarray, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Balanced accuracy per resample: mean recall over the classes drawn (labels < 0 ignored)."""
    recalls = []
    for k in np.unique(y[y >= 0]):
        support = w @ (y == k).astype(float)
        hit = w @ ((y == k) & (pred == k)).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(support > 0, hit / support, np.nan))
    if not recalls:
        return np.full(len(w), np.nan)
    r = np.stack(recalls, 1)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.nanmean(r, 1)


def _weighted_binary_auc(w: np.ndarray, pos: np.ndarray, neg: np.ndarray, score: np.ndarray) -> np.ndarray:
    gt = (score[:, None] > score[None, :]).astype(float) + 0.5 * (score[:, None] == score[None, :])
    pair = np.outer(pos, neg) * gt
    num = ((w @ pair) * w).sum(1)
    den = (w @ pos.astype(float)) * (w @ neg.astype(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_auroc(w: np.ndarray, y: np.ndarray, prob: np.ndarray, classes) -> np.ndarray:
    """AUROC per resample (binary: P(class 1); more classes: one-vs-rest macro); NaN when a class is absent."""
    classes = list(classes)
    lab = y >= 0
    if len(classes) == 2:
        return _weighted_binary_auc(w, lab & (y == classes[1]), lab & (y == classes[0]), prob[:, 1])
    per = [_weighted_binary_auc(w, lab & (y == c), lab & (y != c), prob[:, j]) for j, c in enumerate(classes)]
    return np.mean(np.stack(per, 1), 1)  # NaN when one class is missing, as class_metrics


def weighted_cindex(w: np.ndarray, times: np.ndarray, risk: np.ndarray, events: np.ndarray) -> np.ndarray:
    """Harrell's C per resample: pairs (i, j) with an event at t_i < t_j (or t_i = t_j, j censored); concordant when risk_i > risk_j
    (ties in risk count 1/2), as lifelines' concordance_index of -risk."""
    ok = np.isfinite(times) & np.isfinite(events) & np.isfinite(risk)
    w, t, r, e = w[:, ok], times[ok], risk[ok], events[ok]
    # lifelines: a death at t_i is comparable to a later time, and to a censoring at the same time.
    comparable = (e[:, None] > 0) & ((t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & (e[None, :] == 0)))
    conc = comparable * ((r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :]))
    num = ((w @ conc.astype(float)) * w).sum(1)  # sum_ij w_i w_j conc_ij per resample (a BLAS matmul)
    den = ((w @ comparable.astype(float)) * w).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def site_mean_weights(metric, w: np.ndarray, sites: np.ndarray) -> np.ndarray:
    """Pan-cancer: the metric per site (weights of the other sites zeroed), mean over defined sites."""
    groups = site_groups(sites)
    if len(groups) == 1:
        return metric(w)
    vals = np.stack([metric(w * m[None, :]) for _, m in groups], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.nanmean(vals, 1)


def percentile_ci(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile CI of the defined resample values; None when fewer than half are defined."""
    v = values[np.isfinite(values)]
    if len(values) == 0 or len(v) < len(values) / 2:
        return None
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


__all__ = ["LR_MODES", "PROBE_DEFAULTS", "bootstrap_weights", "percentile_ci", "site_mean_weights", "weighted_auroc",
           "weighted_bacc", "weighted_cindex", "class_metrics", "cox_cindex", "cox_risk",
           "fit_cox_probe", "fit_lr_probe", "harrell_c", "mean_or_none", "probe_embeddings", "probe_sites",
           "score_classifier", "site_groups"]
