"""Science checks that can fail, and the workflow facts they rest on.

- fold count from the split scheme (an imported single split is one fold), text targets only for text_kl
  models, cohorts of RNA + clinical without slides (issue 16, items 6, 8b, 8d);
- the complementary-signal demo (slide latent + pathway latent) used by benchmarks/bench_science.py;
- paired comparisons on common test patients and bootstrap CIs (modaltune.pairing);
- a shuffled-label null control and its positive control, and determinism of metrics.json (item 7).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from modaltune.errors import InputError
from tests.training_helpers import make_cohort, prepare_env
from tests.workflow_helpers import make_workdir, planned_jobs, snakemake

ROOT = Path(__file__).resolve().parents[1]


def _config():
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


# ---------------------------------------------------------------------------------------- DAG (dry runs)
def _split_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("train", "val", "test"):
        (folder / f"{part}_demo.json").write_text('{"data": []}')
    return folder


def _dry_run_outputs(work: Path) -> str:
    res = snakemake(work, "-n", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def test_imported_single_split_schedules_fold_0_only(tmp_path):
    imp = _split_files(tmp_path / "published")
    work = make_workdir(tmp_path / "w", {
        "splits": {"scheme": "import", "import_path": str(imp), "n_folds": 3},
        "run": {"cohorts": ["demo"], "models": ["modaltune", "snn"]},
    })
    out = _dry_run_outputs(work)
    folds = set(__import__("re").findall(r"fold_(\d+)", out))
    assert folds == {"0"}, sorted(folds)
    jobs = planned_jobs(work)
    assert jobs["train"] == 2 and jobs["text_targets"] == 1, jobs


def test_import_fold_ids_from_file_names(tmp_path):
    from modaltune.splits import import_fold_ids
    from modaltune.workflow import fold_ids

    assert import_fold_ids(_split_files(tmp_path / "json")) == [0]
    csv = tmp_path / "csv"
    csv.mkdir()
    for k in (0, 1, 3):
        (csv / f"splits_{k}.csv").write_text("train,val,test\n")
    assert import_fold_ids(csv) == [0, 1, 3]
    cfg = _config()
    cfg["splits"].update(scheme="import", import_path=str(csv))
    assert fold_ids(cfg) == [0, 1, 3]
    cfg["splits"].update(scheme="fixed")
    assert fold_ids(cfg) == [0]
    cfg["splits"].update(scheme="kfold", n_folds=4)
    assert fold_ids(cfg) == [0, 1, 2, 3]
    with pytest.raises(InputError, match="import_path"):
        fold_ids({"splits": {"scheme": "import", "import_path": None}})


@pytest.mark.parametrize("models, text_jobs", [(["abmil"], 0), (["abmil", "modaltune"], 2)])
def test_text_targets_only_for_text_kl_models(tmp_path, models, text_jobs):
    work = make_workdir(tmp_path / "w", {
        "splits": {"scheme": "kfold", "n_folds": 2},
        "run": {"cohorts": ["demo"], "models": models},
    })
    jobs = planned_jobs(work)
    assert jobs.get("text_targets", 0) == text_jobs, jobs
    assert jobs["train"] == 2 * len(models), jobs


def _sheetless_cohort(root: Path) -> dict:
    """RNA, gene sets and clinical files of the demo generator (formats as TCGA), without sheet or slides."""
    from modaltune.demo import (
        _clinical,
        _expression,
        _gene_sets,
        _layout,
        _write_gmt,
        _write_tsv,
        _write_xena,
    )

    layout = _layout(40, 0)
    paths = {"rna": root / "rna.gz", "gene_sets": root / "sets.gmt", "clinical": root / "clinical.tsv"}
    root.mkdir(parents=True, exist_ok=True)
    _write_xena(paths["rna"], _expression(layout, 0))
    _write_gmt(paths["gene_sets"], _gene_sets())
    _write_tsv(paths["clinical"], _clinical(layout, 0)[0])
    return {k: str(v) for k, v in paths.items()}


def _sheetless_config(root: Path, models) -> dict:
    return {
        "cohorts": {"rnaonly": {"site": "BRCA", **_sheetless_cohort(root / "inputs")}},
        "run": {"cohorts": ["rnaonly"], "models": list(models)},
        "splits": {"scheme": "kfold", "n_folds": 2, "val_fraction": 0.2, "seed": 0},
        "training": {"epochs": 2, "warmup_epochs": 1, "val_cindex": False},
    }


def test_sheetless_cohort_schedules_rna_models_without_slide_jobs(tmp_path):
    work = make_workdir(tmp_path / "w", _sheetless_config(tmp_path, ["mlp", "snn", "gene_mixer"]))
    jobs = planned_jobs(work)
    assert jobs["train"] == 6 and jobs["evaluate"] == 6, jobs
    assert not {"slide_shard", "tile", "embed_patches", "text_targets"} & set(jobs), jobs


def test_sheetless_cohort_with_a_slide_model_is_a_clear_error(tmp_path):
    from modaltune.workflow import target_models

    cfg = _config()
    cfg.update(_sheetless_config(tmp_path, ["snn", "abmil", "modaltune"]))
    with pytest.raises(InputError, match=r"\['abmil', 'modaltune'\] need slides.*rnaonly.*\['snn'\]"):
        target_models(cfg)
    cfg["run"]["models"] = ["snn", "mlp"]
    assert target_models(cfg) == ["snn", "mlp"]
    work = make_workdir(tmp_path / "w", _sheetless_config(tmp_path, ["snn", "abmil"]))
    res = snakemake(work, "-n", timeout=300)
    assert res.returncode != 0 and "need slides" in res.stdout + res.stderr


@pytest.mark.slow
def test_sheetless_cohort_runs_end_to_end(tmp_path):
    work = make_workdir(tmp_path / "w", _sheetless_config(tmp_path, ["mlp", "snn", "gene_mixer"]))
    res = snakemake(work, "-c2", timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    metrics = [json.loads(p.read_text()) for p in (work / "results/rnaonly/runs").glob("*/seed_0/fold_*/metrics.json")]
    assert len(metrics) == 6
    cases = pd.read_parquet(work / "results/rnaonly/clinical/cases.parquet")
    split = pd.read_parquet(work / "results/rnaonly/splits/kfold.parquet")
    for m in metrics:  # nobody dropped for lack of slides: every patient of the split is embedded and probed
        assert m["dropped_without_slides"] == []
        fold = split[split["fold"] == m["fold"]]
        assert m["n"] == fold["partition"].value_counts().to_dict()
        assert set(m["test_patients"]) == set(fold.loc[fold["partition"] == "test", "patient_id"])
        assert set(m["test_patients"]) <= set(cases["patient_id"])
        assert 0.0 <= m["subtype_bacc"] <= 1.0 and 0.0 <= m["survival_cindex"] <= 1.0


# ------------------------------------------------------------------------------------------- model facts
def _dims():
    from modaltune.models import ModelDims

    return ModelDims(feature_dim=16, n_genes=48, pathway_groups=[list(range(k * 8, (k + 1) * 8)) for k in range(6)],
                     clinical_dim=5, n_classes=2, n_bins=4, text_dim=12)


def _batch(d, feature_scale=1.0, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    b, n = 3, 20
    grid = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(4), indexing="ij"), -1).reshape(-1, 2) * 256.0
    return {
        "features": torch.randn(b, n, d.feature_dim, generator=g) * feature_scale,
        "coords": grid[None].expand(b, n, 2).clone(), "patch_mask": torch.ones(b, n, dtype=torch.bool),
        "genes": torch.randn(b, d.n_genes, generator=torch.Generator().manual_seed(99)),
        "has_genes": torch.ones(b, dtype=torch.bool),
        "clinical": torch.zeros(b, d.clinical_dim), "has_clinical": torch.zeros(b, dtype=torch.bool),
        "text": torch.zeros(b, 4, d.text_dim), "label": torch.zeros(b, dtype=torch.long),
        "time": torch.ones(b), "event": torch.ones(b), "patient_id": ["a", "b", "c"], "site": ["", "", ""],
    }


def test_arch_facts_match_the_built_models(monkeypatch):
    """``needs_slides`` / ``model_objective`` (read at DAG time, torch-free) agree with the modules: the
    objective is the built model's, and a model said to read no slides gives the same output whatever the
    patch features are, while one said to read them does not."""
    import torch

    from modaltune.models import available_models, build_model, model_objective, needs_slides
    from modaltune.models.modaltune import demo_config
    from modaltune.models.registry import ARCH_FACTS

    prepare_env(monkeypatch)
    cfgs = _config()["models"]
    blocks = {blk["arch"]: blk for blk in cfgs.values()}
    blocks["modaltune"] = {"arch": "modaltune", **demo_config(), "output_dim": 16}
    blocks.setdefault("mcat", {"arch": "mcat", "dim": 16, "num_heads": 2})
    assert set(ARCH_FACTS) == set(available_models()) - {"tiny_test"}
    d = _dims()
    for arch in ARCH_FACTS:
        cfg = {k: v for k, v in blocks.get(arch, {"arch": arch}).items() if k != "arch"}
        torch.manual_seed(0)
        model = build_model(arch, cfg, d).eval()
        assert model_objective(arch, cfg) == model.objective, arch
        with torch.no_grad():
            a = model(_batch(d))["embedding"]
            b = model(_batch(d, feature_scale=3.0, seed=1))["embedding"]
        assert torch.allclose(a, b) == (not needs_slides(arch, cfg)), arch
        if arch != "modaltune" and "objective" not in cfg and not ARCH_FACTS[arch][1]:
            torch.manual_seed(0)
            surv = build_model(arch, {**cfg, "objective": "survival"}, d)
            assert model_objective(arch, {**cfg, "objective": "survival"}) == surv.objective == "survival"


def test_unknown_arch_is_assumed_to_need_slides_and_text():
    from modaltune.models import needs_slides, needs_text

    assert needs_slides("my_new_arch", {}) and needs_text("my_new_arch", {})
    assert not needs_text("my_new_arch", {"objective": "survival"})
    assert needs_text("modaltune", {"objective": "survival"})  # fixed by the architecture
    assert not needs_text("abmil", {}) and not needs_slides("snn", {})


# ------------------------------------------------------------------------------ complementary demo signal
def test_complementary_layout_needs_both_latents():
    from modaltune import demo

    red = demo._layout(200, 3)
    comp = demo.complementary_layout(200, 3)
    # Same cohort layout (sheet, RNA availability, out-of-task patients), new class and survival.
    pd.testing.assert_frame_equal(demo.demo_sheet(200, 3), demo.demo_sheet(200, 3))
    for col in ("patient_id", "n_slides", "has_rna", "rna_samples"):
        assert (red[col] == comp[col]).all(), col
    assert ((red["label"] < 0) == (comp["label"] < 0)).all()
    s, g = comp["slide_signal"].to_numpy(), comp["pathway_signal"].to_numpy()
    assert abs(np.corrcoef(s, g)[0, 1]) < 0.2
    assert ((s + g > 0).astype(int) == comp["class"]).all()
    # Either latent alone predicts the class far below what both give (1.0 here, by construction).
    for one in (s, g):
        acc = np.mean((one > 0).astype(int) == comp["class"])
        assert 0.6 < acc < 0.9, acc
    np.testing.assert_allclose(comp["risk"], (s + g) / np.sqrt(2))


def test_complementary_rna_and_slides_each_carry_one_latent():
    from modaltune import demo

    comp = demo.complementary_layout(120, 0)
    mat = demo._expression(demo._rna_view(comp), 0)
    tumour = {c[:-3]: c for c in mat.columns if c.endswith("-01")}
    ids = [p for p in comp["patient_id"] if p in tumour]
    lay = comp.set_index("patient_id").loc[ids]
    sets = demo._gene_sets()
    score = (mat.loc[[g for g in sets[demo.SIGNAL_CLASS_UP] if g in mat.index], [tumour[p] for p in ids]].mean()
             - mat.loc[[g for g in sets[demo.SIGNAL_CLASS_DOWN] if g in mat.index], [tumour[p] for p in ids]].mean())
    score = score.to_numpy()
    assert np.corrcoef(score, lay["pathway_signal"])[0, 1] > 0.6
    assert abs(np.corrcoef(score, lay["slide_signal"])[0, 1]) < 0.25
    # Slides: the phenotype axis follows s, not the class; stage (clinical) follows neither latent.
    t = np.array(demo._slide_view(comp))
    assert np.corrcoef(t, comp["slide_signal"])[0, 1] > 0.99
    ph = [demo._patient_phenotype(float(v), np.random.default_rng(i)) for i, v in enumerate(t)]
    assert np.corrcoef([p["spacing"] for p in ph], comp["slide_signal"])[0, 1] < -0.6
    clin, _ = demo._clinical(demo._clinical_view(comp), 0)
    stage = clin.drop_duplicates("case_submitter_id").set_index("case_submitter_id")["ajcc_pathologic_stage"]
    order = {s: i for i, s in enumerate(sorted({x[0] for x in demo._STAGES}))}
    rank = stage.map(order).reindex(comp["patient_id"]).to_numpy(float)
    ok = np.isfinite(rank)
    assert abs(np.corrcoef(rank[ok], comp["risk"].to_numpy()[ok])[0, 1]) < 0.25
    # The default (redundant) demo is unchanged by the option: class in both modalities, stage follows risk.
    red = demo._layout(120, 0)
    assert demo._rna_view(red) is red and demo._clinical_view(red) is red
    assert demo._slide_view(red) == [int(c) for c in red["class"]]


def test_complementary_cohort_files(tmp_path, monkeypatch):
    from modaltune import demo
    from modaltune.demo import make_demo_cohort

    seen = {}
    render = demo._render_slide

    def spy(slide_seed, patient_seed, cls, size, planted=False):
        seen[tuple(patient_seed)] = (cls, planted)
        return render(slide_seed, patient_seed, cls, size, planted)

    monkeypatch.setattr(demo, "_render_slide", spy)
    paths = make_demo_cohort(tmp_path / "c", 40, 0, slide_size=(512, 384), workers=1, signal="complementary")
    truth = pd.read_csv(paths["truth"], sep="\t")
    # The renderer gets the continuous slide latent (not a truncated int class), and nothing is planted.
    views = sorted(v for v, _ in seen.values())
    assert all(isinstance(v, float) for v in views) and len(set(views)) == len(views)
    assert min(views) < 0 < max(views) and not any(p for _, p in seen.values())
    assert pd.read_csv(paths["truth_regions"], sep="\t").empty
    assert {"slide_signal", "pathway_signal"} <= set(truth.columns)
    assert ((truth["slide_signal"] + truth["pathway_signal"] > 0).astype(int) == truth["class"]).all()
    with pytest.raises(InputError, match="signal"):
        make_demo_cohort(tmp_path / "d", 12, 0, slide_size=(512, 384), workers=1, signal="both")


# ---------------------------------------------------------------------------------------------- pairing
def test_common_test_patients_and_paired_metrics():
    from modaltune.pairing import common_test_patients, paired_metrics

    common, counts = common_test_patients({"abmil": ["a", "b"], "snn": ["a", "b", "c"]})
    assert common == ["a", "b"] and counts == {"abmil": 2, "snn": 3}

    def preds(ids, pred, risk):
        return pd.DataFrame({"patient_id": ids, "partition": "test", "label": [0, 1, 0, 1][:len(ids)],
                             "time": [5.0, 1.0, 3.0, 2.0][:len(ids)], "event": 1.0, "subtype_pred": pred,
                             "risk": risk})

    out = paired_metrics({
        "abmil": preds(["p0", "p1", "p2"], [0, 1, 0], [0.1, 0.9, 0.5]),
        # snn also has p3 (a patient without slides, kept for RNA models): wrong on it, but not scored
        "snn": preds(["p0", "p1", "p2", "p3"], [0, 1, 0, 0], [0.1, 0.9, 0.5, -5.0]),
    }).set_index("model")
    assert out["n_test"].to_dict() == {"abmil": 3, "snn": 4}
    assert (out["n_common"] == 3).all()
    assert out.loc["snn", "bacc"] == out.loc["abmil", "bacc"] == 1.0
    assert out.loc["snn", "cindex"] == out.loc["abmil", "cindex"] == 1.0


def test_bootstrap_ci_covers_the_truth_and_narrows_with_n():
    from modaltune.pairing import balanced_accuracy, bootstrap_ci

    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400):
        y = rng.integers(0, 2, n)
        pred = np.where(rng.random(n) < 0.8, y, 1 - y)  # 80 % correct
        lo, hi = bootstrap_ci(balanced_accuracy, y, pred, n_boot=500, seed=1)
        assert lo < 0.8 < hi or abs(balanced_accuracy(y, pred) - 0.8) > 0.05
        assert lo <= balanced_accuracy(y, pred) <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2
    assert bootstrap_ci(balanced_accuracy, y, pred, n_boot=0) is None
    assert bootstrap_ci(balanced_accuracy, np.zeros(10, int), np.zeros(10, int), n_boot=50) is None


# ------------------------------------------------------------------------- training on cohorts w/o slides
def _run_args(c, out_dir, model_cfg, train_cfg=None, seed=0, sheet=None, feature_files=None):
    return dict(model_name=model_cfg["arch"], model_cfg=model_cfg,
                train_cfg={"epochs": 3, "warmup_epochs": 1, "lr": 3e-3, "projector_dim": 16, "max_patches": 30,
                           "val_cindex": False, **(train_cfg or {})},
                cases_path=c["cases_path"], splits_path=c["splits_path"], fold=0, seed=seed,
                pathways_path=c["pathways_path"], feature_files=c["feature_files"] if feature_files is None
                else feature_files, sheet=c["sheet"] if sheet is None else sheet,
                text_h5=c["text_h5"] if model_cfg["arch"] == "modaltune" else None, out_dir=str(out_dir))


def _evaluate(c, run_dir, sheet=None, feature_files=None, cases_path=None):
    from modaltune.evaluation import evaluate_run

    return evaluate_run(run_dir=run_dir, cases_path=cases_path or c["cases_path"], splits_path=c["splits_path"],
                        fold=0, pathways_path=c["pathways_path"],
                        feature_files=c["feature_files"] if feature_files is None else feature_files,
                        sheet=c["sheet"] if sheet is None else sheet, out_metrics=Path(run_dir) / "metrics.json",
                        out_embeddings=Path(run_dir) / "embeddings.npz")


SNN = {"arch": "snn", "objective": "survival", "hidden": [16, 16]}
ABMIL = {"arch": "abmil", "objective": "classification", "hidden": 16, "attn_dim": 8}


def test_rna_model_trains_without_any_slide(tmp_path, monkeypatch):
    from modaltune.training import train_run

    prepare_env(monkeypatch)
    c = make_cohort(tmp_path, n_patients=30)
    train_run(**_run_args(c, tmp_path / "snn", SNN, sheet=[], feature_files=[]))
    m = _evaluate(c, tmp_path / "snn", sheet=[], feature_files=[])
    split = pd.read_parquet(c["splits_path"])
    assert m["n"]["test"] == int((split["partition"] == "test").sum()) and m["dropped_without_slides"] == []


def test_keep_slideless_patients_for_non_slide_models_only(tmp_path, monkeypatch):
    """make_cohort's patient P002 has one slide, and it failed: dropped for every model by default; with the
    option, kept for the RNA model and still dropped for the slide model."""
    from modaltune.training import train_run

    prepare_env(monkeypatch)
    c = make_cohort(tmp_path, n_patients=30)
    split = pd.read_parquet(c["splits_path"]).set_index("patient_id")
    assert split.at["P002", "partition"] in ("train", "val", "test")
    keep = {"keep_slideless_for_non_slide_models": True, "epochs": 1}
    res = {}
    for name, cfg, train_cfg in [("snn", SNN, {"epochs": 1}), ("snn_keep", SNN, keep), ("abmil_keep", ABMIL, keep)]:
        train_run(**_run_args(c, tmp_path / name, cfg, train_cfg=train_cfg))
        res[name] = _evaluate(c, tmp_path / name)
    assert res["snn"]["dropped_without_slides"] == ["P002"]
    assert res["abmil_keep"]["dropped_without_slides"] == ["P002"]
    assert res["snn_keep"]["dropped_without_slides"] == []
    assert sum(res["snn_keep"]["n"].values()) == sum(res["abmil_keep"]["n"].values()) + 1


# ------------------------------------------------------------------------------ null and positive control
CONTROL_MODELS = {
    "abmil": ABMIL,
    "snn": SNN,
    "gene_mixer": {"arch": "gene_mixer", "objective": "classification", "latent_dim": 8, "depth": 1, "out_dim": 16},
    "late_fusion": {"arch": "late_fusion", "objective": "survival", "slide": {"hidden": 16, "attn_dim": 8},
                    "genes": {"hidden": [16, 16]}},
}


def _shuffle_cohort(c: dict, root: Path, seed: int = 0) -> dict:
    """The same cohort with labels and (time, event) each permuted across patients; text from the new labels."""
    from tests.training_helpers import T_DIM

    cases = pd.read_parquet(c["cases_path"])
    rng = np.random.default_rng(seed)
    cases["label"] = cases["label"].to_numpy()[rng.permutation(len(cases))]
    order = rng.permutation(len(cases))
    cases["survival_months"] = cases["survival_months"].to_numpy()[order]
    cases["event"] = cases["event"].to_numpy()[order]
    out = dict(c)
    out["cases_path"] = str(root / "shuffled" / "clinical" / "cases.parquet")
    Path(out["cases_path"]).parent.mkdir(parents=True, exist_ok=True)
    cases.to_parquet(out["cases_path"], index=False)
    protos = np.random.default_rng(1234).normal(0, 1, (2, 4, T_DIM))
    text = protos[np.clip(cases["label"].to_numpy(), 0, 1)] + rng.normal(0, 0.3, (len(cases), 4, T_DIM))
    out["text_h5"] = str(root / "shuffled" / "text.h5")
    with h5py.File(out["text_h5"], "w") as h5:
        h5.create_dataset("patient_id", data=np.array(cases["patient_id"], dtype=object), dtype=h5py.string_dtype())
        h5["embeddings"] = text.astype(np.float32)
    return out


def probe_cis(c: dict, run_dir: Path, metrics: dict, n_boot: int = 1000, level: float = 0.95) -> dict:
    """Bootstrap CIs (over test patients) of the headline probe metrics, from the run's embeddings.

    The probes are refitted on the TRAIN embeddings exactly as ``evaluate_run`` fits them (same functions,
    same settings), and the point estimates must equal those in metrics.json.
    """
    from modaltune.pairing import balanced_accuracy, bootstrap_ci, cindex
    from modaltune.probes import PROBE_DEFAULTS, cox_risk, fit_cox_probe, fit_lr_probe

    npz = np.load(run_dir / "embeddings.npz")
    x, part, ids = npz["embedding"], npz["partition"], list(npz["patient_id"])
    cases = pd.read_parquet(c["cases_path"]).set_index("patient_id").loc[ids]
    y = cases["label"].to_numpy(int)
    t, e = cases["survival_months"].to_numpy(float), cases["event"].to_numpy(float)
    names = list(metrics["tokens"])  # the run's token names, in embedding order

    def tok(name):
        return x[:, names.index(name)] if x.ndim == 3 else x

    tr, te = part == "train", part == "test"
    xs = tok(metrics["subtype_token"])
    pipe = fit_lr_probe(xs[tr], y[tr], seed=int(metrics["seed"]), max_iter=PROBE_DEFAULTS["lr_max_iter"],
                        mode=PROBE_DEFAULTS["lr"])
    pred = pipe.predict(xs[te])
    assert balanced_accuracy(y[te], pred) == pytest.approx(metrics["subtype_bacc"])
    xc = tok(metrics["survival_token"])
    cox = fit_cox_probe(xc[tr], t[tr], e[tr], penalizer=PROBE_DEFAULTS["cox_penalizer"], pca=PROBE_DEFAULTS["cox_pca"])
    risk = cox_risk(cox, xc[te])
    assert cindex(t[te], e[te], risk) == pytest.approx(metrics["survival_cindex"])
    return {"subtype_bacc": bootstrap_ci(balanced_accuracy, y[te], pred, n_boot=n_boot, seed=0, level=level),
            "survival_cindex": bootstrap_ci(cindex, t[te], e[te], risk, n_boot=n_boot, seed=0, level=level)}


@pytest.fixture(scope="module")
def control_cohort(tmp_path_factory):
    """make_cohort with 30 test patients and a survival signal strong enough to be found at that size:
    make_cohort ties the hazard to the label with HR e (C-index ~0.62 for a perfect label, too weak for
    30 patients), so times are redrawn with HR e**2.5 between the classes (C ~0.7)."""
    c = make_cohort(tmp_path_factory.mktemp("control"), n_patients=150, signal=1.0)
    cases = pd.read_parquet(c["cases_path"])
    rng = np.random.default_rng(7)
    cases["survival_months"] = rng.exponential(30 * np.exp(-2.5 * c["labels"]))
    cases.to_parquet(c["cases_path"], index=False)
    return c


def _train_and_cis(c, root, monkeypatch, level):
    from modaltune.models.modaltune import demo_config
    from modaltune.training import train_run

    prepare_env(monkeypatch)
    models = {**CONTROL_MODELS, "modaltune": {"arch": "modaltune", **demo_config(), "output_dim": 16}}
    out = {}
    for name, cfg in models.items():
        run = root / name
        train_run(**_run_args(c, run, cfg, train_cfg={"epochs": 2}))
        m = _evaluate(c, run, cases_path=c["cases_path"])
        out[name] = (m, probe_cis(c, run, m, level=level))
    return out


# 5 models x 2 metrics: with plain 95 % intervals a correct pipeline would fail ~40 % of such checks by
# chance (1 - 0.95**10), so every interval is taken at the Bonferroni level 1 - 0.05/10 (family-wise 95 %).
FAMILY_LEVEL = 1 - 0.05 / (2 * (len(CONTROL_MODELS) + 1))


@pytest.mark.slow
def test_shuffled_labels_and_survival_give_chance_metrics(control_cohort, tmp_path, monkeypatch):
    shuffled = _shuffle_cohort(control_cohort, tmp_path)
    res = _train_and_cis(shuffled, tmp_path, monkeypatch, FAMILY_LEVEL)
    for name, (m, ci) in res.items():
        for key, (lo, hi) in ci.items():
            assert lo < 0.5 < hi, f"{name} {key}: {m[key]:.3f} CI [{lo:.3f}, {hi:.3f}] excludes chance"


# Models trained for a task (or, ModalTune, on text naming the diagnosis and survival) must find its signal;
# the others' embeddings need not keep it (an RNA survival model's probe may miss the subtype).
SHOULD_FIND = {"subtype_bacc": ("abmil", "gene_mixer", "modaltune"), "survival_cindex": ("snn", "late_fusion")}


@pytest.mark.slow
def test_planted_signal_is_found(control_cohort, tmp_path, monkeypatch):
    """Positive control of the test above, on the same cohort unshuffled: the planted signal is found (95 % CI
    lower bound above chance) by the models that should find it (SHOULD_FIND). Plain 95 % intervals here:
    the multiplicity correction of the null test guards against chance failures there; here a chance
    failure comes from too little power, which wider intervals would only add."""
    res = _train_and_cis(control_cohort, tmp_path, monkeypatch, 0.95)
    found = {n: {k: (round(m[k], 3), [round(v, 3) for v in ci[k]]) for k in ci} for n, (m, ci) in res.items()}
    print("positive control, 95 % CIs:", json.dumps(found))
    for name in SHOULD_FIND["subtype_bacc"]:
        assert res[name][1]["subtype_bacc"][0] > 0.5, found
    for name in SHOULD_FIND["survival_cindex"]:
        assert res[name][1]["survival_cindex"][0] > 0.5, found


# ---------------------------------------------------------------------------------------------- determinism
def test_same_config_and_seed_give_identical_metrics_json(tmp_path, monkeypatch):
    from modaltune.training import train_run

    prepare_env(monkeypatch)
    c = make_cohort(tmp_path, n_patients=30)
    texts = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        for model, cfg in (("abmil", ABMIL), ("snn", SNN)):
            run = tmp_path / name / model
            train_run(**_run_args(c, run, cfg, seed=seed, train_cfg={"epochs": 2}))
            _evaluate(c, run)
            texts[name, model] = (run / "metrics.json").read_bytes()
    for model in ("abmil", "snn"):
        assert texts["a", model] == texts["b", model], model
        assert texts["a", model] != texts["c", model], model


# ------------------------------------------------------------------------ bench_science's analysis
def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_science", ROOT / "benchmarks" / "bench_science.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench_runs(values: dict, tp=("A", "B")) -> pd.DataFrame:
    rows = []
    for model, (sub, surv) in values.items():
        for i, (a, b) in enumerate(zip(sub, surv, strict=True)):
            rows.append({"model": model, "seed": i // 5, "fold": i % 5, "subtype": a, "survival": b,
                         "subtype_task": a, "survival_task": None, "n_test": 2, "test_patients": tp})
    return pd.DataFrame(rows)


def test_bench_science_paired_test_passes_only_on_a_consistent_win():
    bench = _bench()
    rng = np.random.default_rng(0)
    base = 0.6 + 0.05 * rng.standard_normal(15)
    df = _bench_runs({"abmil": (base, base), "snn": (base - 0.1, base - 0.1),
                      "modaltune": (base + 0.05 + 0.01 * rng.random(15), base + 0.05 + 0.01 * rng.random(15)),
                      "abmil_cat": (base + 0.01 * rng.standard_normal(15), base - 0.2)})
    _, tests = bench.paired_tests(df)
    res = {(t["task"], t["model"]): t for t in tests}
    assert res[("subtype", "modaltune")]["pass"] and res[("subtype", "modaltune")]["baseline"] == "abmil"
    assert res[("survival", "modaltune")]["pass"]
    assert not res[("subtype", "abmil_cat")]["pass"]  # no better than the best single modality
    assert not res[("survival", "abmil_cat")]["pass"] and res[("survival", "abmil_cat")]["mean_diff"] < 0
    # Secondary table: models without a reported value on a task drop out instead of failing the test.
    _, task_tests = bench.paired_tests(df, suffix="_task")
    assert {t["task"] for t in task_tests} == {"subtype"}


def test_bench_science_check_is_each_model_on_the_task_it_was_trained_for():
    bench = _bench()
    rng = np.random.default_rng(2)
    base = 0.6 + 0.05 * rng.standard_normal(15)
    win = base + 0.05 + 0.01 * rng.random(15)
    df = _bench_runs({"abmil": (base, base), "snn": (base - 0.1, base - 0.1), "modaltune": (win, win),
                      "abmil_cat": (base - 0.05, win), "abmil_cat_cls": (win, base - 0.2)})
    df["trained_for"] = df["model"].map({"abmil_cat": "survival", "abmil_cat_cls": "subtype", "modaltune": "both",
                                         "abmil": "subtype", "snn": "survival"})
    _, tests = bench.paired_tests(df)
    res = {(t["task"], t["model"]): t for t in tests}
    assert set(res) == {(t, m) for t in ("subtype", "survival") for m in ("modaltune", "abmil_cat", "abmil_cat_cls")}
    own = {k for k, t in res.items() if t["own_task"]}
    assert own == {("subtype", "modaltune"), ("survival", "modaltune"), ("survival", "abmil_cat"),
                   ("subtype", "abmil_cat_cls")}
    # The survival-trained late fusion loses on the subtype and the subtype-trained one on survival: shown,
    # not part of the check, which passes on the own-task rows.
    assert not res[("subtype", "abmil_cat")]["pass"] and not res[("survival", "abmil_cat_cls")]["pass"]
    assert bench.check_passed(tests)
    # A loss on a task the model was trained for fails the check.
    df.loc[df["model"] == "abmil_cat_cls", "subtype"] = base - 0.05
    assert not bench.check_passed(bench.paired_tests(df)[1])
    assert not bench.check_passed([])
    # The late-fusion variant is the same model with another objective (and no slide-encoder backbone).
    m = bench.bench_models(["abmil_cat", "abmil_cat_cls"])
    variant = dict(m["abmil_cat_cls"])
    assert variant.pop("objective") == "classification" and variant.pop("arch") == "late_fusion"
    assert "backbone" not in variant and variant["slide"] == m["abmil_cat"]["slide"]
    assert variant["genes"] == m["abmil_cat"]["genes"]


def test_bench_science_null_control_and_label_permutation(tmp_path):
    bench = _bench()
    rng = np.random.default_rng(1)
    chance = 0.5 + 0.05 * rng.standard_normal(15)
    out = {(t["model"], t["task"]): t["pass"] for t in bench.null_tests(_bench_runs(
        {"abmil": (chance, chance), "modaltune": (chance + 0.3, chance)}))}
    assert out[("abmil", "subtype")] and out[("abmil", "survival")] and out[("modaltune", "survival")]
    assert not out[("modaltune", "subtype")]  # learned something from permuted labels: the control fails
    # The permutation moves whole cases' label fields and nothing else.
    clin = pd.DataFrame({"case_submitter_id": ["P1", "P1", "P2", "P3", "P4"],
                         "primary_diagnosis": ["d1", "d1", "d2", "d3", "d4"],
                         "vital_status": ["Dead", "Dead", "Alive", "Dead", "Alive"],
                         "days_to_death": ["10", "10", "'--", "30", "'--"], "gender": ["f", "f", "m", "f", "m"]})
    path = tmp_path / "clinical.tsv"
    clin.to_csv(path, sep="\t", index=False)
    bench.permute_labels(path, seed=3)
    new = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    assert new["case_submitter_id"].tolist() == clin["case_submitter_id"].tolist()
    assert new["gender"].tolist() == clin["gender"].tolist()
    assert new.loc[0, "primary_diagnosis"] == new.loc[1, "primary_diagnosis"]  # one case keeps one label
    assert sorted(new.drop_duplicates("case_submitter_id")["primary_diagnosis"]) == ["d1", "d2", "d3", "d4"]
    assert new["primary_diagnosis"].tolist() != clin["primary_diagnosis"].tolist()
    pairs = {(d, v, t) for d, v, t in zip(new["primary_diagnosis"], new["vital_status"], new["days_to_death"],
                                          strict=True)}
    assert pairs <= set(zip(clin["primary_diagnosis"], clin["vital_status"], clin["days_to_death"], strict=True))


def test_bench_science_models_run_at_demo_width():
    bench = _bench()
    demo = yaml.safe_load((ROOT / "config/config.yaml").read_text())["demo_models"]
    m = bench.bench_models(["modaltune", "abmil", "snn"])
    assert m["abmil"] == demo["abmil"] and m["snn"] == demo["snn"]
    assert m["modaltune"]["backbone"]["depth"] == 3 and m["modaltune"]["backbone"]["embed_dim"] == 64


def test_bench_science_variant_differs_only_in_selection():
    bench = _bench()
    m = bench.bench_models(["modaltune", "modaltune_sel_loss"])
    variant = dict(m["modaltune_sel_loss"])
    assert variant.pop("training") == {"selection": "loss"}
    assert variant.pop("arch") == "modaltune" and variant.pop("objective") == "text_kl"
    # Same widths as the bench's ModalTune (the rest comes from config.yaml's models.modaltune on both).
    assert {k: v for k, v in variant.items() if k != "backbone"} == {k: v for k, v in m["modaltune"].items()
                                                                      if k != "backbone"}
    assert {k: variant["backbone"][k] for k in m["modaltune"]["backbone"]} == m["modaltune"]["backbone"]
    assert bench.MODALITIES["modaltune_sel_loss"] == bench.MODALITIES["modaltune"]


def test_bench_science_latent_r2_finds_only_the_carried_latent():
    bench = _bench()
    rng = np.random.default_rng(0)
    n = 200
    lat = pd.DataFrame({"slide_signal": rng.standard_normal(n), "pathway_signal": rng.standard_normal(n)})
    noise = rng.standard_normal((n, 8))
    emb = noise.copy()
    emb[:, 0] += 3 * lat["slide_signal"].to_numpy()  # the embedding carries s, not g
    part = np.where(np.arange(n) < 150, "train", "test")
    r2 = bench.latent_r2(emb, part, lat)
    assert r2["slide_signal"] > 0.8 and r2["pathway_signal"] < 0.05
    # Fitted on train only: a test-only signal is not found.
    emb2 = noise.copy()
    emb2[150:, 1] += 3 * lat["pathway_signal"].to_numpy()[150:]
    assert bench.latent_r2(emb2, part, lat)["pathway_signal"] < 0.1


def test_bench_science_reference_fusion_reads_the_workflow_files(tmp_path):
    """The PCA + probe reference finds the modality that carries the class, on each fold's test patients."""
    bench = _bench()
    rng = np.random.default_rng(0)
    n, res = 120, tmp_path / "results" / "science"
    ids = [f"P{i:03d}" for i in range(n)]
    label = rng.integers(0, 2, n)
    for d in ("clinical", "genomics", "splits", "features/tiny/shards/0"):
        (res / d).mkdir(parents=True, exist_ok=True)
    (tmp_path / "cohort").mkdir()
    pd.DataFrame({"patient_id": ids, "label": label, "survival_months": rng.exponential(20, n) * np.exp(-label),
                  "event": rng.integers(0, 2, n)}).to_parquet(res / "clinical" / "cases.parquet")
    genes = rng.standard_normal((n, 30))
    genes[:, :5] += 2.0 * label[:, None]  # RNA carries the class
    pd.DataFrame(genes, index=pd.Index(ids, name="patient_id")).rename(columns=str).assign(
        sample_id=[f"{p}-01" for p in ids]).to_parquet(res / "genomics" / "pathways.parquet")
    slides = [f"{p}-DX1" for p in ids]
    pd.DataFrame({"slide_id": slides, "patient_id": ids}).to_csv(tmp_path / "cohort" / "cohort_sheet.tsv", sep="\t",
                                                                 index=False)
    manifest = []
    for s in slides:  # slides carry nothing
        f = f"results/science/features/tiny/shards/0/{s}.h5"
        with h5py.File(tmp_path / f, "w") as h5:
            h5["features"] = rng.standard_normal((6, 16)).astype(np.float32)
        manifest.append({"slide_id": s, "tiles_h5": "", "features_h5": f, "status": "ok", "error": ""})
    pd.DataFrame(manifest).to_csv(res / "features" / "tiny" / "shards" / "0.tsv", sep="\t", index=False)
    part = np.array(["train"] * 90 + ["val"] * 10 + ["test"] * 20)
    pd.DataFrame([{"patient_id": p, "fold": k, "partition": part[(i + 40 * k) % n], "site": "BRCA", "flags": ""}
                  for k in range(2) for i, p in enumerate(ids)]).to_parquet(res / "splits" / "kfold.parquet")
    ref = bench.reference_fusion(tmp_path, n_components=4)
    assert len(ref) == 6 and set(ref["fold"]) == {0, 1}
    mean = ref.groupby("inputs")["subtype"].mean()
    assert mean["rna"] > 0.9 and mean["slides+rna"] > 0.85 and mean["slides"] < 0.75
    assert "| rna |" in bench.render_reference(ref, 4)
