"""Comparison tables and plots over folds x seeds, paired model comparisons, failures / throughput tables.

Two kinds of table (issue 16.2):

* **Task tables** (the paper's layout): a subtype table and a survival table, rows = models, columns =
  evaluation cohorts + "Overall" (mean over cohorts). A model appears in a task table only when its
  metrics.json task block says ``reported: true`` (classification models in the subtype table, survival
  models in the survival table, text_kl / probe-only models in both); the row states the metric source
  (``head`` = the model's own head, ``probe`` = linear probe on the frozen embedding).
* **Probe table** (``summary.csv``, secondary): the linear-probe metrics of every embedding on every task.

Cells: mean ± sample std (ddof=1) over all (seed, fold) runs of a model on one cohort, n runs, and in
brackets the bootstrap 95 % CI over test patients (from metrics.json), averaged over the runs.
Old metrics files (schema 1, no task blocks) are read too: the task is inferred from the objective and
the headline probe values are used (source ``probe``, no CI). No torch here (CPU rule).
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from modaltune import plots
from modaltune.errors import InputError
from modaltune.io_utils import atomic_path
from modaltune.pairing import paired_metrics

log = logging.getLogger(__name__)

METRICS = ("subtype_bacc", "subtype_auroc", "survival_cindex")
REFERENCE_ARCH = "modaltune"
MIN_PAIRS_FOR_TEST = 5
# Objectives reported on each task when an old metrics file has no task block (contract C1).
TASK_OBJECTIVES = {"subtype": {"classification", "text_kl", "none"}, "survival": {"survival", "text_kl", "none"}}
# (task, metric key in the task block, column prefix in the run table, label)
TASK_METRICS = (("subtype", "bacc", "task_subtype_bacc", "balanced accuracy"),
                ("subtype", "auroc", "task_subtype_auroc", "AUROC"),
                ("survival", "cindex", "task_survival_cindex", "C-index"))

# Every file ``aggregate`` writes under its out_dir (rules/report.smk declares each one).
TABLE_FILES = ("tables/summary.md", "tables/summary.csv", "tables/summary.html", "tables/subtype.csv",
               "tables/subtype.md", "tables/survival.csv", "tables/survival.md", "tables/paired.csv",
               "tables/common.csv")
PLOT_FILES = ("plots/summary.png", "plots/curves.png", "plots/km.png", "plots/roc.png", "plots/confusion.png",
              "plots/forest_subtype.png", "plots/forest_survival.png", "plots/tiling_qc.png")
SLIDE_FILES = ("failures.tsv", "throughput.tsv")


def _ci(v) -> tuple[float, float]:
    if isinstance(v, list | tuple) and len(v) == 2 and all(x is not None for x in v):
        return float(v[0]), float(v[1])
    return np.nan, np.nan


def _num(v) -> float:
    return np.nan if v is None else float(v)


def task_block(m: dict, task: str) -> dict:
    """The contract-C1 task block of one metrics dict; derived from the headline keys for schema-1 files."""
    blk = m.get(task)
    if isinstance(blk, dict) and "reported" in blk:
        return blk
    reported = m.get("objective") in TASK_OBJECTIVES[task]
    if task == "subtype":
        return {"reported": reported, "source": "probe" if reported else None, "bacc": m.get("subtype_bacc"),
                "auroc": m.get("subtype_auroc"), "bacc_ci95": None, "auroc_ci95": None}
    return {"reported": reported, "source": "probe" if reported else None, "cindex": m.get("survival_cindex"),
            "cindex_ci95": None}


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
        row = {"file": str(f), "model": m["model"], "arch": m.get("arch", m["model"]),
               "objective": m.get("objective"), "schema_version": int(m.get("schema_version", 1)),
               "train_cohort": m.get("train_cohort"), "eval_cohort": m["eval_cohort"],
               "seed": int(m["seed"]), "fold": int(m["fold"]),
               **{k: _num(m.get(k)) for k in METRICS},
               "test_patients": tuple(sorted(m["test_patients"]))}
        probe_ci = m.get("probe_ci95") or {}
        for k in METRICS:
            row[f"{k}_lo"], row[f"{k}_hi"] = _ci(probe_ci.get(k))
        for task in ("subtype", "survival"):
            blk = task_block(m, task)
            row[f"{task}_reported"] = bool(blk.get("reported"))
            row[f"{task}_source"] = blk.get("source")
        for task, key, col, _ in TASK_METRICS:
            blk = task_block(m, task)
            row[col] = _num(blk.get(key)) if row[f"{task}_reported"] else np.nan
            row[f"{col}_lo"], row[f"{col}_hi"] = _ci(blk.get(f"{key}_ci95"))
        rows.append(row)
    df = pd.DataFrame(rows)
    # OOD rows: one model name may be trained on several cohorts (site vs pan-cancer) -> keep them apart.
    ood = df["train_cohort"].notna() & (df["train_cohort"] != df["eval_cohort"])
    df["model_id"] = np.where(ood, df["model"] + " (" + df["train_cohort"].astype(str) + ")", df["model"])
    return df


def check_paired(df: pd.DataFrame) -> bool:
    """Every model scored on one (seed, fold, eval_cohort) must see the same test patients, or nested sets.

    Nested = the test sets of a (seed, fold, cohort) form a chain under inclusion, which is what
    ``training.keep_slideless_for_non_slide_models`` gives (models without slides also test the patients who
    have none). Returns True when some sets differ; the common-patients table then pairs the models.
    Anything else (e.g. two splits files) is an ``InputError``.
    """
    differs = False
    for key, grp in df.groupby(["seed", "fold", "eval_cohort"]):
        sets = grp.groupby("test_patients")["file"].apply(list)
        if len(sets) < 2:
            continue
        chain = sorted((frozenset(t) for t in sets.index), key=len)
        if any(not a <= b for a, b in zip(chain[:-1], chain[1:], strict=True)):
            files = [v[0] for v in sets.to_numpy()]
            raise InputError(
                f"seed {key[0]} fold {key[1]} cohort {key[2]}: models were tested on different patients "
                f"(e.g. {files[:3]}); evaluate every model with the same splits file so comparisons are paired"
            )
        differs = True
    return differs


def common_patient_runs(df: pd.DataFrame, preds: pd.DataFrame) -> pd.DataFrame:
    """Each run's reported task metrics recomputed on the test patients that every model of its
    (seed, fold, eval_cohort) has (``pairing.paired_metrics``), with ``n_test`` and ``n_common``.

    Runs without a predictions file are left out. Metrics are pooled over the common patients (no per-site
    mean for pan-cancer cohorts)."""
    cols = ["model_id", "seed", "fold", "eval_cohort", "n_test", "n_common",
            "task_subtype_bacc", "task_survival_cindex"]
    if preds.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (seed, fold, cohort), g in preds.groupby(["seed", "fold", "eval_cohort"]):
        scored = paired_metrics(dict(tuple(g.groupby("model_id"))))
        flags = g.drop_duplicates("model_id").set_index("model_id")
        for _, r in scored.iterrows():
            f = flags.loc[r["model"]]
            rows.append({"model_id": r["model"], "seed": seed, "fold": fold, "eval_cohort": cohort,
                         "n_test": int(r["n_test"]), "n_common": int(r["n_common"]),
                         "task_subtype_bacc": _num(r["bacc"]) if f["subtype_reported"] else np.nan,
                         "task_survival_cindex": _num(r["cindex"]) if f["survival_reported"] else np.nan})
    return pd.DataFrame(rows, columns=cols)


def common_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sample std over runs of the common-patients metrics, per (model, eval_cohort), with the counts."""
    out = []
    for (model, cohort), g in runs.groupby(["model_id", "eval_cohort"], sort=True):
        row = {"model": model, "eval_cohort": cohort, "n_runs": len(g),
               "n_test_mean": float(g["n_test"].mean()), "n_common_mean": float(g["n_common"].mean())}
        for col, name in (("task_subtype_bacc", "subtype_bacc"), ("task_survival_cindex", "survival_cindex")):
            v = g[col].dropna()
            row.update({f"{name}_n": int(len(v)), f"{name}_mean": float(v.mean()) if len(v) else np.nan,
                        f"{name}_std": float(v.std(ddof=1)) if len(v) > 1 else np.nan})
        out.append(row)
    return pd.DataFrame(out, columns=["model", "eval_cohort", "n_runs", "n_test_mean", "n_common_mean",
                                      "subtype_bacc_n", "subtype_bacc_mean", "subtype_bacc_std",
                                      "survival_cindex_n", "survival_cindex_mean", "survival_cindex_std"])


