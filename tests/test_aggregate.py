"""aggregate: mean ± sample std over folds x seeds, paired comparisons, paired-patients check, slide tables."""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from modaltune.aggregate import aggregate
from modaltune.errors import InputError


def _metrics(path, model, arch, seed, fold, bacc, cidx, test=("A", "B", "C"), cohort="BRCA", train=None):
    m = {"model": model, "arch": arch, "objective": "text_kl", "seed": seed, "fold": fold,
         "train_cohort": train or cohort,
         "eval_cohort": cohort, "n": {"train": 10, "val": 2, "test": len(test)}, "subtype_bacc": bacc,
         "subtype_auroc": None, "survival_cindex": cidx, "tokens": {}, "per_site": {}, "head": None,
         "cox": {"converged": cidx is not None, "penalizer": 0.1, "error": None}, "test_patients": list(test)}
    path.write_text(json.dumps(m))
    return str(path)


def _runs(tmp_path, n_seeds=5):
    files = []
    for s in range(n_seeds):
        files.append(_metrics(tmp_path / f"mt{s}.json", "modaltune", "modaltune", s, 0, 0.8 + 0.01 * s, 0.7))
        files.append(_metrics(tmp_path / f"ab{s}.json", "abmil", "abmil", s, 0, 0.7 + 0.02 * s,
                              None if s == 0 else 0.6))
    return files


def test_summary_mean_std_and_tables(tmp_path):
    summary = aggregate(_runs(tmp_path), tmp_path / "out")
    mt = summary.set_index("model").loc["modaltune"]
    vals = 0.8 + 0.01 * np.arange(5)
    assert mt["subtype_bacc_mean"] == pytest.approx(vals.mean())
    assert mt["subtype_bacc_std"] == pytest.approx(vals.std(ddof=1))  # sample std, not population
    assert mt["n_runs"] == 5
    ab = summary.set_index("model").loc["abmil"]
    assert ab["survival_cindex_n"] == 4  # a null C-index is left out, never counted as 0
    assert ab["survival_cindex_mean"] == pytest.approx(0.6)
    assert (tmp_path / "out/tables/summary.csv").exists() and (tmp_path / "out/plots/summary.png").exists()
    md = (tmp_path / "out/tables/summary.md").read_text()
    assert "| modaltune | BRCA | 0.820 ± 0.016 (n=5)" in md
    # schema-1 files: the task tables lead, built from the objective (text_kl -> both tasks, probe values)
    assert md.startswith("## Task tables") and "| modaltune | probe | 0.820 ± 0.016 (n=5) | 0.820 |" in md
    paired = pd.read_csv(tmp_path / "out/tables/paired.csv")
    paired = paired[paired["table"] == "probe"]  # the headline probe metrics of every model
    row = paired[(paired.other == "abmil") & (paired.metric == "subtype_bacc")].iloc[0]
    assert row["n_pairs"] == 5
    assert row["mean_diff"] == pytest.approx(np.mean((0.8 + 0.01 * np.arange(5)) - (0.7 + 0.02 * np.arange(5))))
    assert 0 < row["wilcoxon_p"] <= 1
    assert row["ci_lo"] < row["mean_diff"] < row["ci_hi"]
    row_c = paired[(paired.other == "abmil") & (paired.metric == "survival_cindex")].iloc[0]
    assert row_c["n_pairs"] == 4 and pd.isna(row_c["wilcoxon_p"])  # < 5 pairs: no test


def test_unpaired_test_patients_is_an_error(tmp_path):
    files = _runs(tmp_path, 2)
    files.append(_metrics(tmp_path / "bad.json", "transmil", "transmil", 0, 0, 0.5, 0.5, test=("A", "B", "D")))
    with pytest.raises(InputError, match="different patients"):
        aggregate(files, tmp_path / "out")


def test_failures_and_throughput_from_feature_attrs(tmp_path):
    ok, bad = tmp_path / "S1.h5", tmp_path / "S2.h5"
    with h5py.File(ok, "w") as h5:
        h5["features"] = np.zeros((7, 4), np.float32)
        h5.attrs.update({"status": "ok", "error": "", "tiles_per_s": 123.0, "wall_s": 2.0, "encoder": "tiny"})
    with h5py.File(bad, "w") as h5:
        h5["features"] = np.zeros((0, 4), np.float32)
        h5.attrs.update({"status": "failed", "error": "no tissue found", "tiles_per_s": 0.0})
    hist = tmp_path / "runs/modaltune/seed_0/fold_0/history.parquet"
    hist.parent.mkdir(parents=True)
    pd.DataFrame({"epoch": [0, 1], "val_loss": [1.0, 0.5], "val_bacc": [0.5, 0.7]}).to_parquet(hist)
    aggregate(_runs(tmp_path, 1), tmp_path / "out", feature_files=[str(ok), str(bad)], history_files=[str(hist)])
    fails = pd.read_csv(tmp_path / "out/failures.tsv", sep="\t")
    assert fails["slide_id"].tolist() == ["S2"] and fails["error"].iloc[0] == "no tissue found"
    thr = pd.read_csv(tmp_path / "out/throughput.tsv", sep="\t")
    assert thr["slide_id"].tolist() == ["S1"] and thr["n_tiles"].iloc[0] == 7 and thr["tiles_per_s"].iloc[0] == 123
    assert (tmp_path / "out/plots/curves.png").stat().st_size > 0


