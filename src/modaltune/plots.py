"""Report figures (matplotlib, PNG): Kaplan-Meier, ROC, confusion matrices, forest plot, training curves.

Every function takes tables and the PNG path it writes (atomically) and draws one panel per model.
Inputs: predictions (contract C2, one row per patient and run, with ``model_id``/``seed``/``fold`` added by
``aggregate.load_predictions``), paired differences (``aggregate.paired_comparisons``), history.parquet files.
matplotlib / lifelines / sklearn are imported inside the functions so ``import modaltune`` stays light.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from modaltune.io_utils import atomic_path

NCOLS = 4
DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    plt = _plt()
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _grid(n: int, title: str, panel=(4.2, 3.4), ncols: int = NCOLS):
    plt = _plt()
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows + 0.6), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=13)
    return fig, list(axes.flat[:n])


def _message(path, title: str, text: str) -> None:
    """A readable placeholder figure when there is nothing to draw (the file is a declared output)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.2))
    ax.axis("off")
    ax.set_title(title, fontsize=13)
    ax.text(0.5, 0.45, text, ha="center", va="center", wrap=True, fontsize=10)
    _save(fig, path)


def _first_seed(p: pd.DataFrame) -> pd.DataFrame:
    """Rows of each model's first seed: over k folds every test patient then appears once."""
    first = p.groupby("model_id")["seed"].transform("min")
    return p[p["seed"] == first]


# --------------------------------------------------------------------------------------- Kaplan-Meier
def km_groups(preds: pd.DataFrame) -> pd.DataFrame:
    """Test patients of every survival-reported run split at the median risk of that run's TRAIN rows.

    Returns one row per (model_id, eval_cohort, seed, fold, patient): time, event, risk, ``group``
    ("high" when risk > the training median, else "low"). The split is fitted on training patients only.
    Pan-cancer cohorts (several ``site`` values) are split and drawn per site ("PANCAN / BRCA")."""
    cols = ["model_id", "eval_cohort", "seed", "fold", "patient_id", "time", "event", "risk", "group"]
    if preds.empty:
        return pd.DataFrame(columns=cols)
    p = preds[preds["survival_reported"].astype(bool) & preds["risk"].notna()]
    if "site" in p.columns and p.groupby("eval_cohort")["site"].nunique().gt(1).any():
        # pan-cancer: one split and one panel per site (risks of different sites are not comparable)
        p = p.assign(eval_cohort=p["eval_cohort"].astype(str) + " / " + p["site"].astype(str))
    out = []
    for _, g in p.groupby(["model_id", "eval_cohort", "seed", "fold"]):
        train = g[g["partition"] == "train"]["risk"]
        test = g[(g["partition"] == "test") & g["time"].notna() & g["event"].notna()]
        if train.empty or test.empty:
            continue
        cut = float(np.median(train))
        out.append(test.assign(group=np.where(test["risk"] > cut, "high", "low")))
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def km_logrank(groups: pd.DataFrame) -> pd.DataFrame:
    """Log-rank p (lifelines) per (model_id, eval_cohort), over the first seed's folds."""
    from lifelines.statistics import logrank_test

    rows = []
    for (model, cohort), g in _first_seed(groups).groupby(["model_id", "eval_cohort"]) if len(groups) else []:
        hi, lo = g[g["group"] == "high"], g[g["group"] == "low"]
        p = np.nan
        if len(hi) and len(lo) and (hi["event"].sum() + lo["event"].sum()) > 0:
            p = float(logrank_test(hi["time"], lo["time"], hi["event"], lo["event"]).p_value)
        rows.append({"model_id": model, "eval_cohort": cohort, "n_high": len(hi), "n_low": len(lo),
                     "events_high": int(hi["event"].sum()), "events_low": int(lo["event"].sum()), "logrank_p": p})
    return pd.DataFrame(rows, columns=["model_id", "eval_cohort", "n_high", "n_low", "events_high", "events_low",
                                       "logrank_p"])


