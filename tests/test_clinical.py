"""GDC clinical readers, survival, staging, labels and covariates (synthetic GDC exports, both schemas)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from modaltune import clinical
from modaltune.clinical import (
    CASES_COLUMNS,
    CLINICAL_DIM,
    DEFAULT_LABEL_MAPS,
    apply_covariates,
    build_clinical_table,
    encode_covariates,
    normalise_diagnosis,
    normalise_m,
    normalise_n,
    normalise_stage,
    normalise_t,
    survival_from_gdc,
)
from modaltune.errors import InputError

FLAT = {
    "case_id": "case_id",
    "patient_id": "case_submitter_id",
    "project_id": "project_id",
    "age": "age_at_index",
    "vital": "vital_status",
    "death": "days_to_death",
    "follow": "days_to_last_follow_up",
    "stage": "ajcc_pathologic_stage",
    "t": "ajcc_pathologic_t",
    "n": "ajcc_pathologic_n",
    "m": "ajcc_pathologic_m",
    "diag": "primary_diagnosis",
    "year": "year_of_diagnosis",
    "treat": "treatment_type",
}
DOTTED = {
    "case_id": "cases.case_id",
    "patient_id": "cases.submitter_id",
    "project_id": "project.project_id",
    "age": "demographic.age_at_index",
    "vital": "demographic.vital_status",
    "death": "demographic.days_to_death",
    "follow": "diagnoses.days_to_last_follow_up",
    "stage": "diagnoses.ajcc_pathologic_stage",
    "t": "diagnoses.ajcc_pathologic_t",
    "n": "diagnoses.ajcc_pathologic_n",
    "m": "diagnoses.ajcc_pathologic_m",
    "diag": "diagnoses.primary_diagnosis",
    "year": "diagnoses.year_of_diagnosis",
    "treat": "treatments.treatment_type",
}
M = "'--"
# (patient, age, vital, death, follow, stage, t, n, m, diagnosis)
PATIENTS = [
    (
        "TCGA-AA-0001",
        "61",
        "Alive",
        M,
        "761",
        "Stage IIA",
        "T2",
        "N0 (i-)",
        "M0",
        "Infiltrating duct carcinoma, NOS",
    ),
    (
        "TCGA-AA-0002",
        "48",
        "Dead",
        "304.4",
        "100",
        "Stage IIIC",
        "T4b",
        "N3a",
        "M0",
        "Lobular carcinoma, NOS",
    ),
    ("TCGA-AA-0003", M, "Dead", M, "500", "Stage X", "TX", "NX", "MX", "Mucinous adenocarcinoma"),
    (
        "TCGA-AA-0004",
        "70",
        "Not Reported",
        M,
        "-91.32",
        M,
        "Tis",
        "N1mi",
        "cM0 (i+)",
        "Lobular carcinoma, NOS",
    ),
    ("TCGA-AA-0005", "55", M, M, "1000", "Stage IV", "T1c", "N2", "M1", "Infiltrating duct carcinoma, NOS"),
    ("TCGA-AA-0006", "66", "Alive", M, M, "Stage I", "T1", "N0", "M0", M),
]


def _write_clinical(path, names, *, extra_treatment_rows=True, order=None):
    rows = []
    for i, (pid, age, vital, death, follow, stage, t, n, m, diag) in enumerate(PATIENTS):
        base = {
            names["case_id"]: f"uuid-{i:04d}",
            names["patient_id"]: pid,
            names["project_id"]: "TCGA-BRCA",
            names["age"]: age,
            names["vital"]: vital,
            names["death"]: death,
            names["follow"]: follow,
            names["stage"]: stage,
            names["t"]: t,
            names["n"]: n,
            names["m"]: m,
            names["diag"]: diag,
            names["year"]: "2005",
            names["treat"]: "Radiation Therapy, NOS",
        }
        rows.append(base)
        if extra_treatment_rows:  # GDC writes one row per treatment
            rows.append({**base, names["treat"]: "Pharmaceutical Therapy, NOS"})
    frame = pd.DataFrame(rows)
    frame["unrelated_column"] = M
    if order is not None:
        frame = frame[sorted(frame.columns, reverse=True)]
    frame.to_csv(path, sep="\t", index=False)
    return path


def _write_slides(path, dotted=False):
    pid_col, slide_col = (
        ("cases.submitter_id", "slides.submitter_id")
        if dotted
        else (
            "case_submitter_id",
            "slide_submitter_id",
        )
    )
    rows = [
        ("TCGA-AA-0001", "TCGA-AA-0001-01Z-00-DX1"),
        ("TCGA-AA-0001", "TCGA-AA-0001-01A-01-TS1"),  # frozen section: not counted
        ("TCGA-AA-0002", "TCGA-AA-0002-01Z-00-DX1"),
        ("TCGA-AA-0002", "TCGA-AA-0002-01Z-00-DX2"),
    ]
    pd.DataFrame(rows, columns=[pid_col, slide_col]).to_csv(path, sep="\t", index=False)
    return path


def test_both_schemas_give_identical_tables(tmp_path):
    flat = _write_clinical(tmp_path / "flat.tsv", FLAT)
    dotted = _write_clinical(tmp_path / "dotted.tsv", DOTTED, order="reverse")
    a = build_clinical_table(flat, _write_slides(tmp_path / "s1.tsv"), tmp_path / "a.parquet", cohort="BRCA")
    b = build_clinical_table(
        dotted, _write_slides(tmp_path / "s2.tsv", dotted=True), tmp_path / "b.parquet", cohort="BRCA"
    )
    pd.testing.assert_frame_equal(a, b)
    on_disk = pd.read_parquet(tmp_path / "b.parquet")
    assert list(on_disk.columns) == list(CASES_COLUMNS)
    pd.testing.assert_frame_equal(on_disk, b, check_dtype=False)
    assert len(a) == len(PATIENTS)  # duplicated treatment rows collapsed, nobody dropped
    row = a.set_index("patient_id").loc["TCGA-AA-0001"]
    assert row["case_id"] == "uuid-0000" and row["project_id"] == "TCGA-BRCA" and row["site"] == "BRCA"
    assert row["primary_diagnosis"] == "infiltrating duct carcinoma" and row["label"] == 0
    assert (row["stage"], row["t"], row["n"], row["m"]) == ("II", "T2", "N0", "M0")
    assert row["survival_months"] == pytest.approx(761 / 30.44) and row["event"] == 0
    assert a.set_index("patient_id")["n_slides"].to_dict() == {
        "TCGA-AA-0001": 1,  # DX only
        "TCGA-AA-0002": 2,
        "TCGA-AA-0003": 0,
        "TCGA-AA-0004": 0,
        "TCGA-AA-0005": 0,
        "TCGA-AA-0006": 0,
    }


def test_gdc_missing_literal_and_survival_rules(tmp_path):
    table = build_clinical_table(
        _write_clinical(tmp_path / "c.tsv", FLAT),
        None,
        tmp_path / "c.parquet",
        cohort="BRCA",
        report_path=tmp_path / "report.json",
    ).set_index("patient_id")
    report = json.loads((tmp_path / "report.json").read_text())
    # '-- age -> NaN, '-- stage -> None
    assert np.isnan(table.loc["TCGA-AA-0003", "age"])
    assert pd.isna(table.loc["TCGA-AA-0004", "stage"])
    # Dead: days_to_death used
    assert table.loc["TCGA-AA-0002", "survival_months"] == pytest.approx(304.4 / 30.44)
    assert table.loc["TCGA-AA-0002", "event"] == 1
    # Dead without days_to_death: falls back to follow-up, event kept
    assert table.loc["TCGA-AA-0003", "survival_months"] == pytest.approx(500 / 30.44)
    assert table.loc["TCGA-AA-0003", "event"] == 1
    # Not Reported counts as alive; negative days -> absolute value; both reported
    assert table.loc["TCGA-AA-0004", "event"] == 0
    assert table.loc["TCGA-AA-0004", "survival_months"] == pytest.approx(91.32 / 30.44)
    assert report["survival"]["negative_duration_made_positive"] == ["TCGA-AA-0004"]
    assert report["survival"]["vital_status_not_reported_counted_alive"] == ["TCGA-AA-0004"]
    # missing vital status / no follow-up: kept with NaN months
    assert np.isnan(table.loc["TCGA-AA-0005", "survival_months"])
    assert np.isnan(table.loc["TCGA-AA-0006", "survival_months"])
    assert pd.isna(table.loc["TCGA-AA-0005", "event"]) and pd.isna(table.loc["TCGA-AA-0006", "event"])
    on_disk = pd.read_parquet(tmp_path / "c.parquet").set_index("patient_id")
    assert on_disk["event"].isna().sum() == 2 and on_disk.loc["TCGA-AA-0002", "event"] == 1
    assert sorted(report["survival"]["no_usable_survival"]) == ["TCGA-AA-0005", "TCGA-AA-0006"]
    # unknown diagnosis -> -1 and reported; missing diagnosis too
    assert table.loc["TCGA-AA-0003", "label"] == -1
    assert table.loc["TCGA-AA-0003", "primary_diagnosis"] == "mucinous adenocarcinoma"
    assert report["unknown_diagnoses"] == {"mucinous adenocarcinoma": 1, "<missing>": 1}
    assert report["label_counts"] == {"-1": 2, "0": 2, "1": 2}
    assert report["schema"] == "flat" and report["n_rows"] == 2 * len(PATIENTS)


def test_survival_function_directly():
    idx = ["a", "b", "c", "d"]
    months, event, rep = survival_from_gdc(
        pd.Series(["Dead", "Alive", "Dead", "dead"], index=idx),
        pd.Series([np.nan, "10", "-30.44", "60.88"], index=idx),
        pd.Series(["304.4", "20", "5", np.nan], index=idx),
    )
    np.testing.assert_allclose(months.to_numpy(), [10.0, 20 / 30.44, 1.0, 2.0])
    assert event.tolist() == [1, 0, 1, 1]
    assert rep["negative_duration_made_positive"] == ["c"]
    assert rep["dead_without_days_to_death"] == ["a"]


def test_conflicting_rows_reported_and_follow_up_max(tmp_path):
    path = _write_clinical(tmp_path / "c.tsv", FLAT)
    frame = pd.read_csv(path, sep="\t", dtype=str)
    # second row of patient 1 disagrees on the stage and has a later follow-up
    second = frame.index[frame["case_submitter_id"] == "TCGA-AA-0001"][1]
    frame.loc[second, "ajcc_pathologic_stage"] = "Stage IIIA"
    frame.loc[second, "days_to_last_follow_up"] = "900"
    frame.to_csv(path, sep="\t", index=False)
    table = build_clinical_table(
        path, None, tmp_path / "o.parquet", cohort="BRCA", report_path=tmp_path / "r.json"
    )
    rep = json.loads((tmp_path / "r.json").read_text())
    row = table.set_index("patient_id").loc["TCGA-AA-0001"]
    assert row["stage"] == "II"  # first non-missing in file order
    assert row["survival_months"] == pytest.approx(900 / 30.44)  # latest follow-up
    assert rep["conflicts"]["stage"] == {"TCGA-AA-0001": ["Stage IIA", "Stage IIIA"]}


def test_primary_diagnosis_row_preferred(tmp_path):
    rows = pd.DataFrame(
        {
            "cases.case_id": ["u1", "u1"],
            "cases.submitter_id": ["TCGA-XX-0001"] * 2,
            "project.project_id": ["TCGA-BRCA"] * 2,
            "demographic.vital_status": ["Alive"] * 2,
            "demographic.days_to_death": [M, M],
            "diagnoses.days_to_last_follow_up": ["100", M],
            "diagnoses.primary_diagnosis": ["Mucinous adenocarcinoma", "Lobular carcinoma, NOS"],
            "diagnoses.classification_of_tumor": ["metastasis", "primary"],
        }
    )
    rows.to_csv(tmp_path / "c.tsv", sep="\t", index=False)
    table = build_clinical_table(tmp_path / "c.tsv", None, tmp_path / "o.parquet", cohort="BRCA")
    assert table.loc[0, "label"] == 1 and table.loc[0, "survival_months"] == pytest.approx(100 / 30.44)


def test_missing_required_column_names_file_and_column(tmp_path):
    path = _write_clinical(tmp_path / "c.tsv", FLAT)
    pd.read_csv(path, sep="\t", dtype=str).drop(columns=["vital_status"]).to_csv(path, sep="\t", index=False)
    with pytest.raises(InputError) as err:
        build_clinical_table(path, None, tmp_path / "o.parquet", cohort="BRCA")
    msg = str(err.value)
    assert str(path) in msg and "vital_status" in msg and "demographic.vital_status" in msg
    assert "case_submitter_id" in msg  # lists what was found
    assert not (tmp_path / "o.parquet").exists()


def test_sheet_counts_rna_and_unknown_sheet_patients(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    clin = _write_clinical(tmp_path / "c.tsv", FLAT)
    rna = pd.DataFrame(
        {"G1": [1.0, 2.0], "sample_id": ["s1", "s2"]},
        index=pd.Index(["TCGA-AA-0002", "TCGA-AA-0005"], name="patient_id"),
    )
    pq.write_table(pa.Table.from_pandas(rna), tmp_path / "rna.parquet")
    sheet = pd.DataFrame(
        {
            "slide_id": ["s1", "s2", "s3"],
            "patient_id": ["TCGA-AA-0001"] * 2 + ["TCGA-AA-0006"],
            "path": ["a.svs", "b.svs", "c.svs"],
        }
    )
    sheet.to_csv(tmp_path / "sheet.tsv", sep="\t", index=False)
    table = build_clinical_table(
        clin,
        None,
        tmp_path / "o.parquet",
        cohort="BRCA",
        sheet=tmp_path / "sheet.tsv",
        rna_parquet=tmp_path / "rna.parquet",
    ).set_index("patient_id")
    assert table["n_slides"].to_dict()["TCGA-AA-0001"] == 2 and table.loc["TCGA-AA-0006", "n_slides"] == 1
    assert table.loc["TCGA-AA-0003", "n_slides"] == 0  # kept without slides
    assert table.index[table["has_rna"]].tolist() == ["TCGA-AA-0002", "TCGA-AA-0005"]
    sheet.loc[2, "patient_id"] = "TCGA-ZZ-9999"
    sheet.to_csv(tmp_path / "sheet.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="TCGA-ZZ-9999"):
        build_clinical_table(clin, None, tmp_path / "o2.parquet", cohort="BRCA", sheet=tmp_path / "sheet.tsv")


@pytest.mark.parametrize(
    "fn, raw, expected",
    [
        (normalise_stage, "Stage IIA", "II"),
        (normalise_stage, "Stage IIIC", "III"),
        (normalise_stage, "Stage IV", "IV"),
        (normalise_stage, "Stage IVB", "IV"),
        (normalise_stage, "Stage IB", "I"),
        (normalise_stage, "Stage X", "X"),
        (normalise_stage, "stage i", "I"),
        (normalise_stage, "IIB", "II"),
        (normalise_stage, "Stage 0", None),
        (normalise_stage, "Not Reported", None),
        (normalise_stage, "'--", None),
        (normalise_stage, None, None),
        (normalise_t, "T2", "T2"),
        (normalise_t, "T1c", "T1"),
        (normalise_t, "T4d", "T4"),
        (normalise_t, "T2a2", "T2"),
        (normalise_t, "Tis", "T0"),
        (normalise_t, "TIS", "T0"),
        (normalise_t, "T0", "T0"),
        (normalise_t, "TX", "TX"),
        (normalise_t, "T1mi", "T1"),
        (normalise_t, "pT3", "T3"),
        (normalise_t, "T5", None),
        (normalise_t, np.nan, None),
        (normalise_n, "N0 (i+)", "N0"),
        (normalise_n, "N0 (i-)", "N0"),
        (normalise_n, "N0 (mol+)", "N0"),
        (normalise_n, "N1mi", "N1"),
        (normalise_n, "N2a", "N2"),
        (normalise_n, "N3c", "N3"),
        (normalise_n, "NX", "NX"),
        (normalise_n, "N4", None),
        (normalise_m, "M0", "M0"),
        (normalise_m, "cM0 (i+)", "M0"),
        (normalise_m, "M1b", "M1"),
        (normalise_m, "MX", "MX"),
        (normalise_m, "Unknown", None),
    ],
)
def test_staging_normalisation(fn, raw, expected):
    assert fn(raw) == expected


@pytest.mark.parametrize(
    "cohort, raw, project, diagnosis, label",
    [
        ("BRCA", "Infiltrating duct carcinoma, NOS", "TCGA-BRCA", "infiltrating duct carcinoma", 0),
        ("BRCA", "Lobular carcinoma, NOS", "TCGA-BRCA", "lobular carcinoma", 1),
        (
            "BRCA",
            "Infiltrating duct and lobular carcinoma",
            "TCGA-BRCA",
            "infiltrating duct and lobular carcinoma",
            -1,
        ),
        ("GBMLGG", "Glioblastoma", "TCGA-GBM", "glioblastoma", 0),
        ("GBMLGG", "Oligodendroglioma, anaplastic", "TCGA-LGG", "oligodendroglioma, anaplastic", 1),
        ("GBMLGG", "Astrocytoma, NOS", "TCGA-LGG", "astrocytoma", 1),
        ("GBMLGG", "Mixed glioma", "TCGA-LGG", "mixed glioma", 1),
        ("NSCLC", "Adenocarcinoma, NOS", "TCGA-LUAD", "lung adenocarcinoma", 0),
        ("NSCLC", "Adenocarcinoma with mixed subtypes", "TCGA-LUAD", "lung adenocarcinoma", 0),
        ("NSCLC", "Squamous cell carcinoma, NOS", "TCGA-LUSC", "lung squamous cell carcinoma", 1),
        (
            "NSCLC",
            "Squamous cell carcinoma, keratinizing, NOS",
            "TCGA-LUSC",
            "lung squamous cell carcinoma",
            1,
        ),
        (
            "NSCLC",
            "Squamous cell carcinoma, large cell, nonkeratinizing, NOS",
            "TCGA-LUSC",
            "lung squamous cell carcinoma",
            1,
        ),
        ("NSCLC", "Papillary adenocarcinoma, NOS", "TCGA-LUAD", "lung papillary adenocarcinoma", -1),
        ("RCC", "Papillary adenocarcinoma, NOS", "TCGA-KIRP", "papillary renal cell carcinoma", 0),
        ("RCC", "Clear cell adenocarcinoma, NOS", "TCGA-KIRC", "clear cell renal cell carcinoma", 1),
        ("RCC", "Renal cell carcinoma, NOS", "TCGA-KIRC", "clear cell renal cell carcinoma", 1),
        ("RCC", "Renal cell carcinoma, chromophobe type", "TCGA-KICH", "chromophobe renal cell carcinoma", 2),
        ("BLCA", "Transitional cell carcinoma", "TCGA-BLCA", "transitional cell carcinoma", 0),
        (
            "BLCA",
            "Papillary transitional cell carcinoma",
            "TCGA-BLCA",
            "papillary transitional cell carcinoma",
            1,
        ),
        ("BLCA", "Papillary adenocarcinoma, NOS", "TCGA-BLCA", "papillary transitional cell carcinoma", 1),
        ("BLCA", "Squamous cell carcinoma, NOS", "TCGA-BLCA", "squamous cell carcinoma", -1),
        ("COADREAD", "Adenocarcinoma, NOS", "TCGA-COAD", "colon adenocarcinoma", 0),
        ("COADREAD", "Adenocarcinoma with mixed subtypes", "TCGA-READ", "rectal adenocarcinoma", 1),
        ("COADREAD", "Mucinous adenocarcinoma", "TCGA-COAD", "colon mucinous adenocarcinoma", -1),
        ("UCEC", "Endometrioid adenocarcinoma, NOS", "TCGA-UCEC", "endometrioid adenocarcinoma", 0),
        ("UCEC", "Serous cystadenocarcinoma, NOS", "TCGA-UCEC", "serous cystadenocarcinoma", 1),
    ],
)
def test_default_label_maps(cohort, raw, project, diagnosis, label):
    norm = normalise_diagnosis(raw, cohort, project)
    assert norm == diagnosis
    assert clinical.diagnosis_label(norm, raw, clinical.resolve_label_map(cohort)) == label


def test_every_default_cohort_has_all_classes():
    for code, mapping in DEFAULT_LABEL_MAPS.items():
        classes = sorted(set(mapping.values()))
        assert classes == list(range(len(classes))), code
    assert len(set(DEFAULT_LABEL_MAPS["RCC"].values())) == 3


def test_label_map_override(tmp_path):
    clin = _write_clinical(tmp_path / "c.tsv", FLAT)
    override = {"BRCA": {"mucinous adenocarcinoma": 2, "lobular carcinoma, NOS": 1}}
    table = build_clinical_table(clin, None, tmp_path / "o.parquet", cohort="brca", label_map=override)
    labels = table.set_index("patient_id")["label"]
    assert labels["TCGA-AA-0003"] == 2 and labels["TCGA-AA-0002"] == 1
    assert labels["TCGA-AA-0001"] == -1  # override replaces the default map
    flat_override = build_clinical_table(
        clin, None, tmp_path / "p.parquet", cohort="BRCA", label_map={"mucinous adenocarcinoma": 0}
    )
    assert flat_override.set_index("patient_id")["label"]["TCGA-AA-0003"] == 0
    with pytest.raises(InputError, match="class"):
        build_clinical_table(clin, None, tmp_path / "q.parquet", cohort="BRCA", label_map={"x": "one"})


def _cases(ages, ids=None):
    ids = ids or [f"P{i}" for i in range(len(ages))]
    return pd.DataFrame(
        {
            "patient_id": ids,
            "stage": ["II", None, "IV", "X"][: len(ages)],
            "t": ["T2", "T0", None, "T9"][: len(ages)],
            "n": ["N0", "NX", "N3", None][: len(ages)],
            "m": ["M0", None, "M1", "MX"][: len(ages)],
            "age": ages,
        }
    )


def test_covariates_fixed_width_and_missing_indicators():
    cases = _cases([40.0, 60.0, np.nan, 80.0])
    x, names, state = encode_covariates(cases, ["P0", "P1"])
    assert x.shape == (4, CLINICAL_DIM) == (4, len(names)) and x.dtype == np.float32
    assert CLINICAL_DIM == 6 + 7 + 6 + 4 + 2  # never depends on the cohort
    np.testing.assert_array_equal(x[:, :-2].sum(1), [4, 4, 4, 4])  # one-hot per field
    col = {n: i for i, n in enumerate(names)}
    assert x[0, col["stage=II"]] == 1 and x[1, col["stage=missing"]] == 1
    assert x[1, col["t=T0"]] == 1 and x[3, col["t=missing"]] == 1  # unknown value -> missing
    assert x[2, col["age_missing"]] == 1 and x[2, col["age_z"]] == 0
    # a cohort with other values present still has the same width
    x2, _, _ = encode_covariates(_cases([50.0]), ["P0"])
    assert x2.shape[1] == CLINICAL_DIM


def test_covariate_age_statistics_from_train_only():
    cases = _cases([40.0, 60.0, 1000.0, 2000.0])
    x, names, state = encode_covariates(cases, ["P0", "P1"])
    assert state["age_mean"] == pytest.approx(50.0) and state["age_std"] == pytest.approx(10.0)
    z = x[:, names.index("age_z")]
    np.testing.assert_allclose(z, [-1.0, 1.0, 95.0, 195.0])
    # re-applied state gives the same numbers for any subset/order of patients
    again = apply_covariates(cases.iloc[::-1], json.loads(json.dumps(state)))
    np.testing.assert_allclose(again, x[::-1])
    with pytest.raises(InputError):
        encode_covariates(cases, ["P0", "nobody"])


def test_clinical_does_not_import_torch():
    import subprocess

    code = "import sys, modaltune.clinical; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Fields that do not parse stop with the file and field named (issue 15, items 2-4 and the RCC case)


def _clinical_with(tmp_path, patient, **fields):
    """The six-patient export with ``fields`` (keys of FLAT) replaced for ``patient``."""
    path = _write_clinical(tmp_path / "c.tsv", FLAT)
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    for key, value in fields.items():
        frame.loc[frame["case_submitter_id"] == patient, FLAT[key]] = value
    frame.to_csv(path, sep="\t", index=False)
    return path


def test_vital_status_synonym_counts_as_death(tmp_path):
    path = _clinical_with(tmp_path, "TCGA-AA-0002", vital="Deceased")
    table = build_clinical_table(path, None, tmp_path / "c.parquet", cohort="BRCA").set_index("patient_id")
    assert table.loc["TCGA-AA-0002", "event"] == 1
    assert table.loc["TCGA-AA-0002", "survival_months"] == pytest.approx(304.4 / 30.44)


def test_vital_status_unknown_value_names_file_and_field(tmp_path):
    path = _clinical_with(tmp_path, "TCGA-AA-0002", vital="Passed on")
    with pytest.raises(InputError, match=r"c\.tsv: field vital_status .*'Passed on'"):
        build_clinical_table(path, None, tmp_path / "c.parquet", cohort="BRCA")
    assert not (tmp_path / "c.parquet").exists()


def test_unparseable_days_to_death_is_an_error(tmp_path):
    path = _clinical_with(tmp_path, "TCGA-AA-0002", death="abc")
    with pytest.raises(InputError, match=r"c\.tsv: field days_to_death .*TCGA-AA-0002.*abc"):
        build_clinical_table(path, None, tmp_path / "c.parquet", cohort="BRCA")


def test_unparseable_age_is_an_error(tmp_path):
    path = _clinical_with(tmp_path, "TCGA-AA-0001", age="sixty-one")
    with pytest.raises(InputError, match=r"field age_at_index .*sixty-one"):
        build_clinical_table(path, None, tmp_path / "c.parquet", cohort="BRCA")


def test_unmapped_synonym_that_empties_a_class_stops_with_the_fix(tmp_path):
    # an RCC cohort whose clear-cell cases are written differently: RCC subtyping would lose class 1
    path = _write_clinical(tmp_path / "c.tsv", FLAT)
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    diag = {"TCGA-AA-0001": "Papillary adenocarcinoma, NOS", "TCGA-AA-0002": "Renal clear cell carcinoma",
            "TCGA-AA-0003": "Chromophobe renal cell carcinoma", "TCGA-AA-0004": "Renal clear cell carcinoma",
            "TCGA-AA-0005": "Papillary adenocarcinoma, NOS", "TCGA-AA-0006": "Renal clear cell carcinoma"}
    frame["primary_diagnosis"] = frame["case_submitter_id"].map(diag)
    frame.to_csv(path, sep="\t", index=False)
    with pytest.raises(InputError) as err:
        build_clinical_table(path, None, tmp_path / "c.parquet", cohort="RCC")
    msg = str(err.value)
    assert "field primary_diagnosis" in msg and "class(es) [1]" in msg
    assert "'renal clear cell carcinoma': 3" in msg
    assert '"renal clear cell carcinoma": 1}' in msg and '"papillary renal cell carcinoma": 0' in msg
    # the line it shows fixes it
    fixed = {**DEFAULT_LABEL_MAPS["RCC"], "renal clear cell carcinoma": 1}
    table = build_clinical_table(path, None, tmp_path / "c.parquet", cohort="RCC", label_map=fixed)
    assert sorted(table["label"].unique()) == [0, 1, 2]
