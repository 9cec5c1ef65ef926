"""Summary tables and plots over folds x seeds, paired model comparisons, failures / throughput tables.

Std convention: the sample standard deviation (ddof=1) over all (seed, fold) runs of a model on one
evaluation cohort; ``n`` runs are shown next to it (a single run has no std). No torch here (CPU rule).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from modaltune.errors import InputError
from modaltune.io_utils import atomic_path

log = logging.getLogger(__name__)

METRICS = ("subtype_bacc", "subtype_auroc", "survival_cindex")
REFERENCE_ARCH = "modaltune"
MIN_PAIRS_FOR_TEST = 5


def load_metrics(metrics_files: list[str]) -> pd.DataFrame:
    rows = []
    for f in metrics_files:
        try:
            m = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"metrics {f}: cannot read JSON ({e}); rerun the evaluate rule for it") from e
        missing = [k for k in ("model", "seed", "fold", "eval_cohort", "test_patients") if k not in m]
        if missing:
            raise InputError(f"metrics {f}: missing field(s) {missing}; rerun evaluate with this version")
        rows.append({"file": str(f), "model": m["model"], "arch": m.get("arch", m["model"]),
                     "train_cohort": m.get("train_cohort"), "eval_cohort": m["eval_cohort"],
                     "seed": int(m["seed"]), "fold": int(m["fold"]),
                     **{k: (np.nan if m.get(k) is None else float(m[k])) for k in METRICS},
                     "test_patients": tuple(sorted(m["test_patients"]))})
    df = pd.DataFrame(rows)
    # OOD rows: one model name may be trained on several cohorts (site vs pan-cancer) -> keep them apart.
    ood = df["train_cohort"].notna() & (df["train_cohort"] != df["eval_cohort"])
    df["model_id"] = np.where(ood, df["model"] + " (" + df["train_cohort"].astype(str) + ")", df["model"])
    return df


def check_paired(df: pd.DataFrame) -> None:
    """Every model scored on one (seed, fold, eval_cohort) must see the same test patients."""
    for key, grp in df.groupby(["seed", "fold", "eval_cohort"]):
        sets = grp.groupby("test_patients")["file"].apply(list)
        if len(sets) > 1:
            files = [v[0] for v in sets.to_numpy()]
            raise InputError(
                f"seed {key[0]} fold {key[1]} cohort {key[2]}: models were tested on different patients "
                f"(e.g. {files[:3]}); evaluate every model with the same splits file so comparisons are paired"
            )


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (model, cohort), g in df.groupby(["model_id", "eval_cohort"], sort=True):
        row = {"model": model, "arch": g["arch"].iloc[0], "train_cohort": g["train_cohort"].iloc[0],
               "eval_cohort": cohort, "n_runs": len(g)}
        for k in METRICS:
            v = g[k].dropna()
            row[f"{k}_n"] = len(v)
            row[f"{k}_mean"] = float(v.mean()) if len(v) else np.nan
            row[f"{k}_std"] = float(v.std(ddof=1)) if len(v) > 1 else np.nan
        out.append(row)
    return pd.DataFrame(out)


def paired_comparisons(df: pd.DataFrame) -> pd.DataFrame:
    """ModalTune (arch "modaltune") minus each other model over identical (seed, fold) pairs."""
    from scipy.stats import wilcoxon

    rows = []
    refs = sorted(df.loc[df["arch"] == REFERENCE_ARCH, "model_id"].unique())
    for cohort, g in df.groupby("eval_cohort"):
        for ref in refs:
            a = g[g["model_id"] == ref].set_index(["seed", "fold"])
            if a.empty:
                continue
            for other in sorted(set(g["model_id"]) - {ref}):
                b = g[g["model_id"] == other].set_index(["seed", "fold"])
                for k in ("subtype_bacc", "survival_cindex"):
                    j = a[[k]].join(b[[k]], lsuffix="_ref", rsuffix="_other", how="inner").dropna()
                    d = (j[f"{k}_ref"] - j[f"{k}_other"]).to_numpy()
                    p = None
                    if len(d) >= MIN_PAIRS_FOR_TEST:
                        p = 1.0 if np.allclose(d, 0) else float(wilcoxon(d).pvalue)
                    rows.append({"eval_cohort": cohort, "reference": ref, "other": other, "metric": k,
                                 "n_pairs": len(d), "mean_diff": float(d.mean()) if len(d) else np.nan,
                                 "wilcoxon_p": p})
    return pd.DataFrame(rows, columns=["eval_cohort", "reference", "other", "metric", "n_pairs", "mean_diff",
                                       "wilcoxon_p"])


def _fmt(mean, std, n) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f} (n={n})" if np.isfinite(std) else f"{mean:.3f} (n={n})"


def markdown_table(summary: pd.DataFrame) -> str:
    # Hand-written: pandas.to_markdown needs the optional `tabulate` package.
    head = ["model", "eval cohort", "subtype bal. acc", "subtype AUROC", "C-index"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        cells = [r["model"], r["eval_cohort"]] + [_fmt(r[f"{k}_mean"], r[f"{k}_std"], r[f"{k}_n"]) for k in METRICS]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    lines.append("Mean ± sample std (ddof=1) over folds × seeds; n = runs with a value.")
    return "\n".join(lines) + "\n"


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def plot_summary(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohorts = sorted(summary["eval_cohort"].unique()) or [""]
    fig, axes = plt.subplots(len(cohorts), 2, figsize=(10, 3 * len(cohorts)), squeeze=False)
    for i, c in enumerate(cohorts):
        s = summary[summary["eval_cohort"] == c]
        for j, (k, name) in enumerate((("subtype_bacc", "balanced accuracy"), ("survival_cindex", "C-index"))):
            ax = axes[i, j]
            x = np.arange(len(s))
            ax.bar(x, s[f"{k}_mean"].fillna(0), yerr=s[f"{k}_std"].fillna(0), capsize=3, color="tab:blue")
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_xticks(x, s["model"], rotation=45, ha="right", fontsize=8)
            ax.set(ylim=(0, 1), ylabel=name, title=f"{c}: {name}")
    fig.tight_layout()
    _save_fig(fig, path)


def plot_curves(history_files: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for f in history_files:
        h = pd.read_parquet(f)
        if h.empty:
            continue
        parts = Path(f).parts
        label = "/".join(parts[-4:-1]) if len(parts) >= 4 else str(f)
        ax[0].plot(h["epoch"], h["val_loss"], marker=".", label=label)
        ax[1].plot(h["epoch"], h["val_bacc"], marker=".", label=label)
    ax[0].set(xlabel="epoch", ylabel="val loss")
    ax[1].set(xlabel="epoch", ylabel="val balanced accuracy (probe)")
    if len(history_files) <= 12 and ax[1].lines:
        ax[1].legend(fontsize=6)
    fig.tight_layout()
    _save_fig(fig, path)


def slide_tables(feature_files: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(failures, throughput) from the features HDF5 attrs (status, error, tiles_per_s, wall_s)."""
    import h5py

    fails, speed = [], []
    for f in feature_files:
        sid = Path(f).name.removesuffix(".h5")
        try:
            with h5py.File(f, "r") as h5:
                a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
                n = int(h5["features"].shape[0]) if "features" in h5 else 0
        except OSError as e:
            fails.append({"slide_id": sid, "file": str(f), "status": "unreadable", "error": str(e)})
            continue
        if str(a.get("status", "ok")) != "ok":
            fails.append({"slide_id": sid, "file": str(f), "status": str(a.get("status")),
                          "error": str(a.get("error", ""))})
        else:
            speed.append({"slide_id": sid, "encoder": a.get("encoder"), "n_tiles": n,
                          "tiles_per_s": float(a.get("tiles_per_s", np.nan)), "wall_s": float(a.get("wall_s", np.nan))})
    return (pd.DataFrame(fails, columns=["slide_id", "file", "status", "error"]),
            pd.DataFrame(speed, columns=["slide_id", "encoder", "n_tiles", "tiles_per_s", "wall_s"]))


