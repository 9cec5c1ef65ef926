"""Patient-level split schemes (paper's fixed split, stratified k-fold, imported published splits).

Splitting happens on patients, never slides, so all slides of a patient share a partition by
construction. Patients missing a modality are kept and flagged rather than dropped (fix list 10);
every split, built or imported, goes through ``check_no_leakage`` before it is written.
No torch import: the splits rule is CPU-only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from modaltune.errors import InputError, LeakageError
from modaltune.io_utils import atomic_path, write_json

log = logging.getLogger(__name__)

PARTITIONS = ("train", "val", "test")
SCHEMES = ("fixed", "kfold", "import")
SPLIT_COLUMNS = ["patient_id", "fold", "partition", "site", "flags"]
_TCGA_PATIENT = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(?:-.*)?$", re.IGNORECASE)
_JSON_NAME = re.compile(r"^(train|val|test)_.*\.json$", re.IGNORECASE)
_CSV_FOLD = re.compile(r"splits?_(\d+)\.csv$", re.IGNORECASE)


# -------------------------------------------------------------------------------------------- inputs


def _read_cases(cases) -> pd.DataFrame:
    if isinstance(cases, pd.DataFrame):
        df, where = cases.copy(), "cases table"
    else:
        where = Path(cases)
        if not where.is_file():
            raise InputError(f"{where}: cases table not found; run the clinical_table stage first")
        df = pd.read_parquet(where)
    if "patient_id" not in df.columns and df.index.name == "patient_id":
        df = df.reset_index()
    missing = {"patient_id", "label"} - set(df.columns)
    if missing:
        raise InputError(
            f"{where}: missing column(s) {sorted(missing)} (see docs/ARCHITECTURE.md, cases.parquet)"
        )
    if df["patient_id"].duplicated().any():
        dup = sorted(df.loc[df["patient_id"].duplicated(), "patient_id"].astype(str))[:5]
        raise InputError(f"{where}: patient_id must be unique (one row per patient); duplicated: {dup}")
    df["patient_id"] = df["patient_id"].astype(str)
    df["label"] = pd.to_numeric(df["label"], errors="coerce").fillna(-1).astype(int)
    df["has_rna"] = df["has_rna"].fillna(False).astype(bool) if "has_rna" in df else True
    df["n_slides"] = (
        pd.to_numeric(df["n_slides"], errors="coerce").fillna(0).astype(int) if "n_slides" in df else 1
    )
    df["event"] = pd.to_numeric(df["event"], errors="coerce") if "event" in df else np.nan
    df["site"] = df["site"].fillna("").astype(str) if "site" in df else ""
    return df.sort_values("patient_id").reset_index(drop=True)


def _flags(cases: pd.DataFrame) -> pd.Series:
    def one(row) -> str:
        f = []
        if not row.has_rna:
            f.append("no_rna")
        if row.n_slides <= 0:
            f.append("no_slides")
        if row.label < 0:
            f.append("no_label")
        return ",".join(f)

    return pd.Series([one(r) for r in cases.itertuples()], index=cases.index, dtype=object)


def _relevant(cases: pd.DataFrame) -> pd.Series:
    # paper: RNA available and a subtype class; everyone else only ever trains
    if (cases["label"] >= 0).any():
        return cases["has_rna"] & (cases["label"] >= 0)
    # survival-only cohort (no subtype task): patients with RNA and a known outcome
    log.warning(
        "no patient has a subtype label: splitting patients with RNA and survival, stratified on event"
    )
    return cases["has_rna"] & cases["event"].notna()


def _task_labels(rel: pd.DataFrame) -> np.ndarray:
    if (rel["label"] >= 0).any():
        return rel["label"].to_numpy()
    return rel["event"].to_numpy(dtype=float).astype(int)


def _strata(labels: np.ndarray, events: np.ndarray, min_count: int) -> np.ndarray:
    """label x event when every combination has at least ``min_count`` patients, else label."""
    if not np.isnan(events).any():
        combo = np.array([f"{int(label)}_{int(e)}" for label, e in zip(labels, events, strict=True)])
        if pd.Series(combo).value_counts().min() >= min_count:
            return combo
    return labels


def _stratify_or_none(y: np.ndarray, n_parts: int) -> np.ndarray | None:
    counts = pd.Series(y).value_counts()
    if len(counts) > 1 and counts.min() >= n_parts:
        return y
    log.warning("class counts %s too small to stratify: splitting without stratification", dict(counts))
    return None


# ------------------------------------------------------------------------------------------- schemes


def _fixed(cases: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    from sklearn.model_selection import train_test_split

    rel = cases[_relevant(cases)]
    ids, y = rel["patient_id"].to_numpy(), _task_labels(rel)
    if len(ids) < 3:
        raise InputError(f"only {len(ids)} patients with RNA and a label: too few for a train/val/test split")
    rest, test, y_rest, _ = train_test_split(
        ids, y, test_size=test_fraction, random_state=seed, stratify=_stratify_or_none(y, 2)
    )
    part = dict.fromkeys(cases["patient_id"], "train")
    part.update(dict.fromkeys(test, "test"))
    if val_fraction > 0:
        _, val = train_test_split(
            rest, test_size=val_fraction, random_state=seed, stratify=_stratify_or_none(y_rest, 2)
        )
        part.update(dict.fromkeys(val, "val"))
    return pd.DataFrame({"patient_id": list(part), "fold": 0, "partition": list(part.values())})


def _kfold(cases: pd.DataFrame, n_folds: int, val_fraction: float, seed: int) -> pd.DataFrame:
    from sklearn.model_selection import StratifiedKFold, train_test_split

    if n_folds < 2:
        raise InputError(
            f"n_folds={n_folds}: k-fold needs at least 2 folds (use scheme 'fixed' for one split)"
        )
    rel = cases[_relevant(cases)]
    ids, y = rel["patient_id"].to_numpy(), _task_labels(rel)
    if len(ids) < n_folds:
        raise InputError(f"only {len(ids)} patients with RNA and a label: fewer than n_folds={n_folds}")
    strata = _strata(y, rel["event"].to_numpy(dtype=float), n_folds)
    if pd.Series(strata).value_counts().min() < n_folds:
        log.warning(
            "a class has fewer than %d patients: StratifiedKFold will warn and balance what it can", n_folds
        )
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    frames = []
    for fold, (rest_idx, test_idx) in enumerate(skf.split(ids, strata)):
        part = dict.fromkeys(cases["patient_id"], "train")
        part.update(dict.fromkeys(ids[test_idx], "test"))
        if val_fraction > 0:
            rest_strata = _strata(y[rest_idx], rel["event"].to_numpy(dtype=float)[rest_idx], 2)
            _, val = train_test_split(
                ids[rest_idx],
                test_size=val_fraction,
                random_state=seed + fold,
                stratify=_stratify_or_none(rest_strata, 2),
            )
            part.update(dict.fromkeys(val, "val"))
        frames.append(
            pd.DataFrame({"patient_id": list(part), "fold": fold, "partition": list(part.values())})
        )
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------- import


def _read_sheet(sheet) -> dict[str, str]:
    if sheet is None:
        return {}
    path = Path(sheet)
    if not path.is_file():
        raise InputError(f"{path}: cohort sheet not found (TSV with slide_id, patient_id, path)")
    table = pd.read_csv(path, sep="\t", dtype=str)
    missing = {"slide_id", "patient_id"} - set(table.columns)
    if missing:
        raise InputError(f"{path}: cohort sheet lacks column(s) {sorted(missing)}")
    return dict(zip(table["slide_id"], table["patient_id"], strict=True))


def _import_files(import_path) -> list[Path]:
    if import_path is None:
        raise InputError("scheme 'import' needs import_path (a folder of split files, or a list of files)")
    items = [import_path] if isinstance(import_path, str | os.PathLike) else list(import_path)
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if _JSON_NAME.match(p.name) or _CSV_FOLD.search(p.name))
        elif item.is_file():
            files.append(item)
        else:
            raise InputError(f"{item}: split file or folder not found")
    if not files:
        raise InputError(
            f"{import_path}: no split files ({{train|val|test}}_*.json or splits_{{k}}.csv) found"
        )
    return files


def import_fold_ids(import_path) -> list[int]:
    """Fold numbers an import will produce, from the file names alone (DAG time: nothing is parsed).

    ModalTune JSONs ({train|val|test}_*.json) are one split (fold 0); CLAM/SurvPath CSVs give fold k for
    splits_{k}.csv, otherwise their position in the list (as ``make_splits`` numbers them).
    """
    files = _import_files(import_path)
    csvs = [f for f in files if f.suffix.lower() == ".csv"]
    folds = set()
    for k, f in enumerate(csvs):
        m = _CSV_FOLD.search(f.name)
        folds.add(int(m.group(1)) if m else k)
    if len(csvs) < len(files):
        folds.add(0)
    return sorted(folds)


def _entries_from_json(path: Path, id_type: str) -> list[tuple[int, str, str, str]]:
    """(fold, partition, id, kind) from a ModalTune JSON (bare NaN tokens are valid for Python's json)."""
    m = _JSON_NAME.match(path.name)
    if not m:
        raise InputError(f"{path}: ModalTune split JSONs are named {{train|val|test}}_*.json")
    try:
        records = json.loads(path.read_text())["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f'{path}: expected {{"data": [records]}} ({exc})') from exc
    out = []
    for i, rec in enumerate(records):
        if id_type == "slide" and rec.get("slide_submitter_id"):
            out.append((0, m.group(1).lower(), str(rec["slide_submitter_id"]), "slide"))
        elif rec.get("case_submitter_id"):
            out.append((0, m.group(1).lower(), str(rec["case_submitter_id"]), "patient"))
        elif rec.get("slide_submitter_id"):
            out.append((0, m.group(1).lower(), str(rec["slide_submitter_id"]), "slide"))
        else:
            raise InputError(f"{path}: record {i} has neither case_submitter_id nor slide_submitter_id")
    return out


def _entries_from_csv(path: Path, fold: int) -> list[tuple[int, str, str, str]]:
    table = pd.read_csv(path, dtype=str)
    cols = [c for c in table.columns if str(c).strip().lower() in PARTITIONS]
    if "train" not in [c.strip().lower() for c in cols]:
        raise InputError(
            f"{path}: CLAM/SurvPath split CSVs need columns train, val[, test]; found {list(table.columns)}"
        )
    out = []
    for col in cols:
        for ident in table[col].dropna():
            if str(ident).strip():
                out.append((fold, col.strip().lower(), str(ident).strip(), "auto"))
    return out


def _import(cases: pd.DataFrame, import_path, id_type: str, sheet) -> tuple[pd.DataFrame, dict]:
    if id_type not in ("auto", "patient", "slide"):
        raise InputError(f"id_type={id_type!r}: use 'auto', 'patient' or 'slide'")
    files = _import_files(import_path)
    entries: list[tuple[int, str, str, str]] = []
    csvs = [f for f in files if f.suffix.lower() == ".csv"]
    if csvs and len(csvs) < len(files):
        raise InputError(f"{import_path}: mixes JSON and CSV split files; import one format at a time")
    for f in files:
        if f.suffix.lower() == ".json":
            entries += _entries_from_json(f, id_type)
    for k, f in enumerate(csvs):
        m = _CSV_FOLD.search(f.name)  # splits_{k}.csv -> fold k; other names: fold = position in the list
        entries += _entries_from_csv(f, int(m.group(1)) if m else k)

    slide_to_patient = _read_sheet(sheet)
    known = set(cases["patient_id"])
    rows, unknown, via = [], [], {"patient": 0, "slide_sheet": 0, "barcode": 0}
    for fold, part, ident, kind in entries:
        kind = id_type if id_type != "auto" and kind == "auto" else kind
        patient = None
        if kind in ("patient", "auto") and ident in known:
            patient, how = ident, "patient"
        elif kind in ("slide", "auto") and ident in slide_to_patient:
            patient, how = slide_to_patient[ident], "slide_sheet"
        elif kind in ("slide", "auto") and _TCGA_PATIENT.match(ident):
            patient, how = _TCGA_PATIENT.match(ident).group(1).upper(), "barcode"
        if patient is None or patient not in known:
            unknown.append(ident)
            continue
        via[how] += 1
        rows.append((patient, fold, part))
    df = pd.DataFrame(rows, columns=["patient_id", "fold", "partition"]).drop_duplicates()
    if df.empty:
        raise InputError(
            f"{import_path}: none of the {len(entries)} split ids matches a patient in the cases table"
        )
    listed = set(df["patient_id"])
    report = {
        "files": [str(f) for f in files],
        "n_ids": len(entries),
        "matched_via": via,
        "unknown_ids": sorted(set(unknown)),
        "patients_not_in_split": sorted(known - listed),
    }
    if unknown:
        log.warning(
            "%d split id(s) match no patient (first: %s)", len(set(unknown)), sorted(set(unknown))[:5]
        )
    return df, report


# ---------------------------------------------------------------------------------------- checks


def check_no_leakage(df: pd.DataFrame) -> None:
    """LeakageError when a patient sits in two partitions of the same fold (or a partition is unknown)."""
    bad_parts = set(df["partition"]) - set(PARTITIONS)
    if bad_parts:
        raise InputError(f"split has unknown partition name(s) {sorted(bad_parts)}; use train/val/test")
    n_parts = df.groupby(["fold", "patient_id"])["partition"].nunique()
    leaks = n_parts[n_parts > 1]
    if len(leaks):
        fold, patient = leaks.index[0]
        parts = sorted(df[(df["fold"] == fold) & (df["patient_id"] == patient)]["partition"].unique())
        raise LeakageError(
            f"patient {patient} is in partitions {parts} of fold {fold} "
            f"({len(leaks)} patient-fold pair(s) leak "
            "in total); a patient's slides must all be in one partition"
        )
    dup = df.duplicated(["fold", "patient_id"])
    if dup.any():
        r = df[dup].iloc[0]
        raise LeakageError(f"patient {r.patient_id} appears twice in fold {r.fold}")


def partition_summary(cases, splits) -> pd.DataFrame:
    """Per fold and partition: patients, class counts, events, patients without RNA / slides / label."""
    cases = _read_cases(cases)
    splits = pd.read_parquet(splits) if not isinstance(splits, pd.DataFrame) else splits
    merged = splits[["patient_id", "fold", "partition"]].merge(
        cases[["patient_id", "label", "event", "has_rna", "n_slides"]], on="patient_id", how="left"
    )
    classes = sorted(c for c in cases["label"].unique() if c >= 0)
    rows = []
    for (fold, part), g in merged.groupby(["fold", "partition"], sort=True):
        row = {"fold": int(fold), "partition": part, "n_patients": len(g)}
        for c in classes:
            row[f"n_class_{c}"] = int((g["label"] == c).sum())
        row["n_no_label"] = int((g["label"] < 0).sum())
        row["n_events"] = int(g["event"].fillna(0).sum())
        row["n_missing_rna"] = int((~g["has_rna"].astype(bool)).sum())
        row["n_no_slides"] = int((g["n_slides"] <= 0).sum())
        rows.append(row)
    out = pd.DataFrame(rows)
    order = {p: i for i, p in enumerate(PARTITIONS)}
    return out.sort_values(
        ["fold", "partition"], key=lambda s: s.map(order) if s.name == "partition" else s, ignore_index=True
    )


def _finish(cases: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    info = cases.set_index("patient_id")
    df = df.copy()
    df["fold"] = df["fold"].astype(int)
    df["site"] = df["patient_id"].map(info["site"]).fillna("").astype(str)
    df["flags"] = df["patient_id"].map(_flags(cases).set_axis(cases["patient_id"])).fillna("")
    order = {p: i for i, p in enumerate(PARTITIONS)}
    df = df.sort_values(
        ["fold", "partition", "patient_id"],
        key=lambda s: s.map(order) if s.name == "partition" else s,
        ignore_index=True,
    )
    return df[SPLIT_COLUMNS]


def _write_parquet(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def _write_summary(summary: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        summary.to_csv(tmp, sep="\t", index=False)


# ----------------------------------------------------------------------------------------- stages


def make_splits(
    cases_parquet,
    out_parquet,
    *,
    scheme: str = "kfold",
    n_folds: int = 5,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
    import_path=None,
    id_type: str = "auto",
    sheet=None,
    summary_path=None,
) -> pd.DataFrame:
    """Build (or import) patient-level splits; write ``out_parquet`` (+ summary TSV, + import report).

    Output rows: patient_id, fold, partition (train/val/test), site, flags ("no_rna", "no_slides",
    "no_label", comma-joined). "fixed" = the paper's single split (fold 0); "kfold" = stratified k-fold
    test folds with a stratified val carve-out; patients without RNA or label train in every fold.
    "import" reads ModalTune JSONs or CLAM/SurvPath CSVs; unknown ids and unlisted patients are written
    to ``<out_parquet stem>.import.json``.
    """
    if scheme not in SCHEMES:
        raise InputError(f"split scheme {scheme!r} unknown; use one of {SCHEMES}")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= frac < 1:
            raise InputError(f"{name}={frac}: must be in [0, 1)")
    cases = _read_cases(cases_parquet)
    if scheme == "fixed":
        df = _fixed(cases, val_fraction, test_fraction, seed)
    elif scheme == "kfold":
        df = _kfold(cases, n_folds, val_fraction, seed)
    else:
        df, report = _import(cases, import_path, id_type, sheet)
        check_no_leakage(df)  # stop before anything is written
        out = Path(out_parquet)
        write_json(report, out.with_name(out.stem + ".import.json"))
    df = _finish(cases, df)
    check_no_leakage(df)
    _write_parquet(df, out_parquet)
    if summary_path is not None:
        _write_summary(partition_summary(cases, df), summary_path)
    return df


def combine_site_splits(split_paths: Mapping[str, str | os.PathLike], out_parquet) -> pd.DataFrame:
    """Pan-cancer split = union of per-site splits; each site keeps its own membership."""
    frames = []
    folds: dict[str, set] = {}
    for site, path in split_paths.items():
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: split for site {site} not found")
        df = pd.read_parquet(path)
        missing = {"patient_id", "fold", "partition"} - set(df.columns)
        if missing:
            raise InputError(f"{path}: split lacks column(s) {sorted(missing)}")
        if "site" in df and ((df["site"] != "") & (df["site"] != site)).any():
            raise InputError(
                f"{path}: given as site {site} but its site column says {sorted(set(df['site']) - {''})}"
            )
        df = df.assign(site=site)
        if "flags" not in df:
            df["flags"] = ""
        folds[site] = set(df["fold"])
        frames.append(df[SPLIT_COLUMNS])
    if len({frozenset(f) for f in folds.values()}) > 1:
        raise InputError(
            f"site splits have different folds ({ {s: sorted(f) for s, f in folds.items()} }); "
            "make them with the same scheme and n_folds"
        )
    union = pd.concat(frames, ignore_index=True)
    sites_per_patient = union.groupby("patient_id")["site"].nunique()
    multi = sites_per_patient[sites_per_patient > 1]
    if len(multi):
        p = multi.index[0]
        raise LeakageError(
            f"patient {p} appears in sites {sorted(union.loc[union['patient_id'] == p, 'site'].unique())}"
        )
    check_no_leakage(union)
    union = union.sort_values(["fold", "site", "partition", "patient_id"], ignore_index=True)
    _write_parquet(union, out_parquet)
    return union


def slide_partitions(splits: pd.DataFrame, sheet_rows: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Expand patient splits to slides: (slide_id, patient_id) pairs -> slide_id, patient_id, fold,
    partition."""
    slides = pd.DataFrame(list(sheet_rows), columns=["slide_id", "patient_id"])
    return slides.merge(splits[["patient_id", "fold", "partition"]], on="patient_id", how="inner")
