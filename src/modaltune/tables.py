"""The one checked reader per shared table: cases, splits, cohort sheets and tiles HDF5 attrs.

Every stage that reads one of these files goes through this module, so a bad file gives the same
``InputError`` (naming the file, the column and what to do) wherever it is read. No torch and no
h5py at import time: the workflow parses cohort sheets with it while building the DAG.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from modaltune.errors import InputError, LeakageError

PARTITIONS = ("train", "val", "test")
CASE_COLUMNS = ("patient_id", "label", "survival_months", "event")
SPLIT_COLUMNS = ("patient_id", "fold", "partition")
SHEET_COLUMNS = ("slide_id", "patient_id", "path", "mpp")
SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------------------------ any table


def read_table(path_or_df, what: str, required: Sequence[str]) -> pd.DataFrame:
    """A parquet/TSV/CSV path or a DataFrame, with the ``required`` columns checked; ``patient_id``
    (also taken from the index) as str."""
    if isinstance(path_or_df, pd.DataFrame):
        df, name = path_or_df.copy(), f"<{what} DataFrame>"
    else:
        name = str(path_or_df)
        if not Path(name).is_file():
            raise InputError(f"{what} file {name} not found; run the stage that writes it first")
        if name.endswith((".tsv", ".txt", ".tsv.gz")):
            df = pd.read_csv(name, sep="\t", dtype={"slide_id": str, "patient_id": str})
        elif name.endswith(".csv"):
            df = pd.read_csv(name, dtype={"slide_id": str, "patient_id": str})
        else:
            df = pd.read_parquet(name)
    if "patient_id" not in df.columns and df.index.name == "patient_id":
        df = df.reset_index()
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(
            f"{what} {name}: missing column(s) {missing}; expected at least {list(required)} "
            "(see docs/ARCHITECTURE.md, file formats)"
        )
    if "patient_id" in df.columns:
        df["patient_id"] = df["patient_id"].astype(str)
    return df


# ---------------------------------------------------------------------------------------- cases


def read_cases(cases, required: Sequence[str] = CASE_COLUMNS) -> pd.DataFrame:
    """cases.parquet (or a DataFrame): one row per patient, indexed by patient_id (kept as a column)."""
    df = read_table(cases, "cases", ["patient_id", *[c for c in required if c != "patient_id"]])
    if df["patient_id"].duplicated().any():
        dup = df.loc[df["patient_id"].duplicated(), "patient_id"].tolist()[:5]
        raise InputError(f"cases {cases if not isinstance(cases, pd.DataFrame) else ''}: patient_id must be "
                         f"unique (one row per patient), duplicated: {dup}")
    return df.set_index("patient_id", drop=False)


# --------------------------------------------------------------------------------------- splits


def read_splits(splits, fold: int | None = None) -> pd.DataFrame:
    """splits/{scheme}.parquet rows (of one ``fold`` when given); unknown partitions raise InputError,
    a patient in two partitions of a fold raises ``LeakageError``."""
    df = read_table(splits, "splits", SPLIT_COLUMNS)
    df["fold"] = df["fold"].astype(int)
    if fold is not None:
        folds = sorted(df["fold"].unique().tolist())
        df = df[df["fold"] == int(fold)]
        if df.empty:
            raise InputError(
                f"splits: fold {fold} not present (folds: {folds}); use a fold the split scheme made"
            )
    bad = sorted(set(df["partition"]) - set(PARTITIONS))
    if bad:
        raise InputError(f"splits: unknown partition(s) {bad}; allowed {list(PARTITIONS)}")
    counts = df.groupby(["fold", "patient_id"])["partition"].nunique()
    leaked = counts[counts > 1].index.get_level_values("patient_id").tolist()
    if leaked or df.duplicated(["fold", "patient_id"]).any():
        raise LeakageError(
            f"splits fold {fold}: patient(s) {leaked[:5] or 'duplicated'} appear more than once"
        )
    return df


# --------------------------------------------------------------------------------- cohort sheets


def read_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """A cohort sheet TSV (slide_id, patient_id, path[, mpp]) indexed by slide_id (kept as a column);
    relative slide paths are resolved against the sheet's folder."""
    path = Path(path)
    if not path.is_file():
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
    return check_sheet(sheet, str(path))


