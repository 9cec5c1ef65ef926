"""Helpers shared by the Snakefile and the workflow scripts (config resolution, sheets, logs).

Kept free of torch so that parsing the DAG (``snakemake -n``) stays fast for large cohorts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from modaltune.demo import DEMO_FILES
from modaltune.errors import InputError
from modaltune.models.registry import needs_slides, needs_text
from modaltune.splits import import_fold_ids
from modaltune.tables import check_sheet, read_sheet

COHORT_INPUTS = tuple(DEMO_FILES)  # input files of a real cohort, named like the demo's
SLIDE_FILES = ("sheet", "biospecimen")  # optional: a cohort of RNA + clinical only has neither


def target_cohorts(config: dict) -> list[str]:
    """Cohorts whose summary tables ``rule all`` asks for (``run.cohorts``).

    Config files are merged key by key, so cohort definitions accumulate across --configfile's;
    lists replace each other, hence the selection is a list.
    """
    names = list(config["run"]["cohorts"])
    known = set(config["cohorts"]) | set(config.get("pancancer") or {})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"config run.cohorts: {unknown} are neither in cohorts: nor in pancancer:")
    return names


def target_models(config: dict) -> list[str]:
    names = list(config["run"]["models"])
    unknown = [n for n in names if n not in config["models"]]
    if unknown:
        raise InputError(f"config run.models: {unknown} have no block under models:")
    check_models_fit_cohorts(config, names)
    return names


def fold_ids(config: dict) -> list[int]:
    """Folds the split scheme makes: fixed -> [0]; kfold -> 0..n_folds-1; import -> read from the files."""
    splits = config["splits"]
    if splits["scheme"] == "fixed":
        return [0]
    if splits["scheme"] == "import":
        return import_fold_ids(splits.get("import_path"))
    return list(range(int(splits["n_folds"])))


def model_needs_text(config: dict, model: str) -> bool:
    """Only models trained with the text_kl objective read the fold's text targets."""
    blk = config["models"][model]
    return needs_text(blk.get("arch", model), blk)


def model_needs_slides(config: dict, model: str) -> bool:
    blk = config["models"][model]
    return needs_slides(blk.get("arch", model), blk)


def site_cohorts(config: dict) -> list[str]:
    """Site cohorts the DAG needs: the targets, pan-cancer members and both sides of OOD pairs."""
    pan = pancancer_members(config)
    needed: list[str] = []
    for name in target_cohorts(config):
        needed += pan.get(name, [name])
    for pair in config.get("ood") or []:
        for side in ("train", "eval"):
            needed += pan.get(pair[side], [pair[side]])
    missing = [c for c in needed if c not in config["cohorts"]]
    if missing:
        raise InputError(f"config: cohorts {missing} are used (run.cohorts / ood) but not defined under cohorts:")
    return list(dict.fromkeys(needed))


def pancancer_members(config: dict) -> dict[str, list[str]]:
    pan = dict(config.get("pancancer") or {})
    for name, members in pan.items():
        unknown = [m for m in members if m not in config["cohorts"]]
        if unknown:
            raise InputError(f"config pancancer.{name}: unknown cohorts {unknown}; define them under cohorts:")
        if name in config["cohorts"]:
            raise InputError(f"config pancancer.{name}: the name is also a site cohort; pick another name")
    return pan


def demo_cohorts(config: dict) -> list[str]:
    return [c for c in site_cohorts(config) if config["cohorts"][c].get("demo")]


def demo_dir(config: dict, cohort: str) -> str:
    return f"{config.get('demo_dir', 'resources/demo')}/{cohort}"


def cohort_inputs(config: dict, cohort: str) -> dict[str, str]:
    """Input file paths of a site cohort; demo cohorts point at the generated files."""
    blk = config["cohorts"][cohort]
    if blk.get("demo"):
        base = demo_dir(config, cohort)
        return {k: f"{base}/{v}" for k, v in DEMO_FILES.items()}
    missing = [k for k in COHORT_INPUTS if not blk.get(k) and k not in SLIDE_FILES]
    if missing:
        raise InputError(
            f"config cohorts.{cohort}: missing input paths {missing}; each real cohort needs "
            "rna, gene_sets and clinical, plus sheet and biospecimen when it has slides "
            "(see config/cohort_example.yaml)"
        )
    return {k: str(blk[k]) for k in DEMO_FILES if blk.get(k)}


def cohort_has_slides(config: dict, cohort: str) -> bool:
    """A demo cohort always has slides; a real one when its block names a cohort sheet."""
    blk = config["cohorts"][cohort]
    return bool(blk.get("demo") or blk.get("sheet"))


def check_models_fit_cohorts(config: dict, models: list[str]) -> None:
    """A cohort without a slide sheet (RNA + clinical only) can run only models that read no slides."""
    slideless = [c for c in site_cohorts(config) if not cohort_has_slides(config, c)]
    if not slideless:
        return
    slide_models = [m for m in models if model_needs_slides(config, m)]
    if slide_models:
        ok = [m for m in models if m not in slide_models]
        raise InputError(
            f"config run.models: {slide_models} need slides, but cohort(s) {slideless} have no slide sheet "
            f"(cohorts.<name>.sheet); set run.models to models without slides (here: {ok or 'mlp, snn, gene_mixer'}) "
            "or give the cohort a sheet"
        )


def load_sheet(config: dict, cohort: str) -> pd.DataFrame:
    """The cohort sheet indexed by slide_id with columns patient_id, path, mpp."""
    blk = config["cohorts"][cohort]
    if blk.get("demo"):
        from modaltune.demo import demo_sheet

        d = blk["demo"]
        base = demo_dir(config, cohort)
        sheet = demo_sheet(int(d.get("n_patients", 40)), int(d.get("seed", 0)), out_dir=base)
        sheet = sheet.assign(path=[f"{base}/{p}" for p in sheet["path"]])
        return check_sheet(sheet, f"demo cohort {cohort}")
    if not blk.get("sheet"):  # RNA + clinical only: no slides
        return check_sheet(pd.DataFrame(columns=["slide_id", "patient_id", "path", "mpp"]), f"cohort {cohort}")
    return read_sheet(blk["sheet"])


def config_digest(config: dict) -> str:
    """Short sha256 of the whole config (a param that reruns the preflight on any config edit)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def limit_threads(n: int) -> None:
    """Use the job's declared threads only: oversubscribed BLAS/OpenMP threads on a shared node
    make small PyTorch ops orders of magnitude slower and results depend on the thread count."""
    n = max(1, int(n))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


@contextlib.contextmanager
def log_to(path: str | os.PathLike | None) -> Iterator[None]:
    """Send stdout, stderr and the logging module to a rule's log file."""
    if path is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as fh:
        root = logging.getLogger()
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = fh
        try:
            yield
        except BaseException:
            logging.getLogger("modaltune").exception("rule failed")
            raise
        finally:
            sys.stdout, sys.stderr = old_out, old_err
            root.removeHandler(handler)