def plot_kaplan_meier(preds: pd.DataFrame, path) -> pd.DataFrame:
    """One panel per (model, cohort): KM curves of the high- and low-risk test groups, log-rank p."""
    from lifelines import KaplanMeierFitter

    groups = km_groups(preds)
    stats = km_logrank(groups)
    if stats.empty:
        _message(path, "Kaplan-Meier", "No survival predictions (predictions.parquet with a risk column) "
                 "for the models reported on survival.")
        return stats
    fig, axes = _grid(len(stats), "Kaplan-Meier: test patients split at the training median risk")
    first = _first_seed(groups)
    for ax, (_, s) in zip(axes, stats.iterrows(), strict=True):
        g = first[(first["model_id"] == s["model_id"]) & (first["eval_cohort"] == s["eval_cohort"])]
        for grp, colour in (("low", "tab:blue"), ("high", "tab:red")):
            d = g[g["group"] == grp]
            if d.empty:
                continue
            KaplanMeierFitter().fit(d["time"], d["event"], label=f"{grp} risk (n={len(d)})").plot_survival_function(
                ax=ax, color=colour, ci_show=True)
        p = s["logrank_p"]
        ax.set_title(f"{s['model_id']} · {s['eval_cohort']}\nlog-rank p = {p:.3g}" if np.isfinite(p)
                     else f"{s['model_id']} · {s['eval_cohort']}\nlog-rank p: n/a", fontsize=10)
        ax.set(xlabel="months", ylabel="survival probability", ylim=(0, 1.05))
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    _save(fig, path)
    return stats


# ----------------------------------------------------------------------------------- classification
def _prob_cols(p: pd.DataFrame) -> list[str]:
    cols = [c for c in p.columns if c.startswith("subtype_prob_")]
    return sorted(cols, key=lambda c: int(c.rsplit("_", 1)[1]))


def _subtype_test(preds: pd.DataFrame) -> pd.DataFrame:
    if preds.empty:
        return preds
    p = preds[preds["subtype_reported"].astype(bool) & (preds["partition"] == "test") & (preds["label"] >= 0)]
    cols = _prob_cols(p)
    if not cols:
        return p.iloc[0:0]
    return _first_seed(p[p[cols].notna().all(axis=1)])


