"""Report stage: task tables (C1), plots from predictions (C2), cost, manifest, rule declarations."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from modaltune import aggregate as agg
from modaltune import cost, manifest, plots
from modaltune.errors import InputError
from tests import report_fixtures as rf

ROOT = Path(__file__).resolve().parents[1]


def _aggregate(tmp_path, **kw):
    files = rf.write_cohort(tmp_path / "runs", **kw)
    preds = [str(Path(f).with_name("predictions.parquet")) for f in files]
    hist = [str(Path(f).with_name("history.parquet")) for f in files]
    out = tmp_path / "out"
    agg.aggregate(files, out, history_files=hist, prediction_files=[p for p in preds if Path(p).exists()])
    return files, out


def _non_blank(png) -> float:
    """Fraction of pixels that differ from the most common (background) colour."""
    a = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    _, idx, counts = np.unique(a, axis=0, return_inverse=True, return_counts=True)
    return 1 - counts.max() / len(a)


# ------------------------------------------------------------------------------------------ task tables
def test_task_tables_list_each_model_on_its_own_task_with_source_and_ci(tmp_path):
    files = rf.write_cohort(tmp_path, cohort="BRCA") + rf.write_cohort(tmp_path, cohort="NSCLC")
    # make the two cohorts differ so that "Overall" is a real mean over cohorts
    for f in files:
        if "/NSCLC/" in f:
            m = json.loads(Path(f).read_text())
            if m["subtype"]["bacc"] is not None:
                m["subtype"]["bacc"] -= 0.2
            Path(f).write_text(json.dumps(m))
    sub, surv = agg.comparison_tables(files, tmp_path / "out")
    assert set(sub["model"]) == {"modaltune", "abmil"}  # snn is a survival model: not in the subtype table
    assert set(surv["model"]) == {"modaltune", "snn"}  # abmil is a classifier: not in the survival table
    src = sub.drop_duplicates("model").set_index("model")["source"]
    assert src["abmil"] == "head" and src["modaltune"] == "probe"
    t = sub.set_index(["model", "eval_cohort"])
    brca, nsclc = t.loc[("abmil", "BRCA"), "bacc_mean"], t.loc[("abmil", "NSCLC"), "bacc_mean"]
    assert brca == pytest.approx(np.mean([0.7 + 0.05 * 1.5 + 0.01 * s for s in (0, 1) for _ in range(2)]))
    assert t.loc[("abmil", "Overall"), "bacc_mean"] == pytest.approx((brca + nsclc) / 2)
    assert t.loc[("abmil", "BRCA"), "bacc_std"] == pytest.approx(np.std([0.775, 0.775, 0.785, 0.785], ddof=1))
    assert t.loc[("abmil", "BRCA"), "bacc_ci_lo"] == pytest.approx(brca - 0.1)
    md = (tmp_path / "out/tables/subtype.md").read_text()
    assert "| model | source | BRCA | NSCLC | Overall |" in md
    assert re.search(r"\| abmil \| head \| 0\.780 ± 0\.006 \[0\.68, 0\.88\] \(n=4\) \| 0\.580", md), md
    wide = pd.read_csv(tmp_path / "out/tables/survival.csv")
    assert list(wide["model"]) == ["modaltune", "snn"] and "Overall_cindex_mean" in wide.columns
    assert wide.set_index("model").loc["snn", "source"] == "head"


def test_schema_v1_metrics_are_read_with_tasks_from_the_objective(tmp_path):
    files = rf.write_cohort(tmp_path, v1=True)
    assert "schema_version" not in json.loads(Path(files[0]).read_text())
    df = agg.load_metrics(files)
    sub, surv = agg.task_table(df, "subtype"), agg.task_table(df, "survival")
    assert set(sub["model"]) == {"modaltune", "abmil"} and set(surv["model"]) == {"modaltune", "snn"}
    assert set(sub["source"]) == {"probe"}  # old files carry probe headline values only
    assert sub.set_index(["model", "eval_cohort"]).loc[("abmil", "BRCA"), "bacc_mean"] == pytest.approx(0.75)
    assert sub["bacc_ci_lo"].isna().all()


def test_summary_md_leads_with_the_task_tables_and_keeps_the_probe_table(tmp_path):
    _, out = _aggregate(tmp_path)
    md = (out / "tables/summary.md").read_text()
    assert md.index("### Subtype: balanced accuracy") < md.index("### Survival: C-index") < md.index(
        "Linear probes of every embedding")
    assert "| snn | BRCA |" in md  # every embedding stays in the probe table
    html = (out / "tables/summary.html").read_text()
    assert "<th>Overall</th>" in html and "modaltune" in html
    for name in agg.TABLE_FILES + agg.PLOT_FILES:
        assert (out / name).stat().st_size > 0, name


def test_paired_task_differences_have_a_t_interval_and_skip_models_off_the_task(tmp_path):
    files = rf.write_cohort(tmp_path, seeds=(0, 1, 2))
    paired = agg.paired_comparisons(agg.load_metrics(files))
    task = paired[paired["table"] == "task"]
    assert set(zip(task["other"], task["metric"], strict=True)) == {("abmil", "subtype_bacc"),
                                                                     ("snn", "survival_cindex")}
    df = agg.load_metrics(files)
    a = df[df.model == "modaltune"].set_index(["seed", "fold"])["task_subtype_bacc"]
    b = df[df.model == "abmil"].set_index(["seed", "fold"])["task_subtype_bacc"]
    d = (a - b).to_numpy()
    row = task[task["other"] == "abmil"].iloc[0]
    from scipy import stats

    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert row["n_pairs"] == 6 and row["mean_diff"] == pytest.approx(d.mean())
    assert row["ci_lo"] == pytest.approx(d.mean() - half) and row["ci_hi"] == pytest.approx(d.mean() + half)


# ---------------------------------------------------------------------------------------------- plots
def test_km_split_uses_the_training_median_risk_not_the_test_median():
    n = 10
    preds = pd.DataFrame({
        "patient_id": [f"P{i}" for i in range(2 * n)], "partition": ["train"] * n + ["test"] * n,
        "label": 0, "time": np.arange(2 * n, dtype=float) + 1, "event": 1.0,
        # training risks 10..19 (median 14.5); test risks 11..20 -> only risks > 14.5 are "high"
        "risk": np.r_[np.arange(10, 20), np.arange(11, 21)].astype(float),
        "model_id": "snn", "seed": 0, "fold": 0, "eval_cohort": "BRCA", "subtype_reported": False,
        "survival_reported": True})
    g = rf_groups = plots.km_groups(preds)
    assert len(g) == n and set(g["patient_id"]) == {f"P{i}" for i in range(n, 2 * n)}
    assert (rf_groups["group"] == "high").sum() == 6  # 15..20; a test-median split would give 5


def test_km_pan_cancer_is_split_per_site():
    rows = []
    for site, base in (("BRCA", 0.0), ("NSCLC", 100.0)):  # NSCLC risks all above BRCA's
        rows.append(pd.DataFrame({"patient_id": [f"{site}{i}" for i in range(8)],
                                  "partition": ["train"] * 4 + ["test"] * 4, "site": site, "label": 0,
                                  "time": 1.0 + np.arange(8), "event": 1.0,
                                  "risk": base + np.array([1, 2, 3, 4, 1.5, 2.5, 3.5, 4.5])}))
    preds = pd.concat(rows).assign(model_id="snn", seed=0, fold=0, eval_cohort="PAN", subtype_reported=False,
                                   survival_reported=True)
    g = plots.km_groups(preds)
    assert set(g["eval_cohort"]) == {"PAN / BRCA", "PAN / NSCLC"}
    # per site: 1.5 low, 2.5 low (median 2.5 is not above), 3.5 and 4.5 high; a pooled split would put
    # every NSCLC patient in the high group
    assert g.groupby("eval_cohort")["group"].apply(lambda x: (x == "high").sum()).tolist() == [2, 2]


def test_km_roc_confusion_draw_one_panel_per_model_reported_on_the_task(tmp_path):
    files = rf.write_cohort(tmp_path / "runs")
    df = agg.load_metrics(files)
    preds = agg.load_predictions(df, [str(Path(f).with_name("predictions.parquet")) for f in files])
    stats = plots.plot_kaplan_meier(preds, tmp_path / "km.png")
    assert sorted(stats["model_id"]) == ["modaltune", "snn"]
    # first seed, folds pooled: every patient once
    assert (stats["n_high"] + stats["n_low"]).tolist() == [40, 40]
    assert stats["logrank_p"].between(0, 1).all()
    assert plots.plot_roc(preds, tmp_path / "roc.png") == 2  # modaltune + abmil, not snn
    assert plots.plot_confusion(preds, tmp_path / "cm.png") == 2
    for f in ("km.png", "roc.png", "cm.png"):
        assert _non_blank(tmp_path / f) > 0.03
    w, h = Image.open(tmp_path / "km.png").size
    assert w >= 600 and h >= 300  # readable size


def test_plots_without_predictions_write_a_readable_placeholder(tmp_path):
    files = rf.write_cohort(tmp_path / "runs", v1=True)
    agg.aggregate(files, tmp_path / "out")
    assert plots.km_groups(pd.DataFrame()).empty
    assert _non_blank(tmp_path / "out/plots/km.png") > 0.001


def test_training_curves_read_whatever_val_columns_exist(tmp_path):
    h = pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [1.0, 0.8, 0.6], "val_loss": [1.1, 0.9, 0.7],
                      "val_auroc": [0.5, 0.6, 0.7], "val_cindex": [np.nan] * 3, "val_selection": ["x"] * 3})
    files = []
    for model in ("abmil", "snn"):
        for fold in (0, 1):
            p = tmp_path / "runs" / model / "seed_0" / f"fold_{fold}" / "history.parquet"
            p.parent.mkdir(parents=True)
            (h.assign(val_loss=h["val_loss"] + fold)).to_parquet(p)
            files.append(str(p))
    hist = plots.read_histories(files)
    assert plots.curve_columns(hist) == (["train_loss", "val_loss"], ["val_auroc"])
    assert plots.plot_training_curves(files, tmp_path / "c.png") == 2
    assert _non_blank(tmp_path / "c.png") > 0.03


# ----------------------------------------------------------------------------------------------- cost
def _bench(path: Path, s: float, cpu: float | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                    f"{s}\t0:00:01\t100.5\t200\t90\t95\t0\t0\t50\t{cpu}\n")
    return str(path)


def _cost_inputs(tmp_path):
    b = tmp_path / "benchmarks/out"
    files = {"slide_shard": [_bench(b / "slide_shard/c/tiny/0.tsv", 36.0, 30.0)],
             "splits": [_bench(b / "splits/c.tsv", 3.6, "-")],
             "train": [_bench(b / f"train/c/{m}/seed_0_fold_{k}.tsv", 72.0 if m == "abmil" else 36.0, 72.0)
                       for m in ("abmil", "snn") for k in (0, 1)]}
    thr = tmp_path / "throughput.tsv"
    pd.DataFrame({"slide_id": ["S1", "S2"], "encoder": "tiny", "n_tiles": [100, 300], "tiles_per_s": [50.0, 70.0],
                  "wall_s": [2.0, 4.3]}).to_csv(thr, sep="\t", index=False)
    return files, thr


def test_cost_tables_and_estimate_scale_with_the_cohort(tmp_path):
    files, thr = _cost_inputs(tmp_path)
    stages = cost.cost_report(files, throughput_tsv=thr, gpu_stages=["slide_shard", "train"], n_slides=2,
                              n_patients=4, out_tsv=tmp_path / "s.tsv", out_md=tmp_path / "s.md",
                              out_rates=tmp_path / "rates.json").set_index("stage")
    assert stages.loc["train", "wall_h"] == pytest.approx((2 * 72 + 2 * 36) / 3600)
    assert stages.loc["train", "gpu_h"] == pytest.approx(stages.loc["train", "wall_h"])
    assert stages.loc["splits", "gpu_h"] == 0 and np.isnan(stages.loc["splits", "cpu_h"])  # "-" = not measured
    assert stages.loc["total", "wall_h"] == pytest.approx((36 + 3.6 + 216) / 3600)
    assert "tiles/s per slide median 60.0" in (tmp_path / "s.md").read_text()
    rates = cost.load_rates(tmp_path / "rates.json")
    assert rates["stages"]["slide_shard"]["wall_s_per_unit"] == pytest.approx(36 / 400)  # per tile
    one = cost.estimate(rates, slides=2).set_index("stage")
    assert one.loc["slide_shard", "wall_h"] == pytest.approx(36 / 3600)  # the measured cohort itself
    big = cost.estimate(rates, slides=1000, tiles_per_slide=10_000, models=["abmil"], runs=5).set_index("stage")
    assert big.loc["slide_shard", "wall_h"] == pytest.approx(1000 * 10_000 * 36 / 400 / 3600)
    # patients default to the measured ratio (2 per slide); abmil: 72 s per run over 4 patients
    assert big.loc["train (abmil)", "wall_h"] == pytest.approx(2000 * 5 * 72 / 4 / 3600)
    assert "train (snn)" not in big.index
    with pytest.raises(InputError, match="transmil"):
        cost.estimate(rates, slides=10, models=["transmil"])


def test_cost_cli_prints_the_estimate(tmp_path):
    files, thr = _cost_inputs(tmp_path)
    cost.cost_report(files, throughput_tsv=thr, gpu_stages=["train"], n_slides=2, n_patients=4,
                     out_tsv=tmp_path / "s.tsv", out_md=tmp_path / "s.md", out_rates=tmp_path / "rates.json")
    res = subprocess.run([sys.executable, "-m", "modaltune.cli", "cost", "--slides", "1000", "--rates",
                          str(tmp_path / "rates.json")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "train (abmil)" in res.stdout and "total" in res.stdout
    res = subprocess.run([sys.executable, "-m", "modaltune.cli", "cost", "--slides", "10", "--rates",
                          str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert res.returncode == 2 and "missing.json" in res.stderr


# ------------------------------------------------------------------------------------------- manifest
def test_manifest_fingerprint_checkpoints_git_and_failures(tmp_path):
    ck = tmp_path / "w.pth"
    ck.write_bytes(b"weights")
    cfg = {"b": 1, "embedding": {"checkpoint": str(ck)}, "text": {"checkpoint": "nope.pt"},
           "models": {"m": {"backbone": {"checkpoint": None}}}}
    fails = tmp_path / "failures.tsv"
    pd.DataFrame({"slide_id": ["S9"], "file": ["x.h5"], "status": ["failed"], "error": ["no tissue"]}).to_csv(
        fails, sep="\t", index=False)
    m = manifest.write_manifest(cfg, tmp_path / "m.json", workflow_dir=tmp_path, failures_tsv=fails)
    assert json.loads((tmp_path / "m.json").read_text())["config_sha256"] == m["config_sha256"]
    assert m["config_sha256"] == manifest.config_fingerprint(dict(reversed(list(cfg.items()))))  # key order
    assert m["config_sha256"] != manifest.config_fingerprint({**cfg, "b": 2})
    import hashlib

    cks = {c["key"]: c for c in m["checkpoints"]}
    assert cks["embedding.checkpoint"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert cks["text.checkpoint"] == {"key": "text.checkpoint", "path": "nope.pt", "exists": False, "sha256": None}
    assert m["git"] is None  # tmp_path is no git repository
    assert m["failures"][0]["slide_id"] == "S9" and m["n_failures"] == 1
    assert m["packages"]["pandas"] == pd.__version__
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    subprocess.run(["git", "-C", str(tmp_path / "repo"), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    g = manifest.git_commit(tmp_path / "repo")
    assert re.fullmatch(r"[0-9a-f]{40}", g["commit"]) and g["dirty"] is False


# ------------------------------------------------------------------------------------ rule declarations
def test_every_aggregate_file_is_a_declared_output_registered_for_the_report():
    text = (ROOT / "rules/report.smk").read_text()
    for name in agg.TABLE_FILES + agg.PLOT_FILES + agg.SLIDE_FILES:
        stem = name.split("/", 1)[-1]
        assert re.search(r'f"\{(TABLES|PLOTS|RESULTS)\}[^"]*' + re.escape(stem) + '"', text), name
    allowed = {"Tables", "Classification", "Survival", "Heatmaps", "Training", "QC", "Cost"}
    for smk in (ROOT / "rules").glob("*.smk"):
        body = smk.read_text()
        assert set(re.findall(r'[^b]category="([^"]+)"', body)) <= allowed, smk.name
        for cap in re.findall(r'caption="\.\./(report/[\w.-]+\.rst)"', body):
            assert (ROOT / cap).is_file(), cap
    assert (ROOT / "report/workflow.rst").is_file()
    assert 'report: "report/workflow.rst"' in (ROOT / "Snakefile").read_text()
