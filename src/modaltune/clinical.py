"""GDC clinical + biospecimen exports -> one row per patient: labels, survival, staging, covariates.

Reads both GDC TSV layouts: the old flat export (``case_submitter_id``, ``vital_status``, ...) that the
ModalTune scripts assume, and the current portal export with dotted names (``cases.submitter_id``,
``demographic.vital_status``, ``diagnoses.ajcc_pathologic_stage``, ...). GDC writes missing values as the
literal ``'--``. No torch here: this module runs in CPU-only workflow rules.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from modaltune.errors import InputError
from modaltune.io_utils import atomic_path, write_json
from modaltune.tables import read_sheet

log = logging.getLogger(__name__)

DAYS_PER_MONTH = 30.44
GDC_MISSING = ["'--", "--"]

# canonical name -> accepted column names, old flat export first, then the current dotted export.
CLINICAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "patient_id": ("case_submitter_id", "cases.submitter_id"),
    "case_id": ("case_id", "cases.case_id"),
    "project_id": ("project_id", "project.project_id", "cases.project_id"),
    "primary_diagnosis": ("primary_diagnosis", "diagnoses.primary_diagnosis"),
    "vital_status": ("vital_status", "demographic.vital_status"),
    "days_to_death": ("days_to_death", "demographic.days_to_death"),
    "days_to_last_follow_up": ("days_to_last_follow_up", "diagnoses.days_to_last_follow_up"),
    "age_at_index": ("age_at_index", "demographic.age_at_index"),
    "stage": ("ajcc_pathologic_stage", "diagnoses.ajcc_pathologic_stage"),
    "t": ("ajcc_pathologic_t", "diagnoses.ajcc_pathologic_t"),
    "n": ("ajcc_pathologic_n", "diagnoses.ajcc_pathologic_n"),
    "m": ("ajcc_pathologic_m", "diagnoses.ajcc_pathologic_m"),
    "year_of_diagnosis": ("year_of_diagnosis", "diagnoses.year_of_diagnosis"),
    "treatment_type": ("treatment_type", "treatments.treatment_type", "diagnoses.treatments.treatment_type"),
    # only used to put the primary diagnosis first when a case has several diagnosis rows
    "classification_of_tumor": ("classification_of_tumor", "diagnoses.classification_of_tumor"),
    "diagnosis_is_primary_disease": (
        "diagnosis_is_primary_disease",
        "diagnoses.diagnosis_is_primary_disease",
    ),
}
REQUIRED_CLINICAL = (
    "patient_id",
    "case_id",
    "project_id",
    "primary_diagnosis",
    "vital_status",
    "days_to_death",
    "days_to_last_follow_up",
)
BIOSPECIMEN_COLUMNS: dict[str, tuple[str, ...]] = {
    "patient_id": ("case_submitter_id", "cases.submitter_id"),
    "case_id": ("case_id", "cases.case_id"),
    "slide_id": ("slide_submitter_id", "slides.submitter_id"),
}
CASES_COLUMNS = (
    "patient_id",
    "case_id",
    "project_id",
    "site",
    "primary_diagnosis",
    "label",
    "survival_months",
    "event",
    "stage",
    "t",
    "n",
    "m",
    "age",
    "has_rna",
    "n_slides",
)

# ---------------------------------------------------------------------------------------------
# Labels (method 1.1 + 1.5). Keys: diagnosis after normalise_diagnosis (lower case).
DEFAULT_LABEL_MAPS: dict[str, dict[str, int]] = {
    "BRCA": {"infiltrating duct carcinoma": 0, "lobular carcinoma": 1},
    "GBMLGG": {
        "glioblastoma": 0,
        "mixed glioma": 1,
        "oligodendroglioma": 1,
        "oligodendroglioma, anaplastic": 1,
        "astrocytoma": 1,
        "astrocytoma, anaplastic": 1,
    },
    "NSCLC": {"lung adenocarcinoma": 0, "lung squamous cell carcinoma": 1},
    "RCC": {
        "papillary renal cell carcinoma": 0,
        "clear cell renal cell carcinoma": 1,
        "chromophobe renal cell carcinoma": 2,
    },
    "BLCA": {"transitional cell carcinoma": 0, "papillary transitional cell carcinoma": 1},
    "COADREAD": {"colon adenocarcinoma": 0, "rectal adenocarcinoma": 1},
    "UCEC": {
        "endometrioid adenocarcinoma": 0,
        "serous cystadenocarcinoma": 1,
        "papillary serous cystadenocarcinoma": 1,
    },
}
# Synonyms folded into a class name before the map lookup (lower case, ", NOS" already stripped).
DIAGNOSIS_SYNONYMS: dict[str, dict[str, str]] = {
    "NSCLC": {
        "adenocarcinoma with mixed subtypes": "adenocarcinoma",
        "squamous cell carcinoma, keratinizing": "squamous cell carcinoma",
        "squamous cell carcinoma, large cell, nonkeratinizing": "squamous cell carcinoma",
    },
    "COADREAD": {"adenocarcinoma with mixed subtypes": "adenocarcinoma"},
    "RCC": {
        "papillary adenocarcinoma": "papillary renal cell carcinoma",
        "clear cell adenocarcinoma": "clear cell renal cell carcinoma",
        "renal cell carcinoma": "clear cell renal cell carcinoma",
        "renal cell carcinoma, chromophobe type": "chromophobe renal cell carcinoma",
    },
    "BLCA": {"papillary adenocarcinoma": "papillary transitional cell carcinoma"},
}
COADREAD_PREFIX = {"TCGA-COAD": "colon", "TCGA-READ": "rectal"}


def _nos_stripped(raw: str) -> str:
    return re.sub(r",\s*nos\b", "", raw.strip().lower()).strip()


def normalise_diagnosis(raw, cohort: str, project_id: str | None = None) -> str | None:
    """GDC ``primary_diagnosis`` -> the lower-case string used for labels and prompts (method 1.5).

    ", NOS" is stripped, per-cohort synonyms are folded in, NSCLC diagnoses get the prefix "lung " and
    COADREAD ones "colon "/"rectal " by project. Missing -> None.
    """
    if raw is None or (isinstance(raw, float) and np.isnan(raw)) or str(raw).strip() in ("", *GDC_MISSING):
        return None
    text = _nos_stripped(str(raw))
    if text in ("not reported", "unknown"):
        return None
    code = cohort.upper()
    text = DIAGNOSIS_SYNONYMS.get(code, {}).get(text, text)
    if code == "NSCLC" and not text.startswith("lung "):
        text = f"lung {text}"
    elif code == "COADREAD":
        prefix = COADREAD_PREFIX.get(str(project_id).upper())
        if prefix and not text.startswith(prefix + " "):
            text = f"{prefix} {text}"
    return text


def resolve_label_map(cohort: str, label_map: Mapping | None = None) -> dict[str, int]:
    """The diagnosis -> class map for ``cohort``: the config override if given, else the default.

    ``label_map`` may be ``{cohort: {diagnosis: class}}`` (several cohorts) or ``{diagnosis: class}``
    (this cohort). Keys are matched lower case; classes must be integers >= -1.
    """
    code = cohort.upper()
    if label_map:
        if all(isinstance(v, Mapping) for v in label_map.values()):
            per_cohort = {str(k).upper(): v for k, v in label_map.items()}
            chosen = per_cohort.get(code)
        else:
            chosen = label_map
        if chosen is not None:
            out = {}
            for diag, cls in chosen.items():
                if isinstance(cls, bool) or not isinstance(cls, (int, np.integer)) or int(cls) < -1:
                    raise InputError(
                        f"config label_map for cohort {code}: class of {diag!r} is {cls!r}; "
                        "use an integer class id (0, 1, ...; -1 = not in the subtype task)"
                    )
                out[_nos_stripped(str(diag))] = int(cls)
            return out
    return dict(DEFAULT_LABEL_MAPS.get(code, {}))


def diagnosis_label(diagnosis: str | None, raw, mapping: Mapping[str, int]) -> int:
    """Class id of a normalised diagnosis (the raw ", NOS"-stripped string also matches); -1 if unknown."""
    if diagnosis is None:
        return -1
    if diagnosis in mapping:
        return int(mapping[diagnosis])
    raw_key = _nos_stripped(str(raw))
    return int(mapping.get(raw_key, -1))


# ---------------------------------------------------------------------------------------------
# Staging (method 1.6): sub-letters and (i+)/(mol+)/mi suffixes dropped, Tis counted as T0.
STAGES = ("I", "II", "III", "IV", "X")
T_VALUES = ("T0", "T1", "T2", "T3", "T4", "TX")
N_VALUES = ("N0", "N1", "N2", "N3", "NX")
M_VALUES = ("M0", "M1", "MX")


def _blank(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    text = str(value).strip()
    if text in ("", *GDC_MISSING) or text.lower() in ("not reported", "unknown", "nan", "none"):
        return None
    return text


def normalise_stage(value) -> str | None:
    """ "Stage IIIA" -> "III"; one of I, II, III, IV, X, else None."""
    text = _blank(value)
    if text is None:
        return None
    text = re.sub(r"^stage\s*", "", text, flags=re.IGNORECASE).upper().replace(" ", "")
    if text != "X":
        text = re.sub(r"[ABCD]\d*$", "", text)
    return text if text in STAGES else None


def _tnm(value, letter: str, max_digit: int) -> str | None:
    text = _blank(value)
    if text is None:
        return None
    # clinical/pathological/post-therapy prefixes (cM0, pT2, ypN1) carry no extra category
    text = re.sub(r"^(yp|yc|p|c|y)(?=[TNMtnm])", "", text).upper().replace(" ", "")
    if letter == "T" and text.startswith("TIS"):
        return "T0"
    match = re.match(rf"^{letter}([0-9X])", text)
    if not match:
        return None
    digit = match.group(1)
    if digit != "X" and int(digit) > max_digit:
        return None
    return f"{letter}{digit}"


def normalise_t(value) -> str | None:
    """T: "T2a" -> "T2", "Tis" -> "T0", "TX" -> "TX"; else None."""
    return _tnm(value, "T", 4)


def normalise_n(value) -> str | None:
    """N: "N0 (i+)" / "N1mi" / "N2a" -> "N0" / "N1" / "N2"; "NX"; else None."""
    return _tnm(value, "N", 3)


def normalise_m(value) -> str | None:
    """M: "cM0 (i+)" -> "M0", "M1b" -> "M1", "MX"; else None."""
    return _tnm(value, "M", 1)


# ---------------------------------------------------------------------------------------------
# Readers


def _resolve(frame: pd.DataFrame, spec: Mapping[str, tuple[str, ...]], required: Iterable[str], path):
    """canonical -> column name found in ``frame``; InputError naming the file for a missing required one."""
    found = {}
    for canonical, candidates in spec.items():
        for col in candidates:
            if col in frame.columns:
                found[canonical] = col
                break
    missing = [c for c in required if c not in found]
    if missing:
        wanted = "; ".join(f"{c} (one of {', '.join(spec[c])})" for c in missing)
        shown = ", ".join(map(str, list(frame.columns)[:40]))
        more = f" ... ({len(frame.columns)} columns)" if len(frame.columns) > 40 else ""
        raise InputError(
            f"{path}: missing required column(s) {wanted}. Found: {shown}{more}. "
            "Give the GDC clinical/biospecimen TSV export (old flat or current dotted column names)."
        )
    return found


def read_gdc_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """A GDC TSV export as strings, with the literal ``'--`` (and empty cells) read as missing."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; point the cohort config at the GDC TSV export")
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, na_values=GDC_MISSING, keep_default_na=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{path}: not a readable tab-separated GDC export ({exc})") from exc
    frame.columns = [str(c).strip().lstrip("\ufeff") for c in frame.columns]
    return frame