def test_aggregate_does_not_import_torch():
    import subprocess

    code = "import sys, modaltune.aggregate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ood_rows_kept_apart_by_training_cohort(tmp_path):
    files = [_metrics(tmp_path / f"{t}{s}.json", "modaltune", "modaltune", s, 0, 0.6 + 0.1 * (t == "PAN"), 0.6,
                      cohort="BLCA", train=t) for t in ("BRCA", "PAN") for s in range(2)]
    summary = aggregate(files, tmp_path / "out").set_index("model")
    assert set(summary.index) == {"modaltune (BRCA)", "modaltune (PAN)"}
    assert summary.loc["modaltune (PAN)", "subtype_bacc_mean"] == pytest.approx(0.7)


def _run_with_predictions(root, model, objective, seed, rows):
    """metrics.json (schema 1) + predictions.parquet of one run; rows = (patient, label, pred, time, event, risk)."""
    run = root / model / f"seed_{seed}" / "fold_0"
    run.mkdir(parents=True)
    test = [r[0] for r in rows]
    m = {"model": model, "arch": model, "objective": objective, "seed": seed, "fold": 0, "train_cohort": "BRCA",
         "eval_cohort": "BRCA", "n": {"train": 10, "val": 2, "test": len(test)}, "subtype_bacc": 0.5,
         "subtype_auroc": None, "survival_cindex": 0.5, "tokens": {}, "per_site": {}, "head": None,
         "cox": {"converged": True, "penalizer": 0.1, "error": None}, "test_patients": test}
    (run / "metrics.json").write_text(json.dumps(m))
    pid, y, pred, t, e, risk = zip(*rows, strict=True)
    pd.DataFrame({"patient_id": pid, "partition": "test", "site": "BRCA", "label": y, "time": t, "event": e,
                  "subtype_pred": pred, "subtype_prob_0": [1.0 - p for p in pred], "subtype_prob_1": list(map(float, pred)),
                  "risk": risk}).to_parquet(run / "predictions.parquet")
    return str(run / "metrics.json"), str(run / "predictions.parquet")


def test_nested_test_sets_are_paired_on_the_common_patients(tmp_path):
    """Patients without slides kept for an RNA-only model: its test set is a superset. The tables pair the
    models on the shared patients and show both counts; a wrong call on the extra patient does not count."""
    shared = [("A", 0, 0, 10.0, 1, 3.0), ("B", 1, 1, 20.0, 1, 2.0), ("C", 1, 1, 30.0, 0, 1.0), ("D", 0, 0, 40.0, 0, 0.5)]
    extra = ("E", 0, 1, 5.0, 1, 0.0)  # RNA-only model: wrong class and the lowest risk for the earliest death
    metrics, preds = [], []
    for s in range(5):
        for model, objective, rows in (("modaltune", "text_kl", shared), ("snn", "classification", shared + [extra])):
            f, p = _run_with_predictions(tmp_path / "runs", model, objective, s, rows)
            metrics.append(f)
            preds.append(p)
    aggregate(metrics, tmp_path / "out", prediction_files=preds)  # nested sets: no error
    common = pd.read_csv(tmp_path / "out/tables/common.csv").set_index("model")
    assert common.loc["snn", "n_test_mean"] == 5 and common.loc["modaltune", "n_test_mean"] == 4
    assert (common["n_common_mean"] == 4).all()
    assert common.loc["snn", "subtype_bacc_mean"] == pytest.approx(1.0)  # E is not among the common patients
    assert common.loc["modaltune", "survival_cindex_mean"] == pytest.approx(1.0)
    assert np.isnan(common.loc["snn", "survival_cindex_mean"])  # a classification model is not reported there
    paired = pd.read_csv(tmp_path / "out/tables/paired.csv")
    task = paired[(paired["table"] == "task") & (paired["metric"] == "subtype_bacc")].iloc[0]
    assert task["other"] == "snn" and task["mean_diff"] == pytest.approx(0.0)  # both perfect on A-D
    md = (tmp_path / "out/tables/summary.md").read_text()
    assert "## Every model on the same test patients" in md and "Some models were tested on more patients" in md
