"""The evaluator: metrics schema, probes fitted on TRAIN only, Cox failures recorded, OOD refits, pan-cancer."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

try:  # tests/ is a package in this repo; fall back to rootdir-relative imports if it stops being one
    from tests.test_training import _registry_without_missing_modules, make_cohort, prepare_env, run_args  # noqa: F401
except ImportError:
    from test_training import _registry_without_missing_modules, make_cohort, prepare_env, run_args  # noqa: F401

from modaltune import evaluation


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    c = make_cohort(root)
    from modaltune.training import train_run

    with pytest.MonkeyPatch.context() as mp:
        prepare_env(mp)
        train_run(**run_args(c, root / "run", train_cfg={"epochs": 1}))
    return c, root / "run"


def _eval(c, run_dir, out, **kw):
    return evaluation.evaluate_run(run_dir=run_dir, cases_path=c["cases_path"], splits_path=c["splits_path"], fold=0,
                                   pathways_path=c["pathways_path"], feature_files=c["feature_files"],
                                   sheet=c["sheet"], out_metrics=out / "metrics.json",
                                   out_embeddings=out / "embeddings.npz", **kw)


def test_metrics_schema_and_embeddings(trained, tmp_path):
    c, run = trained
    m = _eval(c, run, tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["subtype_bacc"] == m["subtype_bacc"]
    for key in ("model", "arch", "objective", "seed", "fold", "train_cohort", "eval_cohort", "n", "subtype_bacc",
                "subtype_auroc", "survival_cindex", "tokens", "per_site", "head", "cox", "test_patients"):
        assert key in on_disk, key
    assert set(m["tokens"]) == {"general", "diagnosis", "survival"}
    assert m["subtype_bacc"] == m["tokens"]["diagnosis"]["test_bacc"]  # headline = Diagnosis token
    assert m["survival_cindex"] == m["tokens"]["survival"]["test_cindex"]
    assert m["train_cohort"] == m["eval_cohort"] == "COH" and not m["ood"]
    split = pd.read_parquet(c["splits_path"])
    test_ids = sorted(set(split.loc[split.partition == "test", "patient_id"]) - {"P002"})  # P002: no usable slide
    assert m["test_patients"] == test_ids
    npz = np.load(tmp_path / "embeddings.npz")
    assert npz["embedding"].shape[:2] == (len(npz["patient_id"]), 3)
    assert set(npz["partition"]) == {"train", "val", "test"}
    assert m["subtype_bacc"] > 0.6  # planted signal survives a 1-epoch run


def test_probes_never_see_test_labels(trained, tmp_path, monkeypatch):
    c, run = trained
    seen = []
    real_lr, real_cox = evaluation.fit_lr_probe, evaluation.fit_cox_probe

    def spy_lr(x, y, **kw):
        seen.append(("lr", len(x)))
        return real_lr(x, y, **kw)

    def spy_cox(x, t, e, **kw):
        seen.append(("cox", len(x)))
        return real_cox(x, t, e, **kw)

    monkeypatch.setattr(evaluation, "fit_lr_probe", spy_lr)
    monkeypatch.setattr(evaluation, "fit_cox_probe", spy_cox)
    base = _eval(c, run, tmp_path / "a")
    n_train = base["n"]["train"]
    assert seen and all(n == n_train for _, n in seen)  # every fit sees exactly the training rows

    # Corrupt every test label and survival time: the probes (scored on val) must not change at all.
    cases = pd.read_parquet(c["cases_path"])
    is_test = cases["patient_id"].isin(base["test_patients"])
    cases.loc[is_test, "label"] = 1 - cases.loc[is_test, "label"].clip(lower=0)
    cases.loc[is_test, "survival_months"] = cases.loc[is_test, "survival_months"][::-1].to_numpy() * 3
    cases.loc[is_test, "event"] = 1 - cases.loc[is_test, "event"]
    bad = tmp_path / "COH" / "clinical" / "cases.parquet"
    bad.parent.mkdir(parents=True)
    cases.to_parquet(bad, index=False)
    other = _eval({**c, "cases_path": str(bad)}, run, tmp_path / "b")
    for tok in base["tokens"]:
        for k in ("val_bacc", "val_auroc", "val_cindex"):
            assert base["tokens"][tok][k] == other["tokens"][tok][k], (tok, k)
    assert base["tokens"]["diagnosis"]["test_bacc"] != other["tokens"]["diagnosis"]["test_bacc"]


def test_cox_non_convergence_is_recorded_not_zeroed(trained, tmp_path, monkeypatch):
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    def boom(self, *a, **k):
        raise ConvergenceError("Convergence halted due to matrix inversion problems.")

    monkeypatch.setattr(CoxPHFitter, "fit", boom)
    c, run = trained
    m = _eval(c, run, tmp_path)
    assert m["survival_cindex"] is None
    assert m["cox"]["converged"] is False and "ConvergenceError" in m["cox"]["error"]
    assert m["cox"]["penalizer"] == pytest.approx(10.0)  # 0.1 -> 1 -> 10 retries before giving up
    assert m["subtype_bacc"] is not None


def test_cox_probe_fits_and_ranks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4))
    t = rng.exponential(np.exp(-1.5 * x[:, 0]))
    e = (rng.random(80) < 0.8).astype(float)
    p = evaluation.fit_cox_probe(x[:60], t[:60], e[:60])
    assert p["converged"]
    assert evaluation.cox_cindex(p, x[60:], t[60:], e[60:]) > 0.65
    pca = evaluation.fit_cox_probe(x[:60], t[:60], e[:60], pca="auto")
    assert pca["pca"] is None or pca["pca"].n_components_ <= max(1, int(e[:60].sum()) // 5)


def test_ood_refits_on_target_train_partition(trained, tmp_path, monkeypatch):
    from modaltune import gene_scaler

    c, run = trained
    tgt = make_cohort(tmp_path, n_patients=20, seed=5, cohort="OTHER", prefix="Q")
    fitted = []
    real_fit = gene_scaler.GeneScaler.fit

    def spy(self, df):
        fitted.append(sorted(df.index))
        return real_fit(self, df)

    monkeypatch.setattr(gene_scaler.GeneScaler, "fit", spy)
    m = _eval(tgt, run, tmp_path / "ood")
    split = pd.read_parquet(tgt["splits_path"])
    genes = pd.read_parquet(tgt["pathways_path"])
    train_rna = sorted(p for p in split.loc[split.partition == "train", "patient_id"] if p in genes.index)
    assert fitted == [train_rna]  # refitted once, on the target cohort's TRAIN patients only
    assert m["ood"] and m["eval_cohort"] == "OTHER" and m["train_cohort"] == "COH"
    assert all(p.startswith("Q") for p in m["test_patients"])
    assert m["head"] is None
    train_ids = set(split.loc[split.partition == "train", "patient_id"]) - {"Q002"}  # Q002: no usable slide
    assert m["n"]["train"] == len(train_ids)


def test_pan_cancer_probes_per_site(tmp_path):
    from modaltune.training import train_run

    c = make_cohort(tmp_path, n_patients=36, sites=["S1", "S2"], cohort="PAN")
    with pytest.MonkeyPatch.context() as mp:
        prepare_env(mp)
        train_run(**run_args(c, tmp_path / "run", model_cfg={"arch": "tiny_test", "objective": "classification"},
                             train_cfg={"epochs": 1}))
        m = _eval(c, tmp_path / "run", tmp_path)
    assert set(m["per_site"]) == {"S1", "S2"}
    vals = [v["subtype_bacc"] for v in m["per_site"].values() if v["subtype_bacc"] is not None]
    assert m["subtype_bacc"] == pytest.approx(np.mean(vals))
    assert m["head"] is not None and "bacc" in m["head"]  # supervised baseline: its own head reported too
    assert set(m["tokens"]) == {"embedding"}


def test_cox_probe_ignores_constant_embedding_dims():
    """Dead ReLU units give constant dims; lifelines' std scaling turned them into NaN fits."""
    from modaltune.evaluation import cox_cindex, fit_cox_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 16))
    x[:, 4:10] = 0.0
    t = rng.exponential(10, 30)
    e = (rng.random(30) < 0.6).astype(float)
    probe = fit_cox_probe(x, t, e, penalizer=0.1)
    assert probe["converged"], probe["error"]
    assert probe["keep"].sum() == 10
    c = cox_cindex(probe, x, t, e)
    assert c is not None and 0.0 <= c <= 1.0
