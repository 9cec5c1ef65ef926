"""Preflight cohort helpers shared by test_preflight.py and test_catalogue.py.

A small real-layout cohort on disk, a config that points one cohort at it, and lookups of one problem or
warning in a preflight report. Not a test module: test files import from here, never from each other.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import yaml

from modaltune.demo import make_demo_cohort
from modaltune.preflight import preflight_cohort

ROOT = Path(__file__).resolve().parents[1]
FILES = {"sheet": "cohort_sheet.tsv", "rna": "rna/HiSeqV2_PANCAN.gz", "gene_sets": "genesets/demo.gmt",
         "clinical": "clinical/clinical.tsv", "biospecimen": "biospecimen/slide.tsv"}


def make_cohort(tmp_path_factory) -> Path:
    """A 12-patient demo-layout cohort on disk (small slides: only headers are read here)."""
    root = tmp_path_factory.mktemp("pf_cohort") / "c"
    make_demo_cohort(root, n_patients=12, seed=0, slide_size=(512, 384), workers=1)
    return root


def copy_cohort(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the cohort folder that a test may break."""
    return Path(shutil.copytree(pristine, tmp_path / "c"))


def cohort_config(cdir: Path, models=("abmil",), **overrides) -> dict:
    """The default config with one real (non-demo) cohort ``c`` reading the files under ``cdir``."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["cohorts"] = {"c": {"site": "BRCA", **{k: str(cdir / v) for k, v in FILES.items()}}}
    cfg["run"] = {"cohorts": ["c"], "models": list(models)}
    cfg["results_dir"] = str(cdir.parent / "results")
    for key, val in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **val} if isinstance(val, dict) else val
    return cfg


def check(cfg: dict, *, global_checks: bool = False, **kw):
    return preflight_cohort(copy.deepcopy(cfg), "c", global_checks=global_checks, **kw)


def one_problem(report, *needles):
    """The problem line containing every needle (fails listing them all otherwise)."""
    hits = [p for p in report.problems if all(n in p for n in needles)]
    assert hits, f"no problem with {needles}; problems: {report.problems}"
    return hits[0]


def one_warning(report, *needles):
    hits = [w for w in report.warnings if all(n in w for n in needles)]
    assert hits, f"no warning with {needles}; warnings: {report.warnings}"
    return hits[0]