def plot_roc(preds: pd.DataFrame, path) -> int:
    """ROC curves (one-vs-rest per class; the positive class for two classes) of test patients pooled over
    the first seed's folds, one panel per (model, cohort). Returns the number of panels."""
    from sklearn.metrics import auc, roc_curve

    p = _subtype_test(preds)
    keys = sorted(p.groupby(["model_id", "eval_cohort"]).groups) if len(p) else []
    if not keys:
        _message(path, "ROC", "No subtype predictions (predictions.parquet with subtype_prob_* columns) "
                 "for the models reported on the subtype task.")
        return 0
    fig, axes = _grid(len(keys), "ROC curves of test patients (one vs rest)", panel=(3.8, 3.6))
    cols = _prob_cols(p)
    for ax, (model, cohort) in zip(axes, keys, strict=True):
        g = p[(p["model_id"] == model) & (p["eval_cohort"] == cohort)]
        y = g["label"].to_numpy(int)
        classes = [1] if len(cols) == 2 else range(len(cols))
        for k in classes:
            pos = y == k
            if pos.all() or not pos.any():
                continue
            fpr, tpr, _ = roc_curve(pos, g[cols[k]].to_numpy(float))
            ax.plot(fpr, tpr, lw=1.8, label=f"class {k} (AUC {auc(fpr, tpr):.2f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
        ax.set_title(f"{model} · {cohort} (n={len(g)})", fontsize=10)
        if ax.lines[:-1]:
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    return len(keys)


def plot_confusion(preds: pd.DataFrame, path) -> int:
    """Row-normalised confusion matrices (counts annotated) of test patients, one panel per (model, cohort)."""
    from sklearn.metrics import confusion_matrix

    p = _subtype_test(preds)
    if len(p) and "subtype_pred" in p.columns:
        p = p[p["subtype_pred"] >= 0]
    keys = sorted(p.groupby(["model_id", "eval_cohort"]).groups) if len(p) else []
    if not keys:
        _message(path, "Confusion matrices", "No subtype predictions for the models reported on the subtype task.")
        return 0
    n_classes = len(_prob_cols(p))
    fig, axes = _grid(len(keys), "Confusion matrices of test patients (rows: true class)", panel=(3.4, 3.2))
    for ax, (model, cohort) in zip(axes, keys, strict=True):
        g = p[(p["model_id"] == model) & (p["eval_cohort"] == cohort)]
        cm = confusion_matrix(g["label"].astype(int), g["subtype_pred"].astype(int), labels=list(range(n_classes)))
        frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(n_classes):
            for j in range(n_classes):
                ax.text(j, i, f"{cm[i, j]}\n{frac[i, j]:.0%}", ha="center", va="center", fontsize=9,
                        color="white" if frac[i, j] > 0.6 else "black")
        ax.set_xticks(range(n_classes))
        ax.set_yticks(range(n_classes))
        ax.set(xlabel="predicted class", ylabel="true class")
        ax.set_title(f"{model} · {cohort} (n={len(g)})", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return len(keys)


# ------------------------------------------------------------------------------------------- forest
def plot_forest(pairs: pd.DataFrame, path, metric_label: str) -> None:
    """Mean paired difference (reference minus other) with its 95 % CI, one line per compared model."""
    pairs = pairs.dropna(subset=["mean_diff"]) if len(pairs) else pairs
    if pairs.empty:
        _message(path, f"Paired differences: {metric_label}", "No paired comparison: ModalTune and another model "
                 "reported on this task share no (seed, fold).")
        return
    plt = _plt()
    pairs = pairs.sort_values(["eval_cohort", "mean_diff"])
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(pairs) + 1.4))
    y = np.arange(len(pairs))[::-1]
    lo = (pairs["mean_diff"] - pairs["ci_lo"]).fillna(0).to_numpy()
    hi = (pairs["ci_hi"] - pairs["mean_diff"]).fillna(0).to_numpy()
    ax.errorbar(pairs["mean_diff"], y, xerr=[lo, hi], fmt="o", color="tab:blue", capsize=3)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    labels = [f"{r.reference} − {r.other} · {r.eval_cohort} (n={r.n_pairs}"
              + (f", p={r.wilcoxon_p:.2g})" if pd.notna(r.wilcoxon_p) else ")") for r in pairs.itertuples()]
    ax.set_yticks(y, labels, fontsize=9)
    ax.set_xlabel(f"difference in {metric_label} (paired over seed × fold, 95 % t-CI)")
    ax.set_title(f"Paired differences against ModalTune: {metric_label}", fontsize=12)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------------------------- probe bar chart