def read_clinical_tsv(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Clinical TSV (either schema) -> rows with canonical column names (possibly several per case).

    Returns the frame and ``info`` (schema, missing optional columns, rows without a case id).
    """
    raw = read_gdc_tsv(path)
    cols = _resolve(raw, CLINICAL_COLUMNS, REQUIRED_CLINICAL, path)
    frame = pd.DataFrame({canonical: raw[col] for canonical, col in cols.items()})
    for canonical in CLINICAL_COLUMNS:
        if canonical not in frame:
            frame[canonical] = pd.Series(pd.NA, index=frame.index, dtype=object)
    for col in frame.columns:
        frame[col] = frame[col].map(lambda v: v.strip() if isinstance(v, str) else v)
    no_id = frame["patient_id"].isna()
    info = {
        "schema": "dotted" if "." in cols["patient_id"] else "flat",
        "missing_optional_columns": sorted(set(CLINICAL_COLUMNS) - set(cols)),
        "rows_without_patient_id": int(no_id.sum()),
        "n_rows": len(frame),
    }
    if len(frame) == 0 or no_id.all():
        raise InputError(f"{path}: no rows with a case_submitter_id; is this the clinical.tsv of the cohort?")
    return frame[~no_id].reset_index(drop=True), info


def read_biospecimen_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """GDC biospecimen ``slide.tsv`` (either schema) -> unique (patient_id, case_id, slide_id) rows."""
    raw = read_gdc_tsv(path)
    cols = _resolve(raw, BIOSPECIMEN_COLUMNS, ("patient_id", "slide_id"), path)
    frame = pd.DataFrame({canonical: raw[col] for canonical, col in cols.items()})
    return frame.dropna(subset=["patient_id", "slide_id"]).drop_duplicates().reset_index(drop=True)


def read_cohort_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """Cohort sheet TSV (slide_id, patient_id, path[, mpp]), validated like the workflow's."""
    return read_sheet(path).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# One row per case


def _primary_first(rows: pd.DataFrame) -> pd.DataFrame:
    """Stable reorder so diagnosis rows flagged primary come before metastasis/recurrence rows."""
    flag = rows["classification_of_tumor"].astype("string").str.lower().eq("primary") | rows[
        "diagnosis_is_primary_disease"
    ].astype("string").str.lower().eq("true")
    order = np.argsort(~flag.fillna(False).to_numpy(bool), kind="stable")
    return rows.iloc[order]


def collapse_cases(rows: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Several rows per case (one per treatment / diagnosis / follow-up) -> one row per patient.

    Rule: rows flagged as the primary diagnosis come first, then every field takes its first non-missing
    value in file order, except ``days_to_last_follow_up`` (the latest, i.e. largest, follow-up) and
    ``treatment_type`` (sorted unique values joined by "; "). Fields with more than one distinct
    non-missing value are reported as conflicts ``{field: {patient: [values]}}``.
    """
    rows = _primary_first(rows)
    grouped = rows.groupby("patient_id", sort=True, dropna=True)
    out = grouped.first()  # first non-null per column
    conflicts: dict[str, dict[str, list[str]]] = {}
    nunique = grouped.nunique(dropna=True)
    skip = {"treatment_type", "classification_of_tumor", "diagnosis_is_primary_disease"}
    for field in nunique.columns:
        if field in skip:
            continue
        multi = nunique.index[nunique[field] > 1]
        if len(multi):
            sub = rows[rows["patient_id"].isin(multi)].dropna(subset=[field])
            conflicts[field] = {
                pid: sorted(map(str, vals.unique())) for pid, vals in sub.groupby("patient_id")[field]
            }
    follow = pd.to_numeric(rows["days_to_last_follow_up"], errors="coerce")
    out["days_to_last_follow_up"] = follow.groupby(rows["patient_id"]).max().reindex(out.index)
    treat = rows.dropna(subset=["treatment_type"]).groupby("patient_id")["treatment_type"]
    out["treatment_type"] = treat.agg(lambda v: "; ".join(sorted(set(v)))).reindex(out.index)
    if "case_id" in conflicts:
        some = list(conflicts["case_id"].items())[:5]
        raise InputError(
            f"clinical table: case_submitter_id maps to several case_id UUIDs, e.g. {some}; "
            "remove the duplicated cases from the export"
        )
    return out.reset_index(), conflicts


# vital_status spellings (lower case) -> the GDC value; anything else is an error, not a silent "alive".
VITAL_STATUS_SYNONYMS: dict[str, str] = {
    "dead": "dead",
    "deceased": "dead",
    "died": "dead",
    "death": "dead",
    "alive": "alive",
    "living": "alive",
    "not reported": "not reported",
    "unknown": "not reported",
}
# Fields that must be numbers when present (GDC writes '-- for missing).
NUMERIC_FIELDS = ("days_to_death", "days_to_last_follow_up", "age_at_index")


def normalise_vital_status(values: pd.Series) -> pd.Series:
    """Lower-case GDC vital status ("dead" / "alive" / "not reported"), synonyms folded; unknown -> NaN."""
    status = values.astype("string").str.strip().str.lower()
    return status.map(lambda v: VITAL_STATUS_SYNONYMS.get(v) if isinstance(v, str) else None).astype("string")


def clinical_field_problems(rows: pd.DataFrame, path) -> list[str]:
    """One message per clinical field that does not parse: numbers that are not numbers, vital status
    values that are neither Dead nor Alive (nor a known synonym). Each names the file, field and fix."""
    problems = []
    for field in NUMERIC_FIELDS:
        if field not in rows:
            continue
        raw = rows[field]
        present = raw.notna() & raw.astype("string").str.strip().ne("")
        bad = present & pd.to_numeric(raw, errors="coerce").isna()
        if bad.any():
            pairs = zip(rows.loc[bad, "patient_id"], raw[bad], strict=True)
            examples = sorted({(str(p), str(v)) for p, v in pairs})[:5]
            problems.append(
                f"{path}: field {CLINICAL_COLUMNS[field][0]} has {int(bad.sum())} value(s) that are not numbers, "
                f"e.g. {examples}; write a number of days/years, or '-- (GDC's missing value) where unknown"
            )
    if "vital_status" in rows:
        raw = rows["vital_status"]
        known = normalise_vital_status(raw)
        bad = raw.notna() & known.isna()
        if bad.any():
            values = sorted(set(map(str, raw[bad])))
            problems.append(
                f"{path}: field vital_status has value(s) {values[:8]} that are neither Dead nor Alive; "
                "write Dead/Alive (known synonyms: " + ", ".join(sorted(VITAL_STATUS_SYNONYMS)) + ") or '--"
            )
    return problems


def survival_from_gdc(
    vital_status: pd.Series, days_to_death: pd.Series, days_to_follow_up: pd.Series
) -> tuple[pd.Series, pd.Series, dict]:
    """Method 1.5 survival: months and event (1 = Dead) per patient, plus what was adjusted.

    duration = days_to_death if Dead else days_to_last_follow_up; a missing duration falls back to the
    follow-up; negative days become their absolute value; months = days / 30.44. "Not Reported" counts as
    alive; a missing vital status leaves the case without usable survival (NaN months).
    """
    status = normalise_vital_status(vital_status)
    unknown_values = sorted(set(map(str, vital_status[vital_status.notna() & status.isna()])))
    if unknown_values:
        raise InputError(
            f"vital_status: value(s) {unknown_values[:8]} are neither Dead nor Alive; use Dead/Alive "
            f"(or one of {sorted(VITAL_STATUS_SYNONYMS)})"
        )
    death = pd.to_numeric(days_to_death, errors="coerce")
    follow = pd.to_numeric(days_to_follow_up, errors="coerce")
    dead = status.eq("dead").fillna(False).astype(bool)
    days = death.where(dead, follow)
    days = days.fillna(follow)
    unknown_status = status.isna()
    days = days.mask(unknown_status)
    negative = days < 0
    days = days.abs()
    months = (days / DAYS_PER_MONTH).astype(float)
    event = dead.astype(int)
    ids = list(vital_status.index)
    report = {
        "negative_duration_made_positive": [ids[i] for i in np.flatnonzero(negative.to_numpy())],
        "vital_status_not_reported_counted_alive": [
            ids[i] for i in np.flatnonzero(status.eq("not reported").fillna(False).to_numpy(bool))
        ],
        "vital_status_missing": [ids[i] for i in np.flatnonzero(unknown_status.to_numpy(bool))],
        "dead_without_days_to_death": [
            ids[i] for i in np.flatnonzero((dead & death.isna() & follow.notna()).to_numpy(bool))
        ],
        "no_usable_survival": [ids[i] for i in np.flatnonzero(months.isna().to_numpy())],
    }
    return months, event, report


def label_problems(table: pd.DataFrame, mapping: Mapping[str, int], cohort: str, path) -> list[str]:
    """The subtype task is broken when a class of the label map has no patient: say which classes, which
    diagnosis strings were left unmapped (label -1) and the ``label_map`` line that maps them."""
    if not mapping:
        return []
    counts = table.loc[table["label"] >= 0, "label"].value_counts()
    empty = sorted({c for c in mapping.values() if c >= 0} - set(int(c) for c in counts.index))
    if not empty:
        return []
    names = {c: sorted(d for d, k in mapping.items() if k == c) for c in empty}
    unmapped = (
        table.loc[table["label"] < 0, "primary_diagnosis"].dropna().value_counts().sort_index()
    )
    msg = (
        f"{path}: field primary_diagnosis: class(es) {empty} of the {cohort} label map "
        f"({'; '.join(f'{c}: {names[c]}' for c in empty)}) have no patients, so the subtype task "
        f"would lose them (classes present: {dict((int(k), int(v)) for k, v in counts.items())})"
    )
    if len(unmapped):
        shown = {str(k): int(v) for k, v in list(unmapped.items())[:8]}
        # the override replaces the default map, so the fix lists the whole map plus the new line
        fixed = {**mapping, str(unmapped.index[0]): empty[0]}
        fix = ", ".join(f'"{d}": {c}' for d, c in fixed.items())
        msg += (
            f"; diagnoses not in the map: {shown}. If one of them is such a class, map it in the config "
            f"(this line maps the first one to class {empty[0]}): cohorts.<name>.label_map: {{{fix}}}"
        )
    else:
        msg += ("; give a cohorts.<name>.label_map with the classes this cohort has (map every diagnosis "
                "to -1 for a survival-only cohort)")
    return [msg]


def build_clinical_table(
    clinical_tsv: str | os.PathLike,
    biospecimen_tsv: str | os.PathLike | None,
    out_parquet: str | os.PathLike,
    *,
    cohort: str,
    label_map: dict | None = None,
    sheet: str | os.PathLike | None = None,
    rna_parquet: str | os.PathLike | None = None,
    report_path: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """GDC clinical (+ biospecimen) export -> ``clinical/cases.parquet``, one row per patient.

    Columns exactly as docs/ARCHITECTURE.md. ``n_slides`` counts the cohort sheet's slides when a sheet is
    given (sheet patients missing from the clinical table are an error), else the diagnostic (-DX) slides
    of the biospecimen export (all its slides if none is marked -DX). ``has_rna``: patient in the
    pathways parquet index. Nobody is dropped: unknown diagnoses get label -1, cases without usable
    survival keep NaN months and a missing (<NA>) event. ``report_path`` receives a JSON of everything adjusted or excluded.
    """
    code = str(cohort).upper()
    rows, info = read_clinical_tsv(clinical_tsv)
    problems = clinical_field_problems(rows, clinical_tsv)
    if problems:
        raise InputError("\n".join(problems))
    cases, conflicts = collapse_cases(rows)
    cases = cases.set_index("patient_id", drop=False)

    mapping = resolve_label_map(code, label_map)
    diagnoses = [
        normalise_diagnosis(raw, code, proj)
        for raw, proj in zip(cases["primary_diagnosis"], cases["project_id"], strict=True)
    ]
    labels = [
        diagnosis_label(d, raw, mapping) for d, raw in zip(diagnoses, cases["primary_diagnosis"], strict=True)
    ]
    months, event, surv_report = survival_from_gdc(
        cases["vital_status"], cases["days_to_death"], cases["days_to_last_follow_up"]
    )

    unrecognised: dict[str, dict[str, int]] = {}
    staged = {}
    for field, fn in (("stage", normalise_stage), ("t", normalise_t), ("n", normalise_n), ("m", normalise_m)):
        values = [fn(v) for v in cases[field]]
        bad = [
            str(r) for r, v in zip(cases[field], values, strict=True) if v is None and _blank(r) is not None
        ]
        if bad:
            unrecognised[field] = {k: bad.count(k) for k in sorted(set(bad))}
        staged[field] = values

    table = pd.DataFrame(
        {
            "patient_id": cases["patient_id"].astype(str).to_numpy(),
            "case_id": cases["case_id"].astype("string").to_numpy(),
            "project_id": cases["project_id"].astype("string").to_numpy(),
            "site": code,
            "primary_diagnosis": pd.array(diagnoses, dtype="string"),
            "label": np.asarray(labels, dtype=np.int64),
            "survival_months": months.to_numpy(dtype=float),
            # unknown when the duration is unusable: such patients only drop out of survival metrics
            "event": pd.array(event.where(months.notna()).to_numpy(), dtype="Int64"),
            **{f: pd.array(v, dtype="string") for f, v in staged.items()},
            "age": pd.to_numeric(cases["age_at_index"], errors="coerce").to_numpy(dtype=float),
        }
    )
    table["has_rna"] = _rna_membership(table["patient_id"], rna_parquet)
    table["n_slides"], slide_source, without_slides = _slide_counts(
        table["patient_id"], sheet, biospecimen_tsv
    )
    table = table[list(CASES_COLUMNS)].sort_values("patient_id").reset_index(drop=True)
    problems = label_problems(table, mapping, code, clinical_tsv)
    if problems and table.loc[table["label"] < 0, "primary_diagnosis"].notna().any():
        # an empty class next to unmapped diagnoses is most likely a synonym the map misses: stop
        # rather than silently train a task without that class
        raise InputError("\n".join(problems))
    for problem in problems:
        log.warning("%s", problem)

    with atomic_path(out_parquet) as tmp:
        table.to_parquet(tmp, engine="pyarrow", index=False)

    unknown = table.loc[table["label"] < 0, "primary_diagnosis"].fillna("<missing>").value_counts()
    report = {
        "cohort": code,
        "clinical_file": str(clinical_tsv),
        **info,
        "n_patients": len(table),
        "label_map": mapping,
        "label_counts": {str(k): int(v) for k, v in table["label"].value_counts().sort_index().items()},
        "unknown_diagnoses": {str(k): int(v) for k, v in unknown.items()},
        "patients_unknown_diagnosis": table.loc[table["label"] < 0, "patient_id"].tolist(),
        "survival": surv_report,
        "n_events": int(table["event"].fillna(0).sum()),
        "conflicts": conflicts,
        "collapse_rule": (
            "primary-diagnosis rows first; first non-missing value per field; "
            "days_to_last_follow_up = max; treatment_type = sorted unique joined"
        ),
        "unrecognised_staging": unrecognised,
        "label_problems": problems,
        "n_slides_source": slide_source,
        "patients_without_slides": without_slides,
        "n_with_rna": int(table["has_rna"].sum()),
        "exclusions": {
            "rows_without_patient_id": info["rows_without_patient_id"],
            "from_survival_metrics": surv_report["no_usable_survival"],
            "from_subtype_task": table.loc[table["label"] < 0, "patient_id"].tolist(),
        },
    }
    if report_path is not None:
        write_json(report, report_path)
    if len(unknown):
        log.warning(
            "%s: %d patients with a diagnosis outside the label map (label -1): %s",
            code,
            int(unknown.sum()),
            dict(unknown.head(10)),
        )
    log.info(
        "%s: %d patients, labels %s, %d events, %d with RNA",
        code,
        len(table),
        report["label_counts"],
        report["n_events"],
        report["n_with_rna"],
    )
    return table


def _rna_membership(patients: pd.Series, rna_parquet) -> np.ndarray:
    if rna_parquet is None:
        return np.zeros(len(patients), dtype=bool)
    import pyarrow.parquet as pq

    path = Path(rna_parquet)
    if not path.is_file():
        raise InputError(f"{path}: RNA pathways parquet not found (run the rna_pathways stage first)")
    schema = pq.read_schema(path)
    if "patient_id" not in schema.names:
        raise InputError(f"{path}: no patient_id column/index; found {schema.names[:10]}")
    ids = set(pq.read_table(path, columns=["patient_id"]).column("patient_id").to_pylist())
    return patients.isin(ids).to_numpy(bool)


def _slide_counts(patients: pd.Series, sheet, biospecimen_tsv) -> tuple[np.ndarray, str, list[str]]:
    if sheet is not None:
        frame = read_cohort_sheet(sheet)
        unknown = sorted(set(frame["patient_id"].dropna()) - set(patients))
        if unknown:
            raise InputError(
                f"{sheet}: {len(unknown)} patient(s) of the cohort sheet are not in the clinical table, "
                f"e.g. {unknown[:8]}; check patient_id (TCGA case barcode such as TCGA-BH-A0AY) or add "
                "their clinical records"
            )
        counts = frame.groupby("patient_id")["slide_id"].nunique()
        source = "sheet"
    elif biospecimen_tsv is not None:
        frame = read_biospecimen_tsv(biospecimen_tsv)
        diagnostic = frame["slide_id"].str.contains("-DX", regex=False)
        if diagnostic.any():
            frame = frame[diagnostic]
        counts = frame.groupby("patient_id")["slide_id"].nunique()
        source = "biospecimen (diagnostic -DX slides)" if diagnostic.any() else "biospecimen (all slides)"
    else:
        return np.zeros(len(patients), dtype=np.int64), "none", patients.tolist()
    n = counts.reindex(patients.to_numpy()).fillna(0).astype(np.int64).to_numpy()
    return n, source, patients[n == 0].tolist()


# ---------------------------------------------------------------------------------------------
# Clinical covariates for the clinical token (fixes bug 11: fixed vocabulary, not cohort label codes;
# bug 8: age statistics from training patients only; bug 10: explicit missing indicators).
COVARIATE_VOCABULARY: dict[str, tuple[str, ...]] = {
    "stage": STAGES,
    "t": T_VALUES,
    "n": N_VALUES,
    "m": M_VALUES,
}
COVARIATE_NAMES: list[str] = [
    *(f"{field}={v}" for field, vocab in COVARIATE_VOCABULARY.items() for v in (*vocab, "missing")),
    "age_z",
    "age_missing",
]
CLINICAL_DIM = len(COVARIATE_NAMES)


def encode_covariates(cases: pd.DataFrame, train_ids: list[str]) -> tuple[np.ndarray, list[str], dict]:
    """Fixed-width covariates (``CLINICAL_DIM`` columns) for every row of ``cases``.

    One-hot stage/T/N/M over a fixed vocabulary, each with a missing indicator, and age standardised
    with the mean/std of the TRAINING patients only plus a missing indicator (missing age -> 0). Returns
    (matrix float32 (P, CLINICAL_DIM), feature names, state); ``apply_covariates(cases, state)`` re-applies
    the same state to other patients (val/test, OOD cohort).
    """
    train_ids = [str(p) for p in train_ids]
    known = set(cases["patient_id"].astype(str))
    absent = [p for p in train_ids if p not in known]
    if absent:
        raise InputError(
            f"encode_covariates: {len(absent)} training patient(s) not in cases, e.g. {absent[:5]}"
        )
    train = cases[cases["patient_id"].astype(str).isin(set(train_ids))]
    ages = pd.to_numeric(train["age"], errors="coerce").dropna().to_numpy(float)
    mean = float(ages.mean()) if len(ages) else 0.0
    std = float(ages.std()) if len(ages) > 1 else 1.0
    state = {
        "vocabulary": {k: list(v) for k, v in COVARIATE_VOCABULARY.items()},
        "age_mean": mean,
        "age_std": std if std > 0 else 1.0,
        "n_train": len(train_ids),
        "n_train_with_age": len(ages),
        "feature_names": list(COVARIATE_NAMES),
    }
    return apply_covariates(cases, state), list(COVARIATE_NAMES), state


def apply_covariates(cases: pd.DataFrame, state: Mapping) -> np.ndarray:
    """Covariate matrix (P, len(feature_names)) float32 of ``cases`` with a state from encode_covariates."""
    # Hand-written rather than sklearn OneHotEncoder/StandardScaler: the state must be a small JSON-able
    # dict stored with each run, and the missing indicators are part of the fixed layout.
    blocks = []
    for field, vocab in state["vocabulary"].items():
        if field not in cases:
            raise InputError(f"cases table: column {field!r} missing; rebuild clinical/cases.parquet")
        values = cases[field].astype(object).where(cases[field].notna(), None).to_numpy()
        block = np.zeros((len(cases), len(vocab) + 1), dtype=np.float32)
        index = {v: i for i, v in enumerate(vocab)}
        for row, value in enumerate(values):
            block[row, index.get(value, len(vocab)) if value is not None else len(vocab)] = 1.0
        blocks.append(block)
    age = pd.to_numeric(cases["age"], errors="coerce").to_numpy(float)
    missing = np.isnan(age)
    z = np.where(missing, 0.0, (age - state["age_mean"]) / state["age_std"])
    blocks.append(np.stack([z, missing.astype(float)], axis=1).astype(np.float32))
    return np.concatenate(blocks, axis=1)
