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
WORKFLOW_PARTS = ("Snakefile", "rules", "workflow", "config", "envs", "profiles")


def make_workdir(dest: Path, overrides: dict) -> Path:
    """Copy the workflow into ``dest`` and write a config file with ``overrides``."""
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
    assert mt["survival_cindex_mean"] > 0.55, summary.to_string()


@pytest.mark.slow
def test_rerun_of_finished_dag_schedules_nothing(demo_run):
    res = snakemake(demo_run, "-n", "--rerun-triggers", "mtime", "params", "input")
    assert res.returncode == 0
    assert "Nothing to be done" in res.stdout + res.stderr