def common_markdown(table: pd.DataFrame, differs: bool) -> str:
    head = ["model", "eval cohort", "test patients (own)", "common test patients", "subtype bal. acc", "C-index"]
    rows = [[r["model"], r["eval_cohort"], f"{r['n_test_mean']:.1f}", f"{r['n_common_mean']:.1f}",
             _fmt(r["subtype_bacc_mean"], r["subtype_bacc_std"], r["subtype_bacc_n"]),
             _fmt(r["survival_cindex_mean"], r["survival_cindex_std"], r["survival_cindex_n"])]
            for _, r in table.iterrows()]
    note = ("Some models were tested on more patients (patients without slides kept for the models that read "
            "none); here every model is scored on the patients all models share, per seed and fold."
            if differs else "Every model was tested on the same patients.")
    return "\n".join(_md(head, rows) + ["", note + " Metrics: each model's reported task metric (head or probe), "
                                        "pooled over the common test patients; mean ± sample std over runs.", ""])


def _stats(values: pd.Series, lo: pd.Series, hi: pd.Series) -> dict:
    ok = values.notna()
    v = values[ok]
    return {"n": int(len(v)), "mean": float(v.mean()) if len(v) else np.nan,
            "std": float(v.std(ddof=1)) if len(v) > 1 else np.nan,
            "ci_lo": float(lo[ok].mean()) if lo[ok].notna().any() else np.nan,
            "ci_hi": float(hi[ok].mean()) if hi[ok].notna().any() else np.nan}


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """The probe table: every model's linear-probe metrics on every task, per evaluation cohort."""
    out = []
    for (model, cohort), g in df.groupby(["model_id", "eval_cohort"], sort=True):
        row = {"model": model, "arch": g["arch"].iloc[0], "train_cohort": g["train_cohort"].iloc[0],
               "eval_cohort": cohort, "n_runs": len(g)}
        for k in METRICS:
            s = _stats(g[k], g[f"{k}_lo"], g[f"{k}_hi"])
            row.update({f"{k}_{stat}": val for stat, val in s.items()})
        out.append(row)
    return pd.DataFrame(out)


