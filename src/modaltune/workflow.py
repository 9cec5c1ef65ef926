"""Helpers shared by the Snakefile and the workflow scripts (config resolution, sheets, logs).

Kept free of torch so that parsing the DAG (``snakemake -n``) stays fast for large cohorts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from modaltune.errors import InputError
from modaltune.models.registry import needs_slides, needs_text
from modaltune.splits import import_fold_ids

SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEMO_FILES = {
    "sheet": "cohort_sheet.tsv",
    "rna": "rna/HiSeqV2_PANCAN.gz",
    "gene_sets": "genesets/demo.gmt",
    "clinical": "clinical/clinical.tsv",
    "biospecimen": "biospecimen/slide.tsv",
}
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
    missing = [k for k in DEMO_FILES if not blk.get(k) and k not in SLIDE_FILES]
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
        return _check_sheet(sheet, f"demo cohort {cohort}")
    if not blk.get("sheet"):  # RNA + clinical only: no slides
        return _check_sheet(pd.DataFrame(columns=["slide_id", "patient_id", "path", "mpp"]), f"cohort {cohort}")
    return read_sheet(blk["sheet"])


def read_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """Read a cohort sheet TSV (slide_id, patient_id, path[, mpp]); relative paths are resolved
    against the sheet's folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"cohort sheet {path} does not exist; set cohorts.<name>.sheet in your config")
    sheet = pd.read_csv(path, sep="\t", dtype={"slide_id": str, "patient_id": str, "path": str})
    base = path.parent
    if "path" in sheet:
        sheet["path"] = [p if os.path.isabs(p) else os.path.normpath(base / p) for p in sheet["path"]]
    return _check_sheet(sheet, str(path))


def _check_sheet(sheet: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = {"slide_id", "patient_id", "path"} - set(sheet.columns)
    if missing:
        raise InputError(f"{where}: missing column(s) {sorted(missing)}; a cohort sheet is a TSV with "
                         "slide_id, patient_id, path and optional mpp")
    if sheet["slide_id"].duplicated().any():
        dup = sheet.loc[sheet["slide_id"].duplicated(), "slide_id"].tolist()[:5]
        raise InputError(f"{where}: duplicated slide_id values {dup}; slide ids must be unique")
    bad = [s for s in sheet["slide_id"] if not SLIDE_ID.match(str(s))][:5]
    if bad:
        raise InputError(f"{where}: slide_id values {bad} contain characters other than letters, digits, "
                         "'_', '.', '-'; rename them (they become file names)")
    if sheet["patient_id"].isna().any():
        raise InputError(f"{where}: empty patient_id for some slides; every slide needs its patient")
    if "mpp" not in sheet:
        sheet = sheet.assign(mpp=float("nan"))
    return sheet.set_index("slide_id", drop=False)[["slide_id", "patient_id", "path", "mpp"]]


def combined_sheet(paths: list[str] | str | pd.DataFrame) -> pd.DataFrame:
    """Concatenate several cohort sheets (pan-cancer) into one slide_id -> patient_id table."""
    if isinstance(paths, pd.DataFrame):
        return paths
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return pd.concat([read_sheet(p) for p in paths], ignore_index=True)


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
