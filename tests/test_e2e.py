"""End to end: the whole DAG on a reduced demo cohort in a temporary folder, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = ("Snakefile", "rules", "workflow", "config", "envs", "profiles", "report")


def make_workdir(dest: Path, overrides: dict) -> Path:
    """Copy the workflow into ``dest`` and write a config file with ``overrides``."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part)
        else:
            shutil.copy2(src, dest / part)
    (dest / "test_config.yaml").write_text(yaml.safe_dump(overrides))
    return dest


def snakemake(workdir: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--configfile", "test_config.yaml", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)


# The profile's rerun triggers (profiles/slurm/config.yaml): reruns follow data and params, not code mtimes.
TRIGGERS = ("--rerun-triggers", "mtime", "params", "input")

SMALL = {
    "cohorts": {"demo": {"site": "BRCA", "demo": {"n_patients": 40, "seed": 0}}},
    "splits": {"scheme": "kfold", "n_folds": 2, "val_fraction": 0.2, "test_fraction": 0.25, "seed": 0},
    "run": {"cohorts": ["demo"], "models": ["modaltune", "snn"]},
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = make_workdir(tmp_path_factory.mktemp("e2e"), SMALL)
    res = snakemake(work, "-c2")
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-10000:]
    return work


@pytest.mark.slow
def test_demo_dag_writes_summary_with_metrics_above_chance(demo_run):
    tables = demo_run / "results/demo/tables"
    summary = pd.read_csv(tables / "summary.csv")
    assert set(summary["model"]) >= {"modaltune", "snn"}
    md = (tables / "summary.md").read_text()
    assert "modaltune" in md and "±" in md
    metrics = [json.loads(p.read_text()) for p in (demo_run / "results/demo/runs").glob("*/seed_*/fold_*/metrics.json")]
    assert len(metrics) == 4
    for m in metrics:
        assert 0.0 <= m["subtype_bacc"] <= 1.0
    mt = summary.set_index("model").loc["modaltune"]
    # The demo plants class signal in slides and RNA: a working pipeline is clearly above chance.
    assert mt["subtype_bacc_mean"] > 0.7, summary.to_string()
    # Survival: the planted hazard is found by at least one model's probe (20 test patients per fold
    # make a single model's C-index noisy), and every C-index is a valid concordance.
    assert summary["survival_cindex_mean"].max() > 0.55, summary.to_string()
    assert summary["survival_cindex_mean"].dropna().between(0, 1).all()


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Job counts per rule that a dry run would execute."""
    res = snakemake(workdir, "-n", *args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    if "Nothing to be done" in out:
        return {}
    table = out[out.index("Job stats:"):].splitlines()[3:]
    counts = {}
    for line in table:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.mark.slow
def test_fresh_clone_mtimes_schedule_nothing_with_profile(demo_run):
    # A fresh clone gives every tracked file (scripts, rules, config) a new mtime.
    for part in ("Snakefile", "rules", "workflow", "config", "test_config.yaml"):
        for f in [demo_run / part] if (demo_run / part).is_file() else (demo_run / part).rglob("*"):
            f.touch()
    assert planned_jobs(demo_run, "--profile", "profiles/slurm") == {}
    assert planned_jobs(demo_run) == {}  # profiles/default applies the same triggers to plain runs


@pytest.mark.slow
def test_deleting_one_output_reruns_only_that_job(demo_run):
    run = demo_run / "results/demo/runs/snn/seed_0/fold_0"
    (run / "metrics.json").unlink()
    target = str((run / "metrics.json").relative_to(demo_run))
    # Only the evaluation is redone: its training run, text targets and slides are reused.
    assert planned_jobs(demo_run, target, *TRIGGERS) == {"evaluate": 1}
    res = snakemake(demo_run, "-c1", target, *TRIGGERS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "metrics.json").exists()
    # the cost table and the manifest read aggregate's throughput / failures tables
    assert planned_jobs(demo_run, "--forcerun", "aggregate", *TRIGGERS) == {"aggregate": 1, "cost": 1, "manifest": 1,
                                                                           "all": 1}


@pytest.mark.slow
def test_rerun_one_slide_and_one_run_alone(demo_run):
    slide = sorted((demo_run / "results/demo/features/tiny").glob("*.h5"))[0]
    target = str(slide.relative_to(demo_run))
    assert planned_jobs(demo_run, target, "--force", *TRIGGERS) == {"embed_patches": 1}
    before = {p: p.stat().st_mtime_ns for p in slide.parent.glob("*.h5")}
    res = snakemake(demo_run, "-c1", target, "--force", *TRIGGERS)
    assert res.returncode == 0, res.stderr[-3000:]
    changed = [p for p in before if p.stat().st_mtime_ns != before[p]]
    assert changed == [slide]

    run = "results/demo/runs/snn/seed_0/fold_1/state.pt"
    assert planned_jobs(demo_run, run, "--force", *TRIGGERS) == {"train": 1}


@pytest.mark.slow
def test_report_of_the_demo_renders_in_chromium(demo_run, tmp_path):
    """`snakemake --report` after the demo: the front page shows the task tables, Kaplan-Meier and a heatmap."""
    from tests.test_browser import check_report_page, chromium, render

    chromium()
    res = snakemake(demo_run, "--report", "results/report.html")
    assert res.returncode == 0, res.stderr[-5000:]
    page = render(demo_run / "results/report.html", tmp_path)
    # heatmaps are a DAG stage once a rule registers files under the Heatmaps category
    has_heatmaps = any('category="Heatmaps"' in f.read_text() for f in (demo_run / "rules").glob("*.smk"))
    check_report_page(page, heatmap=has_heatmaps)
    assert "snn" in page["text"] and "Sections:" in page["text"]
    for cat in ("Tables", "Survival", "Classification", "Training", "QC", "Cost"):
        assert cat in page["text"], cat  # every category is in the navigation
