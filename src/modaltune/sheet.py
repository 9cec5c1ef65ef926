"""Cohort sheet from a folder of slides: ``modaltune sheet SLIDE_DIR > cohort_sheet.tsv``.

Finds every file with an extension OpenSlide reads, derives ``slide_id`` and ``patient_id`` from the
TCGA barcode in the file name (GDC names slides ``<slide barcode>.<uuid>.svs``), from a user regex
with named groups, or from a GDC biospecimen ``slide.tsv``; opens each slide's header through
:mod:`modaltune.slide_io` to read its mpp (pixels are never read). Slides that cannot be opened or named
are reported, not written. The output is the TSV ``modaltune.workflow.read_sheet`` reads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from modaltune.errors import InputError, SlideError

# Vendor formats OpenSlide reads (openslide.org/formats): Aperio .svs/.tif, DICOM .dcm, Hamamatsu
# .ndpi/.vms/.vmu, Leica .scn, MIRAX .mrxs, Philips .tiff, Sakura .svslide, Trestle .tif, Ventana
# .bif/.tif, Zeiss .czi, and generic tiled TIFF.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                    ".dcm", ".czi")
# TCGA slide barcode: TCGA-TSS-PPPP-SSV-PPR-SLIDE (e.g. TCGA-A1-A0SB-01Z-00-DX1); the patient is its
# first three fields.
TCGA_SLIDE = re.compile(
    r"^(?P<slide_id>(?P<patient_id>TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-\d{2}[A-Z]?-\d{2}-[A-Z]{2}[A-Z0-9]*)",
    re.IGNORECASE,
)
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def find_slides(slide_dir: str | os.PathLike) -> list[Path]:
    """Every slide file under ``slide_dir`` (recursive, sorted). DICOM slides are folders of .dcm files:
    the folder is one slide, opened through its first file."""
    root = Path(slide_dir)
    if not root.is_dir():
        raise InputError(f"{root}: slide folder not found")
    found, dicom_dirs = [], set()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        ext = path.suffix.lower()
        if ext == ".dcm":
            if path.parent not in dicom_dirs:
                dicom_dirs.add(path.parent)
                found.append(path)
        elif ext in SLIDE_EXTENSIONS:
            found.append(path)
    return found


def _names(path: Path, regex: re.Pattern | None, bio: dict[str, str]) -> tuple[str | None, str | None]:
    stem = path.parent.name if path.suffix.lower() == ".dcm" else path.name.split(".")[0]
    if regex is not None:
        m = regex.search(path.name)
        if not m:
            return None, None
        groups = m.groupdict()
        return groups.get("slide_id") or stem, groups.get("patient_id")
    m = TCGA_SLIDE.match(path.name)
    if m:
        return m.group("slide_id").upper(), m.group("patient_id").upper()
    if stem in bio:
        return stem, bio[stem]
    return stem, None


def build_sheet(slide_dir: str | os.PathLike, *, biospecimen: str | os.PathLike | None = None,
                regex: str | None = None, read_mpp: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """(sheet with columns slide_id, patient_id, path (absolute), mpp; one message per file left out)."""
    from modaltune.clinical import read_biospecimen_tsv

    pattern = None
    if regex:
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise InputError(f"--regex {regex!r}: not a valid regular expression ({exc})") from exc
        if "patient_id" not in pattern.groupindex:
            raise InputError(f"--regex {regex!r}: needs a named group (?P<patient_id>...) "
                             "(and optionally (?P<slide_id>...))")
    bio: dict[str, str] = {}
    if biospecimen is not None:
        frame = read_biospecimen_tsv(biospecimen)
        bio = dict(zip(frame["slide_id"], frame["patient_id"], strict=True))

    rows, problems = [], []
    for path in find_slides(slide_dir):
        slide_id, patient_id = _names(path, pattern, bio)
        if slide_id is None:
            problems.append(f"{path}: file name does not match --regex {regex!r}; skipped")
            continue
        if bio and slide_id in bio and patient_id and bio[slide_id] != patient_id:
            problems.append(f"{path}: patient {patient_id} from the name but {bio[slide_id]} in {biospecimen}; "
                            "the biospecimen export is used")
        patient_id = bio.get(slide_id, patient_id)
        if patient_id is None:
            problems.append(f"{path}: no patient id (not a TCGA barcode, not in the biospecimen export); "
                            "pass --regex with a (?P<patient_id>...) group or --biospecimen slide.tsv")
            continue
        clean = _SAFE.sub("_", slide_id).strip("_.-") or "slide"
        mpp = np.nan
        if read_mpp:
            mpp, problem = _header_mpp(path)
            if problem is not None:
                problems.append(problem)
                if np.isnan(mpp) and "no pixel size" not in problem:
                    continue  # cannot be opened: not in the sheet
        rows.append({"slide_id": clean, "patient_id": patient_id.strip(), "path": str(path.resolve()), "mpp": mpp})
    sheet = pd.DataFrame(rows, columns=["slide_id", "patient_id", "path", "mpp"])
    dup = sheet["slide_id"].duplicated(keep="first")
    for row in sheet[dup].itertuples():
        first = sheet.loc[(sheet["slide_id"] == row.slide_id) & ~dup, "path"].iloc[0]
        problems.append(f"{row.path}: slide id {row.slide_id} already used by {first}; only the first is kept "
                        "(rename one, or give --regex with a (?P<slide_id>...) group)")
    return sheet[~dup].reset_index(drop=True), problems


def _header_mpp(path: Path) -> tuple[float, str | None]:
    """(level-0 mpp or NaN, problem message or None); opens the header only."""
    from modaltune.slide_io import open_openslide, resolve_mpp

    try:
        osr = open_openslide(path)
    except SlideError as exc:
        return np.nan, f"{path}: cannot be opened ({exc.reason}); skipped"
    try:
        mpp, _ = resolve_mpp(osr, path, None)
        return float(mpp), None
    except SlideError:
        return np.nan, (f"{path}: no pixel size (mpp) in the file; kept with an empty mpp: fill the mpp column "
                        "(micrometres per pixel at level 0) before running")
    finally:
        osr.close()
