"""The evaluator: metrics schema, probes fitted on TRAIN only, Cox failures recorded, OOD refits, pan-cancer."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from modaltune import evaluation, probes
from tests.training_helpers import make_cohort, prepare_env, run_args


@pytest.fixture(autouse=True)
def _registry_without_missing_modules(monkeypatch):
    prepare_env(monkeypatch)


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
                                   out_embeddings=out / "embeddings.npz", out_predictions=out / "predictions.parquet",
                                   eval_cohort=kw.pop("eval_cohort", c["cohort"]), **kw)


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
    real_lr, real_cox = probes.fit_lr_probe, probes.fit_cox_probe

    def spy_lr(x, y, **kw):
        seen.append(("lr", len(x)))
        return real_lr(x, y, **kw)

    def spy_cox(x, t, e, **kw):
        seen.append(("cox", len(x)))
        return real_cox(x, t, e, **kw)

    monkeypatch.setattr(probes, "fit_lr_probe", spy_lr)
    monkeypatch.setattr(probes, "fit_cox_probe", spy_cox)
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
    p = probes.fit_cox_probe(x[:60], t[:60], e[:60])
    assert p["converged"]
    assert probes.cox_cindex(p, x[60:], t[60:], e[60:]) > 0.65
    pca = probes.fit_cox_probe(x[:60], t[:60], e[:60], pca="auto")
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
    from modaltune.probes import cox_cindex, fit_cox_probe

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


# ------------------------------------------------------------------- C1 key set, C2 predictions, switches
def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if k in ("subtype", "survival", "selection", "probe_ci95", "n") and isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


@pytest.fixture(scope="module")
def four_objectives(tmp_path_factory):
    from modaltune.training import train_run

    root = tmp_path_factory.mktemp("objectives")
    c = make_cohort(root, n_patients=30)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        prepare_env(mp)
        for obj in ("text_kl", "classification", "survival", "none"):
            train_run(**run_args(c, root / obj, model_cfg={"arch": "tiny_test", "objective": obj},
                                 train_cfg={"epochs": 2}))
            out[obj] = _eval(c, root / obj, root / obj / "eval")
    return c, root, out


def test_one_metrics_key_set_for_every_objective(four_objectives):
    _, root, out = four_objectives
    on_disk = {o: json.loads((root / o / "eval" / "metrics.json").read_text()) for o in out}
    key_sets = {o: frozenset(_keys(m)) for o, m in on_disk.items()}
    assert len(set(key_sets.values())) == 1, {o: sorted(k ^ key_sets["text_kl"]) for o, k in key_sets.items()}
    m = on_disk
    assert m["classification"]["task"] == "subtype" and m["classification"]["subtype"]["source"] == "head"
    assert m["classification"]["survival"]["reported"] is False and m["classification"]["survival"]["cindex"] is None
    assert m["survival"]["task"] == "survival" and m["survival"]["survival"]["source"] == "head"
    assert m["survival"]["subtype"]["reported"] is False
    for o in ("text_kl", "none"):
        assert m[o]["task"] == "both" and m[o]["subtype"]["source"] == m[o]["survival"]["source"] == "probe"
        assert m[o]["subtype"]["bacc"] == pytest.approx(m[o]["subtype_bacc"])  # probe headline = task value
    assert m["classification"]["subtype"]["bacc"] == m["classification"]["head"]["bacc"]
    assert m["survival"]["selection"]["criterion"] == "val_head_cindex"
    assert m["none"]["selection"]["criterion"] is None and m["none"]["selection"]["best_epoch"] is None
    assert all(v["schema_version"] == 2 for v in m.values())


def test_predictions_parquet_per_contract(four_objectives):
    c, root, out = four_objectives
    for obj, m in out.items():
        p = pd.read_parquet(root / obj / "eval" / "predictions.parquet")
        k = m["subtype"]["n_classes"]
        assert list(p.columns) == ["patient_id", "partition", "site", "label", "time", "event", "subtype_pred",
                                   *[f"subtype_prob_{i}" for i in range(k)], "risk", "subtype_source",
                                   "survival_source"]
        assert sorted(p.loc[p.partition == "test", "patient_id"]) == m["test_patients"]
        assert set(p["subtype_source"].dropna()) <= {m["subtype"]["source"]}
        if m["subtype"]["source"] is not None:
            probs = p[[f"subtype_prob_{i}" for i in range(k)]].to_numpy()
            np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
            np.testing.assert_array_equal(p["subtype_pred"], probs.argmax(1))
        else:
            assert (p["subtype_pred"] == -1).all()
        if m["survival"]["source"] is not None:
            assert p["risk"].notna().all()
            from modaltune.probes import harrell_c

            t = p[p.partition == "test"]
            c_test = harrell_c(t["time"].to_numpy(), t["risk"].to_numpy(), t["event"].to_numpy())
            assert c_test == pytest.approx(m["survival"]["cindex"])  # risk: higher = worse
        else:
            assert p["risk"].isna().all()


def test_bootstrap_cis_seeded_and_around_the_estimate(four_objectives, tmp_path):
    c, root, out = four_objectives
    m = out["text_kl"]
    for block, key in (("subtype", "bacc"), ("subtype", "auroc"), ("survival", "cindex")):
        lo, hi = m[block][f"{key}_ci95"]
        assert lo <= m[block][key] <= hi
    assert m["probe_ci95"]["subtype_bacc"] == m["subtype"]["bacc_ci95"]  # text_kl: the task source is the probe
    again = _eval(c, root / "text_kl", tmp_path / "again")
    assert again["subtype"]["bacc_ci95"] == m["subtype"]["bacc_ci95"]  # seeded
    off = _eval(c, root / "text_kl", tmp_path / "off", probe_cfg={"bootstrap": 0})
    assert off["subtype"]["bacc_ci95"] is None and off["subtype"]["bacc"] == m["subtype"]["bacc"]


def test_weighted_bootstrap_metrics_equal_the_libraries_at_unit_weights():
    from lifelines.utils import concordance_index
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(3)
    n = 50
    t, e = np.round(rng.exponential(10, n)), (rng.random(n) < 0.6).astype(float)  # tied times included
    r = np.round(rng.normal(size=n), 1)
    y, pred = rng.integers(0, 3, n), rng.integers(0, 3, n)
    prob = rng.dirichlet([1, 1, 1], n)
    w = np.ones((1, n))
    assert probes.weighted_cindex(w, t, r, e)[0] == pytest.approx(concordance_index(t, -r, e))
    assert probes.weighted_bacc(w, y, pred)[0] == pytest.approx(balanced_accuracy_score(y, pred))
    assert probes.weighted_auroc(w, y, prob, [0, 1, 2])[0] == pytest.approx(
        roc_auc_score(y, prob, multi_class="ovr", labels=[0, 1, 2]))
    # a resample = multiplicities: equal to the metric on the explicitly repeated rows
    idx = rng.integers(0, n, n)
    wb = np.bincount(idx, minlength=n)[None].astype(float)
    assert probes.weighted_bacc(wb, y, pred)[0] == pytest.approx(balanced_accuracy_score(y[idx], pred[idx]))


def test_lr_probe_paper_mode_is_liblinear_one_vs_rest_on_raw_embeddings():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 5.0, size=(90, 6))
    y = np.repeat([0, 1, 2], 30)
    x[:, 0] += 4 * y
    paper = probes.fit_lr_probe(x, y, mode="paper")
    assert len(paper.estimators_) == 3  # one binary problem per class = one-vs-rest
    for k in range(3):
        est = paper.estimators_[k]
        assert isinstance(est, LogisticRegression)  # no scaler in front: raw embeddings
        assert est.solver == "liblinear" and est.max_iter == 200
        one = LogisticRegression(solver="liblinear", max_iter=200, random_state=0).fit(x, (y == k).astype(int))
        np.testing.assert_allclose(est.coef_[0], one.coef_[0], rtol=1e-6)
    np.testing.assert_allclose(paper.predict_proba(x).sum(1), 1.0)
    binary = probes.fit_lr_probe(x[y < 2], y[y < 2], mode="paper")
    assert isinstance(binary, LogisticRegression) and binary.solver == "liblinear"
    standard = probes.fit_lr_probe(x, y)
    assert standard.steps[0][0] == "standardscaler"
    from modaltune.errors import InputError

    with pytest.raises(InputError, match="probes.lr"):
        probes.fit_lr_probe(x, y, mode="ovr")


def test_cox_convergence_warning_triggers_the_retry():
    """Monotone likelihood (a covariate that separates early from late deaths): lifelines only warns."""
    rng = np.random.default_rng(0)
    n = 30
    t = np.arange(1, n + 1, dtype=float)
    x = np.stack([(t < 15).astype(float), rng.normal(size=n)], 1)
    e = np.ones(n)
    res = probes.fit_cox_probe(x, t, e, penalizer=0.0, pca=None)
    first, second = res["attempts"][0], res["attempts"][1]
    assert first["penalizer"] == 0.0 and first["error"].startswith("ConvergenceWarning")
    assert second == {"penalizer": 0.1, "error": None}
    assert res["converged"] and res["penalizer"] == 0.1 and res["error"] is None
    rec = probes.cox_record(res)
    assert rec["attempts"] == res["attempts"] and rec["converged"]


def test_cox_pca_setting(monkeypatch):
    from sklearn.decomposition import PCA

    from modaltune.errors import InputError

    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 20))
    t = rng.exponential(np.exp(-x[:, 0]))
    e = (rng.random(60) < 0.5).astype(float)
    fitted = []
    real_fit = PCA.fit

    def spy(self, z, *a, **k):
        fitted.append(len(z))
        return real_fit(self, z, *a, **k)

    monkeypatch.setattr(PCA, "fit", spy)
    assert probes.fit_cox_probe(x[:40], t[:40], e[:40], pca=None)["n_components"] == 20
    assert probes.fit_cox_probe(x[:40], t[:40], e[:40], pca=3)["n_components"] == 3
    auto = probes.fit_cox_probe(x[:40], t[:40], e[:40], pca="auto")
    assert auto["n_components"] == max(1, int(e[:40].sum()) // 5)
    assert fitted == [40, 40]  # PCA fitted on the training rows only
    assert probes.PROBE_DEFAULTS["cox_pca"] == "auto"
    with pytest.raises(InputError, match="cox_pca"):
        probes.fit_cox_probe(x[:40], t[:40], e[:40], pca="half")


def test_probe_defaults_equal_schema_defaults():
    from pathlib import Path

    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "config" / "schemas" / "config.schema.yaml").read_text())
    props = schema["properties"]["probes"]["properties"]
    assert set(props) == set(probes.PROBE_DEFAULTS)
    assert {k: v["default"] for k, v in props.items()} == probes.PROBE_DEFAULTS


def test_same_config_and_seed_give_identical_metrics_json(tmp_path):
    from modaltune.training import train_run

    c = make_cohort(tmp_path, n_patients=20)
    texts = []
    for run in ("a", "b"):
        with pytest.MonkeyPatch.context() as mp:
            prepare_env(mp)
            train_run(**run_args(c, tmp_path / run, model_cfg={"arch": "tiny_test", "objective": "survival"},
                                 train_cfg={"epochs": 2}))
        _eval(c, tmp_path / run, tmp_path / run / "eval")
        texts.append((tmp_path / run / "eval" / "metrics.json").read_text())
    assert texts[0] == texts[1]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "eval" / "predictions.parquet"),
                                  pd.read_parquet(tmp_path / "b" / "eval" / "predictions.parquet"))


def test_require_rna_drops_the_same_patients_in_training_and_evaluation(tmp_path):
    from modaltune.training import train_run

    c = make_cohort(tmp_path, n_patients=20)
    no_rna = c["ids"][-1]
    out = {}
    for flag in (False, True):
        run = tmp_path / f"rna_{flag}"
        with pytest.MonkeyPatch.context() as mp:
            prepare_env(mp)
            train_run(**run_args(c, run, model_cfg={"arch": "tiny_test", "objective": "survival"},
                                 train_cfg={"epochs": 1, "require_rna": flag}))
        out[flag] = _eval(c, run, run / "eval")
    split = pd.read_parquet(c["splits_path"])
    part = split.set_index("patient_id").loc[no_rna, "partition"]
    assert out[True]["n"][part] == out[False]["n"][part] - 1
    for p in ("train", "val", "test"):
        if p != part:
            assert out[True]["n"][p] == out[False]["n"][p]
    preds = pd.read_parquet(tmp_path / "rna_True" / "eval" / "predictions.parquet")
    assert no_rna not in set(preds["patient_id"])
    assert any("require_rna" in n for n in out[True]["notes"])
