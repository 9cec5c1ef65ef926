"""The reduced demo DAG through a REAL single-node SLURM cluster with the project's profile.

Needs root and Debian's slurm-wlm packages (the shared start script installs them); skips with
the reason otherwise. Bounded in time; the cluster is stopped afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
START = ROOT.parent / "shared" / "slurm" / "start-single-node-slurm.sh"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CONFIG = {
    "cohorts": {"demo": {"site": "BRCA", "demo": {"n_patients": 16, "seed": 1}}},
    "run": {"cohorts": ["demo"], "models": ["modaltune", "snn"]},
    "splits": {"scheme": "kfold", "n_folds": 2, "val_fraction": 0.2, "test_fraction": 0.25, "seed": 0},
    "sharding": {"slides_per_job": 50},
    "training": {"epochs": 2, "warmup_epochs": 1},
}
SLURM_ENV = {"SLURM_ACCOUNTING": "none", "SLURM_FAKE_GPU": "1", "SLURM_PARTITION": "debug"}


def _cluster(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(START), action], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **SLURM_ENV})


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("SLURM test needs root (it starts slurmctld/slurmd)")
    if not START.exists():
        pytest.skip(f"SLURM start script not found at {START}")
    started = _cluster("start")
    if started.returncode != 0:
        pytest.skip(f"could not start a single-node SLURM (apt packages?): {started.stderr[-800:]}")
    try:
        yield
    finally:
        _cluster("stop")


def _test_profile(dest: Path) -> Path:
    """The project's profile with amounts that fit this machine (keys unchanged)."""
    prof = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())
    prof["default-resources"].update({"slurm_partition": "debug", "mem_mb": 1500, "runtime": 20,
                                      "cpus_per_task": 1})
    for res in prof["set-resources"].values():
        res.update({"mem_mb": 1500, "runtime": 20})
        if "cpus_per_gpu" in res:
            res["cpus_per_gpu"] = 1
    prof["latency-wait"] = 5
    prof["retries"] = 0
    out = dest / "profiles" / "slurm-test"
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(prof))
    return out


def _metrics(work: Path) -> dict:
    found = sorted((work / "results/demo/runs").glob("*/seed_*/fold_*/metrics.json"))
    return {str(p.relative_to(work)): json.loads(p.read_text()) for p in found}


def test_demo_dag_through_slurm_matches_local_run(cluster, tmp_path, make_workdir):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    local = make_workdir(tmp_path / "local", CONFIG)
    res = subprocess.run([sys.executable, "-m", "snakemake", "-c2", "--configfile", "test_config.yaml"],
                         cwd=local, capture_output=True, text=True, timeout=1200, env=env)
    assert res.returncode == 0, res.stderr[-5000:]

    work = make_workdir(tmp_path / "slurm", CONFIG)
    profile = _test_profile(work)
    cmd = ["timeout", "-s", "INT", "1500", sys.executable, "-m", "snakemake", "--profile", str(profile),
           "--configfile", "test_config.yaml", "--verbose", "--slurm-status-command", "squeue",
           "--slurm-init-seconds-before-status-checks", "5", "--slurm-keep-successful-logs"]
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, timeout=1600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-8000:]

    # Jobs went through sbatch: per-rule job logs of the executor plugin and the sbatch calls.
    slurm_logs = work / ".snakemake" / "slurm_logs"
    rules_seen = {p.name for p in slurm_logs.iterdir()}
    assert {"rule_slide_shard", "rule_train", "rule_evaluate"} <= rules_seen, rules_seen
    sbatch_lines = [ln for ln in log.splitlines() if "sbatch" in ln]
    assert sbatch_lines, "no sbatch call in the verbose log"
    gpu_calls = [ln for ln in sbatch_lines if re.search(r"--gpus[= ]1\b", ln)]
    assert any("rule_train" in ln or "train" in ln for ln in gpu_calls), sbatch_lines[:5]
    squeue = subprocess.run(["squeue", "-t", "all", "-h", "-o", "%j %T"], capture_output=True, text=True)
    assert "COMPLETED" in squeue.stdout

    # Same config, same metrics as the local run.
    local_m, slurm_m = _metrics(local), _metrics(work)
    assert local_m.keys() == slurm_m.keys() and local_m
    for key in local_m:
        for metric in ("subtype_bacc", "survival_cindex"):
            a, b = local_m[key][metric], slurm_m[key][metric]
            assert (a is None and b is None) or a == pytest.approx(b, abs=1e-6), (key, metric, a, b)
    shutil.rmtree(work / "resources", ignore_errors=True)
