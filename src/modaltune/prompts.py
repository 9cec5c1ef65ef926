"""Label prompts (method 1.7): the four sentences (General, Diagnosis, Stage, Survival) of a patient.

Built from cancer site, diagnosis, stage/TNM and the patient's prompt survival bin
(:mod:`modaltune.survival_bins`). Plain python: no torch, no text encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from modaltune.clinical import normalise_m, normalise_n, normalise_stage, normalise_t
from modaltune.survival_bins import prompt_bin_index

log = logging.getLogger(__name__)

PROMPT_NAMES = ("General", "Diagnosis", "Stage", "Survival")
SITE_NAMES = {
    "BRCA": "breast",
    "BLCA": "bladder urothelial",
    "COADREAD": "colorectal",
    "GBMLGG": "brain",
    "NSCLC": "lung",
    "RCC": "kidney",
    "STAD": "stomach",
    "UCEC": "uterus",
    # single TCGA projects of the combined cohorts
    "COAD": "colorectal",
    "READ": "colorectal",
    "GBM": "brain",
    "LGG": "brain",
    "LUAD": "lung",
    "LUSC": "lung",
    "KIRC": "kidney",
    "KIRP": "kidney",
    "KICH": "kidney",
}
STAGE_PHRASES = {
    "I": "stage one",
    "II": "stage two",
    "III": "stage three",
    "IV": "stage four",
    "X": "stage cannot be determined",
}
T_PHRASES = {
    "T0": "no tumor detected",
    "T1": "tumor stage one",
    "T2": "tumor stage two",
    "T3": "tumor stage three",
    "T4": "tumor stage four",
    "TX": "tumor stage cannot be assessed",
}
N_PHRASES = {
    "N0": "cancer has not spread to lymph nodes",
    "N1": "node stage one",
    "N2": "node stage two",
    "N3": "node stage three",
    "NX": "node spread cannot be assessed",
}
M_PHRASES = {
    "M0": "no metastasis detected",
    "M1": "cancer has spread to distant organs",
    "MX": "metastasis status cannot be assessed",
}


def site_name(cohort: str) -> str:
    """ "Cancer location" wording of a cohort code (BRCA -> breast); unknown codes are used lower case."""
    code = str(cohort).upper().removeprefix("TCGA-")
    if code not in SITE_NAMES:
        log.warning(
            "no site name for cohort %r; the prompts say 'Cancer location: %s;'", cohort, code.lower()
        )
    return SITE_NAMES.get(code, code.lower())


def _value(row: Mapping, key: str):
    value = row.get(key) if hasattr(row, "get") else row[key]
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value


def _fmt_edge(edge: float) -> str:
    return str(int(edge)) if float(edge).is_integer() else f"{edge:g}"


def survival_fragment(months, event, edges: Sequence[float] | None) -> str:
    """ "Survival status: The patient {was censored|died} {bin}" (no final period); "" when unknown."""
    if edges is None or months is None or not np.isfinite(float(months)):
        return ""
    b = int(prompt_bin_index([float(months)], edges)[0])
    e = [_fmt_edge(x) for x in edges]
    when = f"before {e[1]} months" if b == 0 else f"between {e[b]} and {e[b + 1]} months"
    status = "died" if event is not None and int(event) == 1 else "was censored"
    return f"Survival status: The patient {status} {when}"


def label_prompts(
    row: Mapping, edges: Sequence[float] | None, cohort: str, *, site: str | None = None
) -> list[str]:
    """The four prompts (General, Diagnosis, Stage, Survival) of one patient, exactly as in method 1.7.

    ``row`` has primary_diagnosis, stage, t, n, m, survival_months, event (normalised values as in
    cases.parquet; raw GDC strings such as "Stage IIA" or "N0 (i-)" are normalised here too). A missing
    field gives an empty fragment; fragments are joined with single spaces, so runs of spaces appear.
    ``site`` overrides the site wording of ``cohort``.
    """
    location = f"Cancer location: {site or site_name(cohort)};"
    diagnosis = _value(row, "primary_diagnosis")
    diag = f"Cancer diagnosis: {str(diagnosis).lower()};" if diagnosis is not None else ""

    def phrase(key: str, normalise: Callable, table: Mapping[str, str], head: str) -> str:
        value = normalise(_value(row, key))
        return f"{head}: {table[value]};" if value in table else ""

    stage = phrase("stage", normalise_stage, STAGE_PHRASES, "Overall stage")
    t = phrase("t", normalise_t, T_PHRASES, "Tumor stage status")
    n = phrase("n", normalise_n, N_PHRASES, "Lymph node status")
    m = phrase("m", normalise_m, M_PHRASES, "Distant metastasis status")
    surv = survival_fragment(_value(row, "survival_months"), _value(row, "event"), edges)
    return [
        " ".join([location, diag, stage, t, n, m, surv]),
        " ".join([location, diag]),
        " ".join([location, stage, t, n, m]),
        " ".join([location, stage, t, n, m, surv]),
    ]