def task_table(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """One task table in long form: (model, eval_cohort | "Overall") rows with mean/std/n/CI per metric.

    Only runs whose task block says ``reported`` enter; the Overall row is the mean over the cohorts'
    means (cohorts without a value are left out; its std is the std over cohort means)."""
    cols = [(key, col) for t, key, col, _ in TASK_METRICS if t == task]
    sub = df[df[f"{task}_reported"]]
    rows = []
    for model, gm in sub.groupby("model_id", sort=True):
        sources = sorted({s for s in gm[f"{task}_source"] if s})
        per_cohort = []
        for cohort, g in gm.groupby("eval_cohort", sort=True):
            row = {"model": model, "arch": g["arch"].iloc[0], "source": "/".join(sources) or None,
                   "eval_cohort": cohort, "n_runs": len(g)}
            for key, col in cols:
                row.update({f"{key}_{stat}": val for stat, val in _stats(g[col], g[f"{col}_lo"],
                                                                         g[f"{col}_hi"]).items()})
            per_cohort.append(row)
        overall = {"model": model, "arch": gm["arch"].iloc[0], "source": "/".join(sources) or None,
                   "eval_cohort": "Overall", "n_runs": len(gm)}
        for key, _ in cols:
            means = pd.Series([r[f"{key}_mean"] for r in per_cohort], dtype=float).dropna()
            overall.update({f"{key}_n": int(len(means)), f"{key}_mean": float(means.mean()) if len(means) else
                            np.nan, f"{key}_std": float(means.std(ddof=1)) if len(means) > 1 else np.nan,
                            f"{key}_ci_lo": np.nan, f"{key}_ci_hi": np.nan})
        rows += per_cohort + [overall]
    stat_cols = [f"{key}_{s}" for key, _ in cols for s in ("n", "mean", "std", "ci_lo", "ci_hi")]
    return pd.DataFrame(rows, columns=["model", "arch", "source", "eval_cohort", "n_runs", *stat_cols])


def with_common_task_metrics(df: pd.DataFrame, common_runs: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the task metrics of every run replaced by its common-patients values (so that the paired
    task differences compare models on the same patients); runs without predictions get NaN."""
    key = ["model_id", "seed", "fold", "eval_cohort"]
    cols = ["task_subtype_bacc", "task_survival_cindex"]
    return df.drop(columns=cols).merge(common_runs[key + cols], on=key, how="left")


def paired_comparisons(df: pd.DataFrame) -> pd.DataFrame:
    """ModalTune (arch "modaltune") minus each other model over identical (seed, fold) pairs.

    ``table`` = probe: the headline linear-probe metrics of every model; ``table`` = task: the reported
    task metric (only models reported on that task). ``ci_lo``/``ci_hi``: t-interval (95 %) of the mean
    paired difference; ``wilcoxon_p`` from at least MIN_PAIRS_FOR_TEST pairs."""
    from scipy import stats

    rows = []
    refs = sorted(df.loc[df["arch"] == REFERENCE_ARCH, "model_id"].unique())
    metrics = [("probe", k, k) for k in ("subtype_bacc", "survival_cindex")]
    metrics += [("task", "task_subtype_bacc", "subtype_bacc"), ("task", "task_survival_cindex", "survival_cindex")]
    for cohort, g in df.groupby("eval_cohort"):
        for ref in refs:
            a = g[g["model_id"] == ref].set_index(["seed", "fold"])
            if a.empty:
                continue
            for other in sorted(set(g["model_id"]) - {ref}):
                b = g[g["model_id"] == other].set_index(["seed", "fold"])
                for table, col, name in metrics:
                    j = a[[col]].join(b[[col]], lsuffix="_ref", rsuffix="_other", how="inner").dropna()
                    if table == "task" and j.empty:
                        continue  # one of the two is not reported on this task
                    d = (j[f"{col}_ref"] - j[f"{col}_other"]).to_numpy()
                    p, lo, hi = None, np.nan, np.nan
                    if len(d) >= MIN_PAIRS_FOR_TEST:
                        p = 1.0 if np.allclose(d, 0) else float(stats.wilcoxon(d).pvalue)
                    if len(d) >= 2:
                        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
                        lo, hi = float(d.mean() - half), float(d.mean() + half)
                    rows.append({"eval_cohort": cohort, "reference": ref, "other": other, "table": table,
                                 "metric": name, "n_pairs": len(d),
                                 "mean_diff": float(d.mean()) if len(d) else np.nan,
                                 "ci_lo": lo, "ci_hi": hi, "wilcoxon_p": p})
    return pd.DataFrame(rows, columns=["eval_cohort", "reference", "other", "table", "metric", "n_pairs",
                                       "mean_diff", "ci_lo", "ci_hi", "wilcoxon_p"])


def _fmt(mean, std, n, lo=np.nan, hi=np.nan) -> str:
    if not np.isfinite(mean):
        return "–"
    s = f"{mean:.3f} ± {std:.3f}" if np.isfinite(std) else f"{mean:.3f}"
    if np.isfinite(lo) and np.isfinite(hi):
        s += f" [{lo:.2f}, {hi:.2f}]"
    return s if n is None else s + f" (n={n})"


def _md(head: list[str], rows: list[list[str]]) -> list[str]:
    # Hand-written: pandas.to_markdown needs the optional `tabulate` package.
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def task_grid(table: pd.DataFrame, key: str) -> tuple[list[str], list[list[str]]]:
    """The paper layout of one metric: header and formatted rows (model, source, cohorts..., Overall)."""
    cohorts = sorted(c for c in table["eval_cohort"].unique() if c != "Overall")
    head = ["model", "source", *cohorts, "Overall"]
    rows = []
    for model, g in table.groupby("model", sort=True):
        g = g.set_index("eval_cohort")
        cells = [model, g["source"].iloc[0] or "–"]
        for c in [*cohorts, "Overall"]:
            if c not in g.index:
                cells.append("–")
                continue
            r = g.loc[c]
            cells.append(_fmt(r[f"{key}_mean"], r[f"{key}_std"], None if c == "Overall" else r[f"{key}_n"],
                              r[f"{key}_ci_lo"], r[f"{key}_ci_hi"]))
        rows.append(cells)
    return head, rows


TASK_NOTE = ("Cells: mean ± sample std (ddof=1) over seeds × folds [bootstrap 95 % CI over test patients, "
             "mean over runs] (n = runs). Overall: mean over cohorts (± std over cohorts). source: head = the model's own "
             "task head, probe = linear probe on its frozen embedding.")


TASK_KEYS = {"subtype": (("bacc", "balanced accuracy"), ("auroc", "AUROC")), "survival": (("cindex", "C-index"),)}


def _task_md(task: str, table: pd.DataFrame) -> list[str]:
    out = []
    for key, label in TASK_KEYS[task]:
        out.append(f"### {task.capitalize()}: {label}\n")
        out += (["No model is reported on this task.", ""] if table.empty else _md(*task_grid(table, key)) + [""])
    return out


def task_markdown(subtype: pd.DataFrame | None, survival: pd.DataFrame | None) -> str:
    out = (_task_md("subtype", subtype) if subtype is not None else []) + (
        _task_md("survival", survival) if survival is not None else [])
    return "\n".join(out + [TASK_NOTE, ""])


def markdown_table(summary: pd.DataFrame) -> str:
    head = ["model", "eval cohort", "subtype bal. acc", "subtype AUROC", "C-index"]
    rows = [[r["model"], r["eval_cohort"]] + [_fmt(r[f"{k}_mean"], r[f"{k}_std"], r[f"{k}_n"]) for k in METRICS]
            for _, r in summary.iterrows()]
    return "\n".join(_md(head, rows) + ["", "Mean ± sample std (ddof=1) over folds × seeds; n = runs with a value."])


def summary_markdown(summary: pd.DataFrame, subtype: pd.DataFrame, survival: pd.DataFrame,
                     common: str | None = None) -> str:
    out = "## Task tables\n\n" + task_markdown(subtype, survival)
    if common:
        out += "\n## Every model on the same test patients\n\n" + common
    return out + "\n## Linear probes of every embedding on every task\n\n" + markdown_table(summary) + "\n"


def summary_html(summary: pd.DataFrame, subtype: pd.DataFrame, survival: pd.DataFrame) -> str:
    """The task tables (and the probe table) as an HTML fragment for the report's front page."""

    def table(head, rows):
        th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f'<table class="modaltune-summary"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'

    parts = []
    for title, tab, key in (("Subtype: balanced accuracy", subtype, "bacc"),
                            ("Survival: C-index", survival, "cindex")):
        parts.append(f"<h3>{title}</h3>")
        parts.append(table(*task_grid(tab, key)) if not tab.empty else "<p>No model is reported on this task.</p>")
    parts.append(f"<p><small>{html.escape(TASK_NOTE)}</small></p>")
    head = ["model", "eval cohort", "subtype bal. acc", "subtype AUROC", "C-index"]
    rows = [[r["model"], r["eval_cohort"]] + [_fmt(r[f"{k}_mean"], r[f"{k}_std"], r[f"{k}_n"]) for k in METRICS]
            for _, r in summary.iterrows()]
    parts.append("<h3>Linear probes of every embedding</h3>" + table(head, rows))
    return "\n".join(parts) + "\n"


def wide_task_csv(table: pd.DataFrame) -> pd.DataFrame:
    """The task table in the paper layout with numeric columns: one row per model, {cohort}_{stat} columns."""
    if table.empty:
        return pd.DataFrame(columns=["model", "source"])
    stats = [c for c in table.columns if c.rsplit("_", 1)[-1] in {"n", "mean", "std", "lo", "hi"}
             and c not in {"n_runs"}]
    wide = table.pivot(index=["model", "source"], columns="eval_cohort", values=stats)
    cohorts = [c for c in sorted(table["eval_cohort"].unique()) if c != "Overall"] + ["Overall"]
    wide = wide.reindex(columns=pd.MultiIndex.from_product([stats, cohorts]))
    wide.columns = [f"{c}_{s}" for s, c in wide.columns]
    order = [f"{c}_{s}" for c in cohorts for s in stats]
    return wide[order].reset_index()


def _write_csv(df: pd.DataFrame, path: Path, sep: str = ",") -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep=sep, index=False)


def _write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_task_tables(df: pd.DataFrame, out_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """tables/subtype.{csv,md} and tables/survival.{csv,md} under ``out_dir``; returns the long tables."""
    out_dir = Path(out_dir)
    subtype, survival = task_table(df, "subtype"), task_table(df, "survival")
    _write_csv(wide_task_csv(subtype), out_dir / "tables" / "subtype.csv")
    _write_csv(wide_task_csv(survival), out_dir / "tables" / "survival.csv")
    _write_text(task_markdown(subtype, None), out_dir / "tables" / "subtype.md")
    _write_text(task_markdown(None, survival), out_dir / "tables" / "survival.md")
    return subtype, survival


def comparison_tables(metrics_files: list[str], out_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cross-cohort task tables (columns = every evaluation cohort + Overall) under ``out_dir``."""
    if not metrics_files:
        raise InputError("comparison tables: no metrics files given; run the evaluate rule first")
    df = load_metrics(metrics_files)
    check_paired(df)
    return write_task_tables(df, out_dir)


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


def qc_thumbnails(feature_inputs: list[str], thumbnails: list[str] | None = None) -> list[str]:
    """Tiling QC thumbnails: the given ones (per-slide tile rule) plus, for shard manifests among the
    feature inputs, the thumbnail the shard job wrote next to each tiles HDF5 it lists."""
    out = [str(t) for t in thumbnails or []]
    for p in feature_inputs:
        if str(p).endswith(".tsv"):
            out += [str(Path(t).with_suffix(".png")) for t in pd.read_csv(p, sep="\t")["tiles_h5"]]
    return [p for p in dict.fromkeys(out) if Path(p).is_file()]


def load_predictions(df: pd.DataFrame, prediction_files: list[str]) -> pd.DataFrame:
    """predictions.parquet (contract C2) of the runs in ``df``, matched by run folder; adds run columns."""
    by_dir = {str(Path(f).parent): f for f in prediction_files}
    parts = []
    for _, r in df.iterrows():
        f = by_dir.get(str(Path(r["file"]).parent))
        if f is None:
            continue
        try:
            p = pd.read_parquet(f)
        except (OSError, ValueError) as e:
            raise InputError(f"predictions {f}: cannot read parquet ({e}); rerun the evaluate rule for it") from e
        missing = {"patient_id", "partition", "label", "time", "event", "risk"} - set(p.columns)
        if missing:
            raise InputError(f"predictions {f}: missing column(s) {sorted(missing)}; rerun evaluate")
        p = p.assign(model_id=r["model_id"], seed=r["seed"], fold=r["fold"], eval_cohort=r["eval_cohort"],
                     subtype_reported=r["subtype_reported"], survival_reported=r["survival_reported"])
        parts.append(p)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def aggregate(metrics_files: list[str], out_dir, *, feature_files: list[str] | None = None,
              history_files: list[str] | None = None, prediction_files: list[str] | None = None,
              qc_images: list[str] | None = None) -> pd.DataFrame:
    """Write TABLE_FILES and PLOT_FILES (and, given feature files, SLIDE_FILES) under ``out_dir``;
    return the probe summary table.

    Raises ``InputError`` when two models' metrics for one (seed, fold, eval_cohort) list different, not
    nested, test patients. Nested sets (patients without slides kept for the models that read none) are
    paired on their intersection: ``tables/common.csv`` and the task rows of ``tables/paired.csv``.
    """
    out_dir = Path(out_dir)
    if not metrics_files:
        raise InputError("aggregate: no metrics files given; run the evaluate rule first")
    df = load_metrics(metrics_files)
    differs = check_paired(df)
    preds = load_predictions(df, list(prediction_files or []))
    common_runs = common_patient_runs(df, preds)
    summary = summarise(df)
    paired = paired_comparisons(with_common_task_metrics(df, common_runs) if differs else df)
    subtype, survival = write_task_tables(df, out_dir)
    common = common_table(common_runs)
    common_md = common_markdown(common, differs) if not common.empty else None
    _write_csv(summary, out_dir / "tables" / "summary.csv")
    _write_text(summary_markdown(summary, subtype, survival, common_md), out_dir / "tables" / "summary.md")
    _write_text(summary_html(summary, subtype, survival), out_dir / "tables" / "summary.html")
    _write_csv(paired, out_dir / "tables" / "paired.csv")
    _write_csv(common, out_dir / "tables" / "common.csv")
    plots.plot_summary(summary, out_dir / "plots" / "summary.png")
    plots.plot_training_curves(list(history_files or []), out_dir / "plots" / "curves.png")
    plots.plot_kaplan_meier(preds, out_dir / "plots" / "km.png")
    plots.plot_roc(preds, out_dir / "plots" / "roc.png")
    plots.plot_confusion(preds, out_dir / "plots" / "confusion.png")
    task_pairs = paired[paired["table"] == "task"]
    plots.plot_forest(task_pairs[task_pairs["metric"] == "subtype_bacc"], out_dir / "plots" / "forest_subtype.png",
                      "balanced accuracy")
    plots.plot_forest(task_pairs[task_pairs["metric"] == "survival_cindex"],
                      out_dir / "plots" / "forest_survival.png", "C-index")
    plots.plot_tiling_qc(list(qc_images or []), out_dir / "plots" / "tiling_qc.png")
    if feature_files is not None:
        fails, speed = slide_tables(feature_files)
        _write_csv(fails, out_dir / "failures.tsv", sep="\t")
        _write_csv(speed, out_dir / "throughput.tsv", sep="\t")
    log.info("aggregated %d runs of %d models", len(df), df["model_id"].nunique())
    return summary


__all__ = ["PLOT_FILES", "SLIDE_FILES", "TABLE_FILES", "aggregate", "check_paired", "common_patient_runs",
           "common_table", "comparison_tables", "with_common_task_metrics",
           "load_metrics", "paired_comparisons", "qc_thumbnails", "slide_tables", "summarise", "task_block", "task_table"]
