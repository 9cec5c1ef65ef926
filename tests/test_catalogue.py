"""The catalogue of bad inputs and faults (docs/CATALOGUE.md): one test per case, each ending in a clear
error naming the file/field and the fix, or in a documented graceful path. Most go through preflight on a
small real-layout cohort; the table's other rows point at the stage tests that cover them."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from modaltune.demo import write_pyramid_tiff
from modaltune.errors import InputError
from modaltune.preflight import load_config
from modaltune.workflow import load_sheet
from tests.preflight_helpers import check, cohort_config, copy_cohort, make_cohort, one_problem, one_warning

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "docs" / "CATALOGUE.md"
# Rows whose tests live in other helpers' branches (reconciled at merge): checked once their file has them.
OTHER_BRANCHES = {
    "tests/test_faults.py::test_disk_full_features",
    "tests/test_faults.py::test_killed_mid_write_leaves_no_partial",
    "tests/test_evaluation.py::test_cox_convergence_warning_triggers_the_retry",
}


@pytest.fixture(scope="module")
def pristine_cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory)


@pytest.fixture
def cohort(pristine_cohort, tmp_path):
    return copy_cohort(pristine_cohort, tmp_path)


def _sheet(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort / "cohort_sheet.tsv", sep="\t", dtype=str, keep_default_na=False)


def _write_sheet(cohort, df) -> None:
    df.to_csv(cohort / "cohort_sheet.tsv", sep="\t", index=False)


def _first_slide(cohort) -> Path:
    return cohort / _sheet(cohort)["path"].iloc[0]


def _edit_clinical(cohort, fn) -> None:
    path = cohort / "clinical" / "clinical.tsv"
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    fn(df)
    df.to_csv(path, sep="\t", index=False)


def _rna_lines(cohort) -> list[str]:
    with gzip.open(cohort / "rna" / "HiSeqV2_PANCAN.gz", "rt") as fh:
        return fh.read().splitlines()


def _write_rna(cohort, lines) -> None:
    with gzip.open(cohort / "rna" / "HiSeqV2_PANCAN.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ slides


def test_truncated_slide_recorded_as_failed(cohort):
    slide = _first_slide(cohort)
    slide.write_bytes(slide.read_bytes()[:100])
    report = check(cohort_config(cohort))
    assert report.problems == []
    one_warning(report, "TCGA-D0-A001-01Z-00-DX1", "recorded as failed")
    # with tiling.on_error: raise the same slide stops the run
    strict = check(cohort_config(cohort, tiling={"on_error": "raise"}))
    one_problem(strict, "TCGA-D0-A001-01Z-00-DX1", "on_error: record")


def test_non_slide_file_recorded_as_failed(cohort):
    _first_slide(cohort).write_text("sample\tTCGA-D0-A001-01\nMKI67\t3.2\n")  # a table named .tiff
    report = check(cohort_config(cohort))
    one_warning(report, "TCGA-D0-A001-01Z-00-DX1", "OpenSlide", "recorded as failed")
    assert report.composition.iloc[0]["slides"] == 12  # the patient stays in the cohort


def test_no_mpp_needs_override(cohort):
    slide = _first_slide(cohort)
    write_pyramid_tiff(slide, np.full((384, 512, 3), 200, np.uint8), mpp=None)
    report = check(cohort_config(cohort))
    one_warning(report, "TCGA-D0-A001-01Z-00-DX1", "mpp", "mpp column of the cohort sheet")
    sheet = _sheet(cohort)
    sheet.loc[0, "mpp"] = "0.25"
    _write_sheet(cohort, sheet)
    assert not [w for w in check(cohort_config(cohort)).warnings if "DX1: " in w and "mpp" in w]


def test_duplicate_slide_ids_stop(cohort):
    sheet = _sheet(cohort)
    _write_sheet(cohort, pd.concat([sheet, sheet.iloc[[0]]]))
    one_problem(check(cohort_config(cohort)), "cohort_sheet.tsv", "duplicated slide_id", "TCGA-D0-A001-01Z-00-DX1")


def test_missing_slide_file_stops(cohort):
    _first_slide(cohort).unlink()
    problem = one_problem(check(cohort_config(cohort)), "cohort_sheet.tsv", "field path", "not found")
    assert "TCGA-D0-A001-01Z-00-DX1" in problem


@pytest.mark.parametrize("content, expect", [("", "is empty (0 bytes)"),
                                             ("slide_id\tpatient_id\tpath\tmpp\n", "no slides")])
def test_empty_sheet_names_the_sheet(cohort, content, expect):
    (cohort / "cohort_sheet.tsv").write_text(content)
    one_problem(check(cohort_config(cohort)), str(cohort / "cohort_sheet.tsv"), expect, "modaltune sheet")
    with pytest.raises(InputError, match=re.escape(str(cohort / "cohort_sheet.tsv"))):
        load_sheet(cohort_config(cohort), "c")


def test_windows_line_endings_and_stray_whitespace_are_stripped(cohort):
    sheet = _sheet(cohort)
    sheet["patient_id"] = sheet["patient_id"] + "  "
    sheet["slide_id"] = " " + sheet["slide_id"]
    text = sheet.to_csv(sep="\t", index=False, lineterminator="\r\n")
    (cohort / "cohort_sheet.tsv").write_bytes(text.encode())
    loaded = load_sheet(cohort_config(cohort), "c")
    assert loaded["slide_id"].iloc[0] == "TCGA-D0-A001-01Z-00-DX1"
    assert loaded["patient_id"].iloc[0] == "TCGA-D0-A001" and not loaded["path"].str.endswith("\r").any()
    assert check(cohort_config(cohort)).problems == []


def test_sheet_patient_not_in_clinical_stops(cohort):
    _edit_clinical(cohort, lambda df: df.drop(df.index[df["case_submitter_id"] == "TCGA-D0-A003"], inplace=True))
    problem = one_problem(check(cohort_config(cohort)), "cohort_sheet.tsv", "not in the clinical table")
    assert "TCGA-D0-A003" in problem


def test_biospecimen_patient_mismatch_stops(cohort):
    path = cohort / "biospecimen" / "slide.tsv"
    bio = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    bio.loc[bio["slide_submitter_id"] == "TCGA-D0-A001-01Z-00-DX1", "case_submitter_id"] = "TCGA-D0-A002"
    bio.to_csv(path, sep="\t", index=False)
    one_problem(check(cohort_config(cohort)), "slide.tsv", "case_submitter_id", "another patient")


def test_missing_input_file_names_config_key(cohort):
    (cohort / "clinical" / "clinical.tsv").unlink()
    one_problem(check(cohort_config(cohort)), "config cohorts.c.clinical", "not found")


# --------------------------------------------------------------------------------------------- RNA


def test_rna_nan_and_inf_are_reported(cohort):
    lines = _rna_lines(cohort)
    cells = lines[1].split("\t")
    cells[1], cells[2] = "inf", "NaN"
    lines[1] = "\t".join(cells)
    _write_rna(cohort, lines)
    report = check(cohort_config(cohort))
    assert report.problems == []
    one_warning(report, "HiSeqV2_PANCAN.gz", "1 NaN and 1 inf")


def test_ensembl_ids_stop(cohort):
    lines = _rna_lines(cohort)
    lines = [lines[0]] + [f"ENSG{i:011d}.5\t" + ln.split("\t", 1)[1] for i, ln in enumerate(lines[1:])]
    _write_rna(cohort, lines)
    one_problem(check(cohort_config(cohort)), "HiSeqV2_PANCAN.gz", "Ensembl")


def test_duplicated_genes_are_reported(cohort):
    report = check(cohort_config(cohort))  # the demo matrix carries two duplicated gene ids on purpose
    one_warning(report, "duplicated gene id", "highest variance")


def test_pathway_without_genes_stops_with_the_fix(cohort):
    with open(cohort / "genesets" / "demo.gmt", "a") as fh:
        fh.write("EMPTY_SET\tna\tNOTAGENE1\tNOTAGENE2\n")
    one_problem(check(cohort_config(cohort)), "demo.gmt", "EMPTY_SET", "min_genes_per_pathway=0")
    report = check(cohort_config(cohort, genomics={"min_genes_per_pathway": 0}))
    assert report.problems == []
    one_warning(report, "pathways without genes dropped", "EMPTY_SET")


def test_patient_without_rna_is_kept_and_reported(cohort):
    report = check(cohort_config(cohort))
    truth = pd.read_csv(cohort / "truth.tsv", sep="\t")
    no_rna = sorted(truth.loc[~truth["has_rna"], "patient_id"])
    warning = one_warning(report, "without an RNA sample", "missing-genes token")
    assert no_rna[0] in warning
    assert report.composition.iloc[0]["patients"] == 12


# ---------------------------------------------------------------------------------------- clinical


def test_unparseable_clinical_field_stops(cohort):
    def bad(df):
        df.loc[df["case_submitter_id"] == "TCGA-D0-A002", "days_to_last_follow_up"] = "about a year"

    _edit_clinical(cohort, bad)
    one_problem(check(cohort_config(cohort)), "clinical.tsv", "field days_to_last_follow_up", "about a year")


def test_diagnosis_not_in_class_map_stops_with_label_map_line(cohort):
    def synonym(df):
        df.loc[df["primary_diagnosis"] == "Lobular carcinoma, NOS", "primary_diagnosis"] = "Invasive lobular carcinoma"

    _edit_clinical(cohort, synonym)
    problem = one_problem(check(cohort_config(cohort)), "clinical.tsv", "field primary_diagnosis", "class(es) [1]")
    assert "'invasive lobular carcinoma'" in problem
    assert 'label_map: {"infiltrating duct carcinoma": 0, "lobular carcinoma": 1, "invasive lobular carcinoma": 1}' \
        in problem
    fixed = cohort_config(cohort)
    fixed["cohorts"]["c"]["label_map"] = {"infiltrating duct carcinoma": 0, "invasive lobular carcinoma": 1}
    assert check(fixed).problems == []


def test_fold_with_one_class_in_train_stops(cohort):
    truth = pd.read_csv(cohort / "truth.tsv", sep="\t")
    keep = truth.loc[(truth["label"] == 1) & truth["has_rna"], "patient_id"].iloc[0]

    def one_lobular(df):
        lob = (df["primary_diagnosis"] == "Lobular carcinoma, NOS") & (df["case_submitter_id"] != keep)
        df.loc[lob, "primary_diagnosis"] = "Infiltrating duct carcinoma, NOS"

    _edit_clinical(cohort, one_lobular)
    one_problem(check(cohort_config(cohort)), "splits fold", "class(es) [1] have no training patient", "n_folds")


def test_all_censored_partitions_are_reported(cohort):
    def censor(df):
        df["days_to_last_follow_up"] = np.where(df["vital_status"] == "Dead", df["days_to_death"],
                                                df["days_to_last_follow_up"])
        df["vital_status"] = "Alive"

    _edit_clinical(cohort, censor)
    report = check(cohort_config(cohort))
    assert report.problems == []
    one_warning(report, "fold 0 test", "no events (all censored): c-index undefined")


# ------------------------------------------------------------------------------------------ splits


def test_imported_split_patient_in_two_partitions_stops(cohort, tmp_path):
    ids = _sheet(cohort)["patient_id"].unique()
    split = tmp_path / "splits" / "splits_0.csv"
    split.parent.mkdir()
    cols = {"train": list(ids[:8]), "val": list(ids[8:10]), "test": [ids[10], ids[0]]}  # CLAM layout
    pd.DataFrame({k: pd.Series(v) for k, v in cols.items()}).to_csv(split, index=False)
    cfg = cohort_config(cohort, splits={"scheme": "import", "import_path": str(split.parent)})
    one_problem(check(cfg), "splits (import)", ids[0], "partitions ['test', 'train'] of fold 0")


def test_imported_split_files_are_inputs_of_the_splits_rule(tmp_path):
    folder = tmp_path / "imp"
    folder.mkdir()
    pd.DataFrame({"train": ["TCGA-D0-A001"], "val": ["TCGA-D0-A002"], "test": ["TCGA-D0-A003"]}).to_csv(
        folder / "splits_0.csv", index=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"splits": {"scheme": "import", "import_path": str(folder)},
                                   "results_dir": str(tmp_path / "results"), "demo_dir": str(tmp_path / "demo")}))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(cfg), "--",
                          str(tmp_path / "results/demo/splits/import.parquet")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    block = out.stdout.split("rule splits:")[1].split("\n\n")[0]
    assert str(folder / "splits_0.csv") in block


# -------------------------------------------------------------------------------- config and models


def test_unknown_encoder_stops(cohort):
    one_problem(check(cohort_config(cohort, embedding={"encoder": "uni2"}), global_checks=True),
                "config embedding.encoder", "uni2", "one of")


def test_missing_checkpoint_names_config_key(cohort, tmp_path):
    cfg = cohort_config(cohort, models=("modaltune",), embedding={"checkpoint": str(tmp_path / "w.bin")})
    cfg["models"]["modaltune"]["backbone"]["checkpoint"] = str(tmp_path / "slide_encoder.pth")
    report = check(cfg, global_checks=True)
    one_problem(report, "config embedding.checkpoint", "w.bin", "not found")
    one_problem(report, "config models.modaltune.backbone.checkpoint", "slide_encoder.pth", "not found")


def test_checkpoint_with_wrong_keys_stops(cohort, tmp_path):
    import torch

    ck = tmp_path / "other.pt"
    torch.save({"blocks.0.weight": torch.zeros(3, 3)}, ck)
    cfg = cohort_config(cohort, models=("modaltune",), embedding={"checkpoint": str(ck)})
    cfg["models"]["modaltune"].setdefault("backbone", {})["checkpoint"] = str(ck)
    report = check(cfg, global_checks=True)
    one_problem(report, "config embedding.checkpoint", "does not match", "missing")
    one_problem(report, "config models.modaltune.backbone.checkpoint", "lacks", "tensors the backbone needs")
    assert report.checkpoints["embedding.checkpoint"]["sha256"]  # recorded even when the keys are wrong


def test_wrong_feature_dimension_for_a_model_stops(cohort):
    cfg = cohort_config(cohort, models=("gigapath_lp",))
    cfg["models"]["gigapath_lp"]["backbone"] = {**cfg["models"]["gigapath_lp"].get("backbone", {}), "in_chans": 1536}
    one_problem(check(cfg, global_checks=True), "models.gigapath_lp", "in_chans=1536", "64 columns", "null")


def test_model_block_typo_stops_naming_block_and_valid_keys(cohort):
    cfg = cohort_config(cohort)
    cfg["models"]["abmil"]["hiden"] = 32
    problem = one_problem(check(cfg, global_checks=True), "config models.abmil", "['hiden']", "valid keys")
    assert "'hidden'" in problem
    from modaltune.models import ModelDims, build_model  # the training path stops the same way

    with pytest.raises(InputError, match="hiden"):
        build_model("abmil", cfg["models"]["abmil"], ModelDims(feature_dim=8, n_genes=4))


def test_unknown_model_architecture_stops(cohort):
    cfg = cohort_config(cohort)
    cfg["models"]["abmil"]["arch"] = "abmill"
    one_problem(check(cfg, global_checks=True), "config models.abmil.arch='abmill'", "unknown architecture")


@pytest.mark.parametrize("text, expect", [
    ("trainng: {epochs: 2}\n", r"config \(top level\): Additional properties .*'trainng'"),
    ("training: {epochs: two}\n", r"config training\.epochs: 'two' is not of type 'integer'"),
])
def test_config_typo_and_wrong_value_type_name_the_key(tmp_path, text, expect):
    path = tmp_path / "my.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=expect):
        load_config([path], base=ROOT / "config/config.yaml", schema=ROOT / "config/schemas/config.schema.yaml")


# ------------------------------------------------------------------------------------ the table itself


def _table_rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in CATALOGUE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            rows.append((cells[1], cells[2], cells[3]))
    return rows


def _node_ids(cell: str) -> list[str]:
    return re.findall(r"`(tests/[\w/]+\.py::[\w\[\]-]+)`", cell)


def _exists(node: str) -> bool:
    path, name = node.split("::")
    name = name.split("[")[0]
    file = ROOT / path
    return file.is_file() and re.search(rf"^def {re.escape(name)}\(", file.read_text(), flags=re.M) is not None


def test_catalogue_has_at_least_30_cases_each_with_a_test():
    rows = _table_rows()
    assert len(rows) >= 30
    for case, sees, tests in rows:
        assert case and sees and _node_ids(tests), f"row {case!r} needs what the user sees and a test"


def test_every_test_named_in_the_catalogue_exists():
    missing = [n for *_, t in _table_rows() for n in _node_ids(t) if n not in OTHER_BRANCHES and not _exists(n)]
    assert missing == []


def test_catalogue_tests_from_other_branches_exist_after_merge():
    named = {n for *_, t in _table_rows() for n in _node_ids(t)}
    assert OTHER_BRANCHES <= named
    absent = [n for n in sorted(OTHER_BRANCHES) if not _exists(n)]
    if absent:
        pytest.skip(f"tests of other branches not merged yet: {absent}")


def test_class_of_the_map_without_patients_stops(cohort):
    def only_ductal(df):
        df.loc[df["primary_diagnosis"] == "Lobular carcinoma, NOS", "primary_diagnosis"] = \
            "Infiltrating duct carcinoma, NOS"
        df.loc[df["primary_diagnosis"] == "Mucinous adenocarcinoma", "primary_diagnosis"] = "'--"

    _edit_clinical(cohort, only_ductal)
    problem = one_problem(check(cohort_config(cohort)), "field primary_diagnosis", "class(es) [1]", "no patients")
    assert "survival-only cohort" in problem


@pytest.mark.parametrize("model, path", [("modaltune", ("adapter",)), ("gigapath_lp", ("backbone",))])
def test_typo_inside_a_nested_model_block_stops(cohort, model, path):
    cfg = cohort_config(cohort, models=(model,))
    node = cfg["models"][model]
    for part in path:
        node = node.setdefault(part, {})
    node["num_headz"] = 4
    one_problem(check(cfg, global_checks=True), f"config models.{model}", f"'{path[-1]}.num_headz'", "valid keys")
