"""Synthetic run folders written exactly per contracts C1 (metrics.json v2) and C2 (predictions.parquet).

``write_cohort`` makes runs/{model}/seed_s/fold_k/{metrics.json, predictions.parquet, history.parquet}
for a small cohort: risk and class probabilities carry planted signal so the plots have something to show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

# model -> (arch, objective); reported tasks follow contract C1
MODELS = {"modaltune": ("modaltune", "text_kl"), "abmil": ("abmil", "classification"),
          "snn": ("snn", "survival")}
TASKS = {"text_kl": ("subtype", "survival"), "classification": ("subtype",), "survival": ("survival",),
         "none": ("subtype", "survival")}


def patients(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = np.arange(n) % 2
    hazard = 0.8 * label + rng.normal(0, 0.3, n)
    time = rng.exponential(30 * np.exp(-hazard))
    event = (rng.random(n) < 0.8).astype(float)
    return pd.DataFrame({"patient_id": [f"P{i:03d}" for i in range(n)], "label": label, "time": time,
                         "event": event, "hazard": hazard})


def write_run(run_dir: Path, model: str, seed: int, fold: int, cases: pd.DataFrame, part: np.ndarray,
              cohort: str, skill: float, arch=None, objective=None, v1: bool = False) -> Path:
    arch_, obj_ = MODELS.get(model, (model, "text_kl"))
    arch, objective = arch or arch_, objective or obj_
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1000 * seed + 10 * fold + len(model))
    n = len(cases)
    test = part == "test"
    # class probabilities and risk with a planted signal of strength ``skill``
    logit = skill * (2 * cases["label"].to_numpy() - 1) + rng.normal(0, 1, n)
    p1 = 1 / (1 + np.exp(-logit))
    risk = np.exp(skill * cases["hazard"].to_numpy() + rng.normal(0, 0.5, n))
    tasks = TASKS[objective]
    m = {"model": model, "arch": arch, "objective": objective, "seed": seed, "fold": fold,
         "train_cohort": cohort, "eval_cohort": cohort, "ood": False,
         "n": {p: int((part == p).sum()) for p in ("train", "val", "test")},
         "subtype_bacc": 0.6 + 0.1 * skill, "subtype_auroc": 0.65 + 0.1 * skill,
         "survival_cindex": 0.55 + 0.1 * skill, "subtype_token": "embedding", "survival_token": "embedding",
         "tokens": {}, "per_site": {}, "head": None, "cox": {}, "best_epoch": 3, "dropped_without_slides": 0,
         "test_patients": sorted(cases.loc[test, "patient_id"])}
    if not v1:
        src_sub = "head" if objective == "classification" else "probe"
        src_surv = "head" if objective == "survival" else "probe"
        sub_on, surv_on = "subtype" in tasks, "survival" in tasks
        b = 0.7 + 0.05 * skill + 0.01 * seed
        c = 0.6 + 0.05 * skill + 0.01 * fold
        m.update({
            "schema_version": 2, "task": "both" if len(tasks) == 2 else tasks[0],
            "subtype": {"reported": sub_on, "source": src_sub if sub_on else None, "bacc": b, "auroc": b + 0.05,
                        "bacc_ci95": [b - 0.1, b + 0.1], "auroc_ci95": [b - 0.05, b + 0.15],
                        "n_test": int(test.sum()), "n_classes": 2},
            "survival": {"reported": surv_on, "source": src_surv if surv_on else None, "cindex": c,
                         "cindex_ci95": [c - 0.08, c + 0.08], "n_test": int(test.sum()),
                         "n_events": int(cases.loc[test, "event"].sum())},
            "probe_ci95": {"subtype_bacc": [0.5, 0.9], "subtype_auroc": None, "survival_cindex": [0.4, 0.8]},
            "selection": {"criterion": "val_bacc", "best_epoch": 3, "best_score": 0.7}, "notes": [],
        })
        preds = pd.DataFrame({
            "patient_id": cases["patient_id"], "partition": part, "site": cohort, "label": cases["label"],
            "time": cases["time"], "event": cases["event"],
            "subtype_pred": (p1 > 0.5).astype(int) if sub_on else -1,
            "subtype_prob_0": 1 - p1 if sub_on else np.nan, "subtype_prob_1": p1 if sub_on else np.nan,
            "risk": risk if surv_on else np.nan,
            "subtype_source": m["subtype"]["source"], "survival_source": m["survival"]["source"]})
        preds.to_parquet(run_dir / "predictions.parquet", index=False)
    (run_dir / "metrics.json").write_text(json.dumps(m))
    epochs = np.arange(6)
    pd.DataFrame({"epoch": epochs, "lr": 1e-3, "train_loss": 1 / (1 + epochs) + 0.01 * fold,
                  "val_loss": 1.2 / (1 + epochs) + 0.02 * fold, "val_bacc": 0.5 + 0.05 * epochs * skill,
                  "val_cindex": 0.5 + 0.03 * epochs, "seconds": 1.0}).to_parquet(run_dir / "history.parquet")
    return run_dir / "metrics.json"


def write_cohort(root: Path, cohort: str = "BRCA", n: int = 40, folds: int = 2, seeds=(0, 1),
                 models=("modaltune", "abmil", "snn"), v1: bool = False) -> list[str]:
    """Runs of ``models`` on one cohort; returns the metrics files."""
    cases = patients(n)
    files = []
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(n)
        for fold in range(folds):
            part = np.array(["train"] * n, dtype=object)
            test_idx = order[fold::folds]
            part[test_idx] = "test"
            part[order[(fold + 1) % folds::folds][:3]] = "val"
            for k, model in enumerate(models):
                run = root / cohort / "runs" / model / f"seed_{seed}" / f"fold_{fold}"
                files.append(str(write_run(run, model, seed, fold, cases, part, cohort, skill=2.0 - 0.5 * k,
                                           v1=v1)))
    return files
