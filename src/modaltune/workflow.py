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

SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEMO_FILES = {
    "sheet": "cohort_sheet.tsv",
    "rna": "rna/HiSeqV2_PANCAN.gz",
    "gene_sets": "genesets/demo.gmt",
    "clinical": "clinical/clinical.tsv",
    "biospecimen": "biospecimen/slide.tsv",
}


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
    return names


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
    missing = [k for k in DEMO_FILES if not blk.get(k)]
    if missing:
        raise InputError(
            f"config cohorts.{cohort}: missing input paths {missing}; each real cohort needs "
            "sheet, rna, gene_sets, clinical and biospecimen (see config/cohort_example.yaml)"
        )
    return {k: str(blk[k]) for k in DEMO_FILES}


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
    return read_sheet(blk["sheet"])


def read_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """Read a cohort sheet TSV (slide_id, patient_id, path[, mpp]); relative paths are resolved
    against the sheet's folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"cohort sheet {path} does not exist; set cohorts.<name>.sheet in your config")
    try:
        sheet = pd.read_csv(path, sep="\t", dtype={"slide_id": str, "patient_id": str, "path": str})
    except pd.errors.EmptyDataError as exc:
        raise InputError(
            f"cohort sheet {path} is empty (0 bytes); write a TSV with a header slide_id, patient_id, path[, mpp] "
            "and one row per slide (`modaltune sheet SLIDE_DIR > cohort_sheet.tsv` builds one)"
        ) from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"cohort sheet {path}: not a readable tab-separated file ({exc})") from exc
    sheet.columns = [str(c).strip().lstrip("\ufeff") for c in sheet.columns]
    if sheet.empty:
        raise InputError(
            f"cohort sheet {path} has a header but no slides; add one row per slide "
            "(`modaltune sheet SLIDE_DIR > cohort_sheet.tsv` builds one)"
        )
    for col in ("slide_id", "patient_id", "path"):  # stray spaces / Windows line endings around ids
        if col in sheet:
            sheet[col] = sheet[col].map(lambda v: v.strip() if isinstance(v, str) else v)
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