def plot_summary(summary: pd.DataFrame, path) -> None:
    plt = _plt()
    cohorts = sorted(summary["eval_cohort"].unique()) or [""]
    fig, axes = plt.subplots(len(cohorts), 2, figsize=(11, 3.6 * len(cohorts)), squeeze=False)
    for i, c in enumerate(cohorts):
        s = summary[summary["eval_cohort"] == c]
        for j, (k, name) in enumerate((("subtype_bacc", "balanced accuracy"), ("survival_cindex", "C-index"))):
            ax = axes[i, j]
            x = np.arange(len(s))
            ax.bar(x, s[f"{k}_mean"].fillna(0), yerr=s[f"{k}_std"].fillna(0), capsize=3, color="tab:blue")
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_xticks(x, s["model"], rotation=45, ha="right", fontsize=9)
            ax.set(ylim=(0, 1), ylabel=name, title=f"{c}: linear probe {name}")
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------------- training curves
def read_histories(history_files: list[str]) -> pd.DataFrame:
    """All history.parquet files stacked with ``model``/``seed``/``fold`` from runs/{model}/seed_s/fold_k/."""
    parts = []
    for f in history_files:
        h = pd.read_parquet(f)
        if h.empty or "epoch" not in h.columns:
            continue
        run = Path(f).parent
        parts.append(h.assign(model=run.parent.parent.name, seed=run.parent.name, fold=run.name))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def curve_columns(hist: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(loss columns, validation metric columns) present in the histories (the schema may grow)."""
    losses = [c for c in ("train_loss", "val_loss") if c in hist.columns and hist[c].notna().any()]
    metrics = sorted(c for c in hist.columns if c.startswith("val_") and c != "val_loss"
                     and pd.api.types.is_numeric_dtype(hist[c]) and hist[c].notna().any())
    return losses, metrics


def plot_training_curves(history_files: list[str], path) -> int:
    """Per model two stacked panels (losses; validation metrics): mean over (seed, fold) runs and a band of
    ± one std, with a legend. Returns the number of models drawn."""
    hist = read_histories(history_files)
    if hist.empty:
        _message(path, "Training curves", "No training history (every history.parquet is empty).")
        return 0
    plt = _plt()
    losses, metrics = curve_columns(hist)
    models = sorted(hist["model"].unique())
    ncols = min(NCOLS, len(models))
    nblocks = math.ceil(len(models) / ncols)
    fig, axes = plt.subplots(2 * nblocks, ncols, figsize=(4.2 * ncols, 5.6 * nblocks + 0.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        top, bottom = axes[2 * (i // ncols), i % ncols], axes[2 * (i // ncols) + 1, i % ncols]
        h = hist[hist["model"] == model]
        n_runs = h.groupby(["seed", "fold"]).ngroups
        for ax, cols in ((top, losses), (bottom, metrics)):
            for k, c in enumerate(cols):
                s = h.groupby("epoch")[c].agg(["mean", "std"]).dropna(subset=["mean"])
                if s.empty:
                    continue
                col = colours[k % len(colours)]
                ax.plot(s.index, s["mean"], "o-", ms=3, color=col, label=c.replace("_", " "))
                ax.fill_between(s.index, s["mean"] - s["std"].fillna(0), s["mean"] + s["std"].fillna(0),
                                color=col, alpha=0.2)
            if ax.lines:
                ax.legend(fontsize=8)
            ax.set_xlabel("epoch")
        top.set_title(f"{model} ({n_runs} runs)", fontsize=11)
        top.set_ylabel("loss")
        bottom.set_ylabel("validation metric")
    for j in range(len(models), nblocks * ncols):
        axes[2 * (j // ncols), j % ncols].set_visible(False)
        axes[2 * (j // ncols) + 1, j % ncols].set_visible(False)
    fig.suptitle("Training curves: mean ± std over seeds × folds", fontsize=13)
    fig.tight_layout()
    _save(fig, path)
    return len(models)


# --------------------------------------------------------------------------------------- tiling QC
def plot_tiling_qc(images: list[str], path, max_slides: int = 24) -> int:
    """Contact sheet of the tiling QC thumbnails (first ``max_slides`` slides, sorted by name)."""
    images = sorted(images, key=lambda p: Path(p).name)[:max_slides]
    if not images:
        _message(path, "Tiling QC", "No tiling thumbnails.")
        return 0
    plt = _plt()
    fig, axes = _grid(len(images), f"Tiling QC: tissue mask and patch grid ({len(images)} slides shown)",
                      panel=(3.2, 3.0), ncols=6)
    for ax, f in zip(axes, images, strict=True):
        ax.imshow(plt.imread(f))
        ax.set_title(Path(f).stem, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    return len(images)


__all__ = ["plot_tiling_qc", "curve_columns", "km_groups", "km_logrank", "plot_confusion", "plot_forest", "plot_kaplan_meier",
           "plot_roc", "plot_summary", "plot_training_curves", "read_histories"]