def check_sheet(sheet: pd.DataFrame, where: str) -> pd.DataFrame:
    """Validate a cohort sheet frame; returns it indexed by slide_id with columns SHEET_COLUMNS."""
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
    sheet = sheet.astype({"slide_id": str, "patient_id": str})
    return sheet.set_index("slide_id", drop=False)[list(SHEET_COLUMNS)]


def read_sheets(sheet) -> pd.DataFrame:
    """One or several cohort sheets (pan-cancer: one per site) as one slide table (RangeIndex).

    Accepts a path, a list of paths, or a DataFrame with at least slide_id and patient_id (tests and
    notebooks build sheets in memory; slide paths are then optional).
    """
    if isinstance(sheet, pd.DataFrame):
        df = read_table(sheet, "cohort sheet", ["slide_id", "patient_id"]).astype({"slide_id": str})
        return df.reset_index(drop=True)
    if isinstance(sheet, (list, tuple)):
        if not sheet:
            raise InputError("cohort sheet: an empty list was given; pass the cohort's sheet TSV")
        frames = [read_sheets(s) for s in sheet]
        return pd.concat(frames, ignore_index=True).drop_duplicates(["slide_id", "patient_id"])
    return read_sheet(sheet).reset_index(drop=True)


# ---------------------------------------------------------------------------------- tiles HDF5


def attr_value(v: Any) -> Any:
    """HDF5 attrs -> plain python (for comparisons and returned dicts)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def read_tiles_attrs(tiles_h5: str | os.PathLike) -> dict:
    """Attrs of a tiles HDF5 (plain python values, plus ``_has_coords``); InputError naming the file
    when it is missing, unreadable, not written by modaltune tiling, or "ok" without coords."""
    import h5py

    path = Path(tiles_h5)
    if not path.is_file():
        raise InputError(f"tiles file {path} not found: run the tiling step for this slide first")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: attr_value(v) for k, v in f.attrs.items()}
            attrs["_has_coords"] = "coords" in f
    except OSError as exc:
        raise InputError(f"tiles file {path} is not a readable HDF5 file ({exc}); delete it and re-run "
                         "tiling") from exc
    if "status" not in attrs:
        raise InputError(f"tiles file {path}: attribute 'status' missing; it was not written by "
                         "modaltune tiling (re-run tiling)")
    if attrs["status"] == "ok" and not attrs["_has_coords"]:
        raise InputError(f"tiles file {path}: status 'ok' but no 'coords' dataset; re-run tiling")
    return attrs


def read_tiles(tiles_h5: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(coords, coords_target, attrs) of a tiles HDF5, checked by :func:`read_tiles_attrs` and for the
    attrs a tile reader needs."""
    import h5py

    attrs = read_tiles_attrs(tiles_h5)
    missing = [k for k in ("slide_path", "read_level", "read_size", "patch_size") if k not in attrs]
    if missing:
        raise InputError(f"{tiles_h5}: attrs {missing} missing; rerun the tile stage for this slide")
    try:
        with h5py.File(tiles_h5, "r") as f:
            coords = np.asarray(f["coords"][:], np.int64).reshape(-1, 2)
            coords_t = np.asarray(f["coords_target"][:], np.int64).reshape(-1, 2)
    except (OSError, KeyError) as e:
        raise InputError(f"{tiles_h5}: not a readable tiles HDF5 ({e}); rerun the tile stage for this "
                         "slide") from e
    return coords, coords_t, attrs


__all__ = ["attr_value", "check_sheet", "read_cases", "read_sheet", "read_sheets", "read_splits", "read_table",
           "read_tiles", "read_tiles_attrs"]
