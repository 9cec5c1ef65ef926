"""modaltune sheet: cohort sheet from a folder of slides (names from TCGA barcodes / regex / biospecimen)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from modaltune.cli import main
from modaltune.demo import write_pyramid_tiff
from modaltune.errors import InputError
from modaltune.sheet import SLIDE_EXTENSIONS, build_sheet
from modaltune.workflow import read_sheet

UUID = "B34C267B-D38D-4BE7-A8B5-5C8A5A1F7D6B"


def _rgb(seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((300, 400, 3), 235, np.uint8)
    img[50:250, 60:340] = rng.integers(80, 200, (200, 280, 3), dtype=np.uint8)
    return img


@pytest.fixture
def slide_dir(tmp_path):
    d = tmp_path / "slides"
    (d / "batch2").mkdir(parents=True)
    write_pyramid_tiff(d / f"TCGA-A1-A0SB-01Z-00-DX1.{UUID}.svs", _rgb(0), mpp=0.2527)
    write_pyramid_tiff(d / "batch2" / f"TCGA-A1-A0SB-01Z-00-DX2.{UUID}.tif", _rgb(1), mpp=0.5)
    write_pyramid_tiff(d / "TCGA-BH-A0AY-01Z-00-DX1.tiff", _rgb(2), mpp=None)  # no resolution
    (d / "TCGA-BH-A0B3-01Z-00-DX1.svs").write_bytes(b"truncated" * 50)  # cannot be opened
    (d / "notes.txt").write_text("not a slide")  # ignored: not a slide extension
    (d / ".TCGA-XX-0000-01Z-00-DX1.part.svs").write_bytes(b"")  # hidden temp file: ignored
    return d


def test_tcga_names_mpp_and_reported_failures(slide_dir):
    sheet, problems = build_sheet(slide_dir)
    # the uuid after the barcode is dropped; the sub-folder slide is found too
    assert sorted(sheet["slide_id"]) == ["TCGA-A1-A0SB-01Z-00-DX1", "TCGA-A1-A0SB-01Z-00-DX2",
                                         "TCGA-BH-A0AY-01Z-00-DX1"]
    by_id = sheet.set_index("slide_id")
    assert by_id.loc["TCGA-A1-A0SB-01Z-00-DX2", "patient_id"] == "TCGA-A1-A0SB"
    assert by_id.loc["TCGA-A1-A0SB-01Z-00-DX1", "mpp"] == pytest.approx(0.2527, rel=1e-3)
    assert by_id.loc["TCGA-A1-A0SB-01Z-00-DX2", "mpp"] == pytest.approx(0.5, rel=1e-3)
    assert np.isnan(by_id.loc["TCGA-BH-A0AY-01Z-00-DX1", "mpp"])  # kept, mpp to be filled in
    assert any("TCGA-BH-A0AY" in p and "no pixel size" in p for p in problems)
    assert any("TCGA-BH-A0B3" in p and "cannot be opened" in p for p in problems)
    assert "TCGA-BH-A0B3-01Z-00-DX1" not in set(sheet["slide_id"])


def test_cli_writes_a_sheet_the_workflow_reads(slide_dir, tmp_path, capsys):
    out = tmp_path / "cohort_sheet.tsv"
    assert main(["sheet", str(slide_dir), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "3 slide(s) of 2 patient(s)" in err and "cannot be opened" in err
    sheet = read_sheet(out)
    assert set(sheet["patient_id"]) == {"TCGA-A1-A0SB", "TCGA-BH-A0AY"}
    assert all(pd.Series(sheet["path"]).map(lambda p: p.startswith("/")))


def test_stdout_output(slide_dir, capsys):
    assert main(["sheet", str(slide_dir), "--no-mpp"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "slide_id\tpatient_id\tpath\tmpp" and len(out) == 5  # header + 4 (not opened)


def test_regex_and_biospecimen_for_other_names(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    write_pyramid_tiff(d / "lab_P017_block3.tif", _rgb(0), mpp=0.5)
    write_pyramid_tiff(d / "scan_0042.tif", _rgb(1), mpp=0.5)
    sheet, problems = build_sheet(d, regex=r"lab_(?P<patient_id>P\d+)_(?P<slide_id>block\d+)")
    assert sheet[["slide_id", "patient_id"]].values.tolist() == [["block3", "P017"]]
    assert any("scan_0042.tif" in p and "does not match --regex" in p for p in problems)
    bio = tmp_path / "slide.tsv"
    pd.DataFrame({"case_submitter_id": ["PAT-9"], "slide_submitter_id": ["scan_0042"]}).to_csv(
        bio, sep="\t", index=False)
    sheet, problems = build_sheet(d, biospecimen=bio)
    assert sheet.set_index("slide_id").loc["scan_0042", "patient_id"] == "PAT-9"
    assert any("lab_P017_block3.tif" in p and "no patient id" in p for p in problems)
    with pytest.raises(InputError, match="patient_id"):
        build_sheet(d, regex=r"lab_(?P<pid>P\d+)")


def test_duplicate_slide_ids_keep_first_and_report(tmp_path):
    d = tmp_path / "s"
    (d / "a").mkdir(parents=True)
    (d / "b").mkdir()
    write_pyramid_tiff(d / "a" / "TCGA-A1-A0SB-01Z-00-DX1.svs", _rgb(0), mpp=0.5)
    write_pyramid_tiff(d / "b" / "TCGA-A1-A0SB-01Z-00-DX1.svs", _rgb(1), mpp=0.5)
    sheet, problems = build_sheet(d)
    assert len(sheet) == 1 and any("already used" in p for p in problems)


def test_extensions_cover_openslide_formats():
    assert {".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".dcm", ".svslide", ".vms", ".tif", ".tiff"} <= set(
        SLIDE_EXTENSIONS)