def _write_tsv(df: pd.DataFrame, path: Path, sep: str = "\t") -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep=sep, index=False)


def aggregate(metrics_files: list[str], out_dir, *, feature_files: list[str] | None = None,
              history_files: list[str] | None = None) -> pd.DataFrame:
    """Write tables/summary.{csv,md}, tables/paired.csv, plots/summary.png, plots/curves.png and, given
    feature files, failures.tsv + throughput.tsv under ``out_dir``; return the summary table.

    Raises ``InputError`` when two models' metrics for one (seed, fold, eval_cohort) list different test
    patients: comparisons must be paired by construction.
    """
    out_dir = Path(out_dir)
    if not metrics_files:
        raise InputError("aggregate: no metrics files given; run the evaluate rule first")
    df = load_metrics(metrics_files)
    check_paired(df)
    summary = summarise(df)
    paired = paired_comparisons(df)
    _write_tsv(summary, out_dir / "tables" / "summary.csv", sep=",")
    with atomic_path(out_dir / "tables" / "summary.md") as tmp:
        tmp.write_text(markdown_table(summary))
    _write_tsv(paired, out_dir / "tables" / "paired.csv", sep=",")
    plot_summary(summary, out_dir / "plots" / "summary.png")
    plot_curves(list(history_files or []), out_dir / "plots" / "curves.png")
    if feature_files is not None:
        fails, speed = slide_tables(feature_files)
        _write_tsv(fails, out_dir / "failures.tsv")
        _write_tsv(speed, out_dir / "throughput.tsv")
    log.info("aggregated %d runs of %d models", len(df), df["model_id"].nunique())
    return summary


__all__ = ["aggregate", "check_paired", "paired_comparisons", "slide_tables", "summarise"]
