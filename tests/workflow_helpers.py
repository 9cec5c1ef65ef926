"""Running the workflow from tests: a copy of the workflow in a temp dir, Snakemake on it, dry-run job counts.

Plain functions (conftest.py wraps them as fixtures) so that any test module can use them without
importing another test module.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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


# The reduced demo run (40 patients, 2 folds, two models) the end-to-end tests share.
SMALL = {
    "cohorts": {"demo": {"site": "BRCA", "demo": {"n_patients": 40, "seed": 0}}},
    "splits": {"scheme": "kfold", "n_folds": 2, "val_fraction": 0.2, "test_fraction": 0.25, "seed": 0},
    "run": {"cohorts": ["demo"], "models": ["modaltune", "snn"]},
}


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
