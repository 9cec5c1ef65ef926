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
from modaltune.tables import read_cases, read_sheet

log = logging.getLogger(__name__)

PARTITIONS = ("train", "val", "test")
SCHEMES = ("fixed", "kfold", "import")
SPLIT_COLUMNS = ["patient_id", "fold", "partition", "site", "flags"]
_TCGA_PATIENT = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(?:-.*)?$", re.IGNORECASE)
_JSON_NAME = re.compile(r"^(train|val|test)_.*\.json$", re.IGNORECASE)
_CSV_FOLD = re.compile(r"splits?_(\d+)\.csv$", re.IGNORECASE)


# -------------------------------------------------------------------------------------------- inputs


def _read_cases(cases) -> pd.DataFrame:
    df = read_cases(cases, required=("patient_id", "label")).reset_index(drop=True)
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


def _carve(ids: np.ndarray, candidates: Sequence[np.ndarray], fraction: float, seed: int, what: str):
    """``train_test_split(ids, test_size=fraction)`` stratified on the first feasible candidate.

    A stratified split needs every stratum twice and at least one patient per stratum on each side
    (scikit-learn: "test_size = 3 should be greater or equal to the number of classes = 4"); small
    cohorts fail that for label x event strata, so fall back to the label, then to no stratification,
    and log which was used.
    """
    from sklearn.model_selection import train_test_split

    n = len(ids)
    n_out = int(np.ceil(fraction * n))
    if n < 2 or n_out < 1 or n_out >= n:
        raise InputError(
            f"splits: {what} of {n} patients with fraction {fraction}: too few patients; "
            "lower splits.val_fraction/test_fraction or n_folds, or add patients"
        )
    for y in candidates:
        counts = pd.Series(y).value_counts()
        if len(counts) > 1 and counts.min() >= 2 and n_out >= len(counts) and n - n_out >= len(counts):
            return train_test_split(ids, test_size=n_out, random_state=seed, stratify=y)
    log.warning(
        "%s: %d of %d patients cannot be stratified on %s; splitting without stratification",
        what, n_out, n, [dict(pd.Series(y).value_counts()) for y in candidates],
    )
    return train_test_split(ids, test_size=n_out, random_state=seed, stratify=None)


# ------------------------------------------------------------------------------------------- schemes


def _fixed(cases: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    rel = cases[_relevant(cases)]
    ids, y = rel["patient_id"].to_numpy(), _task_labels(rel)
    if len(ids) < 3:
        raise InputError(f"only {len(ids)} patients with RNA and a label: too few for a train/val/test split")
    label_of = dict(zip(ids, y, strict=True))
    rest, test = _carve(ids, [y], test_fraction, seed, "test split")
    part = dict.fromkeys(cases["patient_id"], "train")
    part.update(dict.fromkeys(test, "test"))
    if val_fraction > 0:
        _, val = _carve(rest, [np.array([label_of[p] for p in rest])], val_fraction, seed, "val carve-out")
        part.update(dict.fromkeys(val, "val"))
    return pd.DataFrame({"patient_id": list(part), "fold": 0, "partition": list(part.values())})


def _kfold(cases: pd.DataFrame, n_folds: int, val_fraction: float, seed: int) -> pd.DataFrame:
    from sklearn.model_selection import KFold, StratifiedKFold

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
    if pd.Series(strata).value_counts().max() >= n_folds:
        folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(ids, strata)
    else:  # no class reaches n_folds patients: StratifiedKFold would refuse
        log.warning("no class has %d patients: test folds are not stratified", n_folds)
        folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(ids)
    events = rel["event"].to_numpy(dtype=float)
    frames = []
    for fold, (rest_idx, test_idx) in enumerate(folds):
        part = dict.fromkeys(cases["patient_id"], "train")
        part.update(dict.fromkeys(ids[test_idx], "test"))
        if val_fraction > 0:
            candidates = [_strata(y[rest_idx], events[rest_idx], 2), y[rest_idx]]
            _, val = _carve(ids[rest_idx], candidates, val_fraction, seed + fold, f"fold {fold} val carve-out")
            part.update(dict.fromkeys(val, "val"))
        frames.append(
            pd.DataFrame({"patient_id": list(part), "fold": fold, "partition": list(part.values())})
        )
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------- import


def _read_sheet(sheet) -> dict[str, str]:
    if sheet is None:
        return {}
    table = read_sheet(sheet)
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


def import_split_files(import_path) -> list[str]:
    """The split files scheme 'import' reads (inputs of the splits rule: editing one reruns it)."""
    return [str(f) for f in _import_files(import_path)]


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
    classes = sorted(int(c) for c in cases["label"].unique() if c >= 0)
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
    out["notes"] = [
        "; ".join(_partition_notes(row, classes)) for row in out.to_dict("records")
    ] if len(out) else []
    order = {p: i for i, p in enumerate(PARTITIONS)}
    return out.sort_values(
        ["fold", "partition"], key=lambda s: s.map(order) if s.name == "partition" else s, ignore_index=True
    )


def _partition_notes(row: Mapping, classes: Sequence[int]) -> list[str]:
    """Why a metric of this partition will be empty (one class, no events), in words."""
    notes = []
    present = [c for c in classes if row.get(f"n_class_{c}", 0) > 0]
    if classes and len(present) < len(classes):
        missing = [c for c in classes if c not in present]
        if row["partition"] == "train":
            notes.append(f"class(es) {missing} absent from train: the classifier never sees them")
        elif len(present) == 1:
            notes.append(f"only class {present[0]}: AUC/balanced accuracy undefined")
        elif present:
            notes.append(f"class(es) {missing} absent")
    if row["n_patients"] > 0 and row["n_events"] == 0:
        notes.append("no events (all censored): c-index undefined" if row["partition"] != "train"
                     else "no events in train: the Cox probe cannot be fitted")
    return notes


def split_notes(summary: pd.DataFrame) -> list[str]:
    """One line per fold/partition with a note (from ``partition_summary``)."""
    if "notes" not in summary:
        return []
    return [
        f"fold {int(r.fold)} {r.partition}: {r.notes}" for r in summary.itertuples() if r.notes
    ]


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
    summary = partition_summary(cases, df)
    for note in split_notes(summary):
        log.warning("splits: %s", note)
    _write_parquet(df, out_parquet)
    if summary_path is not None:
        _write_summary(summary, summary_path)
    return df
