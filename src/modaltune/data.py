"""Per-patient dataset: all slides of a patient as one bag, joined with genes, clinical, text and labels.

One item per patient (method 1.8, case-wise). Fixes relative to the reference loader:
slides are placed side by side with *cumulative* offsets (bug 5), evaluation never subsamples patches
unless asked to (bug 6), genes are z-scored with a scaler fitted by the caller on training patients only
(bug 7), and patients without RNA / without a usable slide are kept with explicit masks (bug 10).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from modaltune.clinical import apply_covariates
from modaltune.errors import InputError
from modaltune.genomics import load_pathways, pathway_index_groups
from modaltune.tables import PARTITIONS, read_cases, read_sheets, read_splits

log = logging.getLogger(__name__)

COORD_SPACES = {"target": "coords_target", "level0": "coords"}


# ---------------------------------------------------------------------------------------------- readers
def read_text_h5(path) -> tuple[dict[str, int], np.ndarray]:
    """(patient -> row, embeddings (P, 4, T)) from a text/fold_{k}.h5 file."""
    if not Path(path).exists():
        raise InputError(f"text targets {path} do not exist; run the text_targets rule for this fold")
    with h5py.File(path, "r") as h5:
        if "patient_id" not in h5 or "embeddings" not in h5:
            raise InputError(f"text targets {path}: need datasets 'patient_id' and 'embeddings' (P,4,T)")
        ids = [p.decode() if isinstance(p, bytes) else str(p) for p in h5["patient_id"][()]]
        emb = np.asarray(h5["embeddings"][()], dtype=np.float32)
    if emb.ndim != 3 or emb.shape[0] != len(ids) or emb.shape[1] != 4:
        raise InputError(f"text targets {path}: embeddings must be (P, 4, T) with P={len(ids)}, got {emb.shape}")
    return {p: i for i, p in enumerate(ids)}, emb


def load_gene_table(pathways_path) -> tuple[pd.DataFrame, list[str], list[list[int]]]:
    """(patients x genes float32 frame, gene names, pathway index groups) via ``modaltune.genomics``."""
    df, groups = load_pathways(pathways_path)
    if "patient_id" in df.columns:
        df = df.set_index("patient_id")
    df.index = df.index.astype(str)
    genes = [c for c in df.columns if c != "sample_id" and pd.api.types.is_numeric_dtype(df[c])]
    df = df[genes].astype(np.float32)
    return df, genes, pathway_index_groups(genes, groups)


def feature_map(feature_files: Sequence[str | os.PathLike]) -> dict[str, str]:
    """slide_id (file stem) -> features HDF5 path."""
    out: dict[str, str] = {}
    for f in feature_files:
        stem = Path(f).name
        stem = stem[: -len(".h5")] if stem.endswith(".h5") else Path(f).stem
        if stem in out and out[stem] != str(f):
            raise InputError(f"feature files: two files for slide {stem}: {out[stem]} and {f}")
        out[stem] = str(f)
    return out


def feature_dim(feature_files: Sequence[str | os.PathLike]) -> int:
    """Feature width D from the first readable features file (attrs first, then the dataset shape)."""
    for f in feature_files:
        with h5py.File(f, "r") as h5:
            if "features" in h5 and h5["features"].ndim == 2 and h5["features"].shape[1] > 0:
                return int(h5["features"].shape[1])
            if "feature_dim" in h5.attrs:
                return int(h5.attrs["feature_dim"])
    raise InputError("feature files: none has a 'features' dataset or 'feature_dim' attr; run embed_patches")


def patient_seed(seed: int, patient_id: str, epoch: int) -> list[int]:
    """Stable per-(seed, patient, epoch) seed words (Python's hash() is salted per process)."""
    h = int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "little")
    return [int(seed), h, int(epoch)]


def usable_slide(path) -> bool:
    """A features file with status "ok" and at least one row (failed slides have status "failed", 0 rows)."""
    try:
        with h5py.File(path, "r") as h5:
            status = h5.attrs.get("status", "ok")
            status = status.decode() if isinstance(status, bytes) else str(status)
            return status != "failed" and "features" in h5 and h5["features"].shape[0] > 0
    except OSError as e:
        raise InputError(f"features {path}: cannot open HDF5 ({e}); rerun embed_patches for it") from e


# ---------------------------------------------------------------------------------------------- layout
def place_side_by_side(
    slide_coords: list[np.ndarray],
    *,
    tile: int,
    gap: int,
    grid_extent: int | None,
    patient_id: str = "",
) -> list[np.ndarray]:
    """Shift each slide right of the previous one with cumulative offsets (fixes method bug 5).

    The first slide keeps its own coordinates; slide k starts ``gap`` px right of slide k-1's right edge
    (max x + tile). When a row would leave the encoder grid, the next slide starts a new row below the
    tallest slide so far (shelf packing), so many-slide patients (GBMLGG has up to 17) still fit.
    ``grid_extent`` (= ngrids * tile px) bounds the result; ``None`` skips the check (MIL models
    that ignore positions).
    """
    out: list[np.ndarray] = []
    right = 0  # next free x in the current row
    row_top = 0  # y offset of the current row
    row_bottom = 0  # lowest edge reached so far
    for c in slide_coords:
        c = np.asarray(c, dtype=np.int64).reshape(-1, 2)
        if len(c) == 0:
            out.append(c)
            continue
        mn, mx = c.min(0), c.max(0)
        if all(len(o) == 0 for o in out):
            shifted = c.copy()
        else:
            width = int(mx[0] - mn[0]) + tile
            x0 = right + gap
            if grid_extent is not None and x0 + width > grid_extent and right > 0:
                row_top = row_bottom + gap
                x0 = 0
            shifted = c - mn + np.array([x0, row_top], dtype=np.int64)
        out.append(shifted)
        right = int(shifted[:, 0].max()) + tile  # the newest slide is always the rightmost in its row
        row_bottom = max(row_bottom, int(shifted[:, 1].max()) + tile)
    if grid_extent is not None:
        allc = np.concatenate([o for o in out if len(o)] or [np.zeros((0, 2), np.int64)])
        if len(allc) and (allc.min() < 0 or allc.max() >= grid_extent):
            raise InputError(
                f"patient {patient_id}: slide coordinates span {int(allc.max()) + 1} px, beyond the slide "
                f"encoder grid ({grid_extent} px = ngrids x tile); use coords_space='target' or fewer slides"
            )
    return out


# ---------------------------------------------------------------------------------------------- dataset
class CohortData:
    """One fold of a cohort, read once: cases, the fold's split, slides per patient, genes and text targets.

    Every HDF5 features file is opened once here (to find usable slides); the partitions' datasets are
    views of this object (``dataset``), so a training run reads the cohort's tables once.
    ``drop_without_slides``: patients without a usable slide leave every partition (slide-encoder models
    cannot embed an empty bag, and all models must share test patients). ``require_rna`` (the paper):
    patients without RNA leave every partition, for every model alike.
    """

    def __init__(self, cases, splits, fold: int, *, feature_files: Sequence[str | os.PathLike], sheet,
                 pathways_path=None, gene_table: tuple[pd.DataFrame, list[str], list[list[int]]] | None = None,
                 text_h5=None, drop_without_slides: bool = False, require_rna: bool = False):
        self.cases = read_cases(cases)
        self.fold = int(fold)
        split = read_splits(splits, fold)
        unknown = sorted(set(split["patient_id"]) - set(self.cases.index))
        if unknown:
            raise InputError(f"splits fold {fold}: patients {unknown[:5]} are not in cases; rebuild the splits")
        self.split = split
        self.partition = dict(zip(split["patient_id"], split["partition"], strict=True))
        ids = split["patient_id"].tolist()

        # No sheet (a cohort of RNA + clinical only): nobody has slides; only models without slides run on it.
        no_sheet = sheet is None or (isinstance(sheet, (list, tuple)) and not sheet)
        sheet_df = pd.DataFrame({"slide_id": [], "patient_id": []}) if no_sheet else read_sheets(sheet)
        fmap = feature_map(feature_files)
        self.slides: dict[str, list[str]] = {p: [] for p in ids}
        for sid, pid in zip(sheet_df["slide_id"], sheet_df["patient_id"], strict=True):
            if pid in self.slides:
                if sid in fmap:
                    self.slides[pid].append(fmap[sid])
                else:
                    log.warning("slide %s (patient %s) has no features file; skipped", sid, pid)
        self.feature_dim = feature_dim(list(fmap.values())) if fmap else 0
        if gene_table is None:
            if pathways_path is None:
                raise InputError("CohortData: pass pathways_path (genomics/pathways.parquet) or a loaded gene_table")
            gene_table = load_gene_table(pathways_path)
        self.gene_table = gene_table
        self.genes_df, self.gene_names, self.pathway_groups = gene_table

        self.dropped_without_slides: list[str] = []
        if drop_without_slides:
            # A data rule, not a model rule: the test sets of all models stay identical.
            self.dropped_without_slides = [p for p in ids if not any(map(usable_slide, self.slides[p]))]
            if self.dropped_without_slides:
                log.warning("%d patient(s) without a usable slide left out: %s", len(self.dropped_without_slides),
                            self.dropped_without_slides[:10])
        self.dropped_without_rna: list[str] = []
        if require_rna:
            self.dropped_without_rna = [p for p in ids if p not in self.genes_df.index]
            if self.dropped_without_rna:
                log.warning("require_rna: %d patient(s) without RNA left out: %s", len(self.dropped_without_rna),
                            self.dropped_without_rna[:10])
        dropped = set(self.dropped_without_slides) | set(self.dropped_without_rna)
        self.patient_ids: list[str] = [p for p in ids if p not in dropped]

        self.text_rows: dict[str, int] | None = None
        self.text_emb: np.ndarray | None = None
        self.text_h5 = text_h5
        if text_h5 is not None:
            self.text_rows, self.text_emb = read_text_h5(text_h5)

    def ids(self, partitions: Sequence[str]) -> list[str]:
        """Kept patients of these partitions, in split order."""
        bad = sorted(set(partitions) - set(PARTITIONS))
        if bad:
            raise InputError(f"unknown partition(s) {bad}; allowed {list(PARTITIONS)}")
        return [p for p in self.patient_ids if self.partition[p] in set(partitions)]

    def fit_ids(self) -> list[str]:
        """Training patients that fitted preprocessing sees (gene scaler, covariates, survival bins):
        the split's train partition, less the patients ``require_rna`` removed."""
        drop = set(self.dropped_without_rna)
        return [p for p in self.split.loc[self.split["partition"] == "train", "patient_id"] if p not in drop]

    def dataset(self, partitions: Sequence[str], **view) -> PatientDataset:
        """A ``PatientDataset`` view of these partitions (keyword options as ``PatientDataset``)."""
        return PatientDataset.from_cohort(self, list(partitions), **view)


class PatientDataset(Dataset):
    """One item per patient of ``fold``'s ``partitions``; features are read lazily with h5py per item.

    Build it from a loaded cohort (``CohortData(...).dataset(partitions, ...)``) to read the cohort once;
    the direct constructor loads the cohort itself (same arguments as ``CohortData`` plus the view options).
    ``gene_scaler`` must be fitted by the caller on the fold's training patients (never val/test);
    ``covariate_state`` comes from ``modaltune.clinical.encode_covariates`` on training patients.
    ``max_patches`` subsamples deterministically per (seed, patient, epoch) only when ``train`` is True
    or ``subsample_eval`` is set; evaluation sees every patch by default. ``use_text`` False leaves the
    text targets out (zeros of width 0).
    """

    def __init__(self, cases, splits, fold: int, partitions: list[str], *,
                 feature_files: Sequence[str | os.PathLike], sheet, pathways_path=None, text_h5=None,
                 gene_table=None, drop_without_slides: bool = False, require_rna: bool = False, **view):
        cohort = CohortData(cases, splits, fold, feature_files=feature_files, sheet=sheet,
                            pathways_path=pathways_path, gene_table=gene_table, text_h5=text_h5,
                            drop_without_slides=drop_without_slides, require_rna=require_rna)
        self._init_view(cohort, list(partitions), **view)

    @classmethod
    def from_cohort(cls, cohort: CohortData, partitions: list[str], **view) -> PatientDataset:
        self = cls.__new__(cls)
        Dataset.__init__(self)
        self._init_view(cohort, partitions, **view)
        return self

    def _init_view(
        self,
        cohort: CohortData,
        partitions: list[str],
        *,
        gene_scaler=None,
        covariate_state=None,
        coords_space: str = "target",
        slide_gap: int = 1500,
        max_patches: int | None = 25000,
        seed: int = 0,
        train: bool = True,
        sites: Sequence[str] | None = None,
        grid_ngrids: int | None = None,
        grid_tile: int = 256,
        subsample_eval: bool = False,
        use_text: bool = True,
    ) -> None:
        if coords_space not in COORD_SPACES:
            raise InputError(f"coords_space must be one of {sorted(COORD_SPACES)}, got {coords_space!r}")
        bad = sorted(set(partitions) - set(PARTITIONS))
        if bad:
            raise InputError(f"PatientDataset: unknown partition(s) {bad}; allowed {list(PARTITIONS)}")
        self.cohort = cohort
        self.cases = cohort.cases
        in_parts = [p for p in cohort.split["patient_id"] if cohort.partition[p] in set(partitions)]
        if sites is not None and "site" in self.cases.columns:
            in_parts = [p for p in in_parts if self.cases.at[p, "site"] in set(sites)]
        kept = set(cohort.patient_ids)
        self.dropped_without_slides = [p for p in in_parts if p in set(cohort.dropped_without_slides)]
        self.dropped_without_rna = [p for p in in_parts if p in set(cohort.dropped_without_rna)]
        ids = [p for p in in_parts if p in kept]
        self.patient_ids: list[str] = ids
        self.partition = {p: cohort.partition[p] for p in in_parts}
        self.coords_key = COORD_SPACES[coords_space]
        self.slide_gap, self.max_patches, self.seed, self.train = int(slide_gap), max_patches, int(seed), train
        self.subsample_eval = subsample_eval
        self.grid_extent = None if grid_ngrids is None else int(grid_ngrids) * int(grid_tile)
        self.grid_tile = int(grid_tile)
        self.epoch = 0
        self.slides = {p: cohort.slides[p] for p in ids}
        self.feature_dim = cohort.feature_dim
        self.gene_names, self.pathway_groups = cohort.gene_names, cohort.pathway_groups

        genes_df = cohort.genes_df
        present = [p for p in ids if p in genes_df.index]
        self.has_genes = {p: p in genes_df.index for p in ids}
        g = np.zeros((len(ids), len(self.gene_names)), np.float32)
        if present:
            sub = genes_df.loc[present, self.gene_names]
            vals = np.asarray(gene_scaler.transform(sub) if gene_scaler is not None else sub, np.float32)
            row = {p: i for i, p in enumerate(ids)}
            g[[row[p] for p in present]] = np.nan_to_num(vals)
        self.genes = g

        if covariate_state is not None:
            x = np.asarray(apply_covariates(self.cases.loc[ids].reset_index(drop=True), covariate_state), np.float32)
            if x.ndim == 1:
                x = x[:, None]
            names = list(covariate_state.get("feature_names", [])) if hasattr(covariate_state, "get") else []
            miss = [j for j, n in enumerate(names) if n.endswith("missing")]
            # A patient is "without clinical data" when every field sits on its missing indicator.
            self.has_clinical = (~(x[:, miss] == 1).all(1) if miss and len(names) == x.shape[1]
                                 else np.isfinite(x).any(1))
            self.clinical = np.nan_to_num(x)
        else:
            self.clinical = np.zeros((len(ids), 0), np.float32)
            self.has_clinical = np.zeros(len(ids), bool)

        self.text_dim = 0
        self.text = None
        if use_text and cohort.text_emb is not None:
            rows, emb = cohort.text_rows, cohort.text_emb
            self.text_dim = emb.shape[2]
            missing = [p for p in ids if p not in rows]
            if missing:
                raise InputError(f"text targets {cohort.text_h5}: no row for patients {missing[:5]}; "
                                 "rerun text_targets")
            self.text = emb[[rows[p] for p in ids]]

    def set_epoch(self, epoch: int) -> None:
        """Training subsamples differently each epoch, reproducibly (seeded per seed/patient/epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.patient_ids)

    def _read_slides(self, pid: str) -> tuple[np.ndarray, np.ndarray]:
        feats, coords = [], []
        for f in self.slides[pid]:
            try:
                h5 = h5py.File(f, "r")
            except OSError as e:
                raise InputError(f"features {f}: cannot open HDF5 ({e}); rerun embed_patches for it") from e
            with h5:
                status = h5.attrs.get("status", "ok")
                status = status.decode() if isinstance(status, bytes) else str(status)
                if status == "failed" or h5.get("features") is None or h5["features"].shape[0] == 0:
                    continue
                if self.coords_key not in h5:
                    raise InputError(f"features {f}: no '{self.coords_key}' dataset; re-embed with this version")
                feats.append(np.asarray(h5["features"][()], np.float32))
                coords.append(np.asarray(h5[self.coords_key][()], np.int64))
        if not feats:
            return np.zeros((0, self.feature_dim), np.float32), np.zeros((0, 2), np.int64)
        coords = place_side_by_side(coords, tile=self.grid_tile, gap=self.slide_gap,
                                    grid_extent=self.grid_extent, patient_id=pid)
        return np.concatenate(feats), np.concatenate(coords)

    def __getitem__(self, i: int) -> dict:
        pid = self.patient_ids[i]
        feats, coords = self._read_slides(pid)
        n = len(feats)
        if self.max_patches and n > self.max_patches and (self.train or self.subsample_eval):
            rng = np.random.default_rng(patient_seed(self.seed, pid, self.epoch if self.train else 0))
            keep = np.sort(rng.choice(n, size=int(self.max_patches), replace=False))
            feats, coords = feats[keep], coords[keep]
        row = self.cases.loc[pid]
        label = row["label"]
        text = (torch.from_numpy(self.text[i]) if self.text is not None else torch.zeros(4, 0))
        return {
            "features": torch.from_numpy(np.ascontiguousarray(feats)),
            "coords": torch.from_numpy(coords.astype(np.float32)),
            "genes": torch.from_numpy(self.genes[i]),
            "has_genes": bool(self.has_genes[pid]),
            "clinical": torch.from_numpy(self.clinical[i]),
            "has_clinical": bool(self.has_clinical[i]),
            "text": text,
            "label": int(label) if pd.notna(label) else -1,
            "time": float(row["survival_months"]) if pd.notna(row["survival_months"]) else float("nan"),
            "event": float(row["event"]) if pd.notna(row["event"]) else float("nan"),
            "patient_id": pid,
            "site": str(row["site"]) if "site" in row.index and pd.notna(row["site"]) else "",
            "partition": self.partition[pid],
        }


def collate_patients(items: list[dict]) -> dict:
    """Pad the patch axis and stack everything else: the batch contract of docs/ARCHITECTURE.md."""
    b = len(items)
    n = max((it["features"].shape[0] for it in items), default=0)
    d = max((it["features"].shape[1] for it in items), default=0)
    feats = torch.zeros(b, n, d, dtype=torch.float32)
    coords = torch.zeros(b, n, 2, dtype=torch.float32)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, it in enumerate(items):
        k = it["features"].shape[0]
        if k:
            feats[i, :k] = it["features"].float()
            coords[i, :k] = it["coords"]
            mask[i, :k] = True
    return {
        "features": feats,
        "coords": coords,
        "patch_mask": mask,
        "genes": torch.stack([it["genes"].float() for it in items]),
        "has_genes": torch.tensor([it["has_genes"] for it in items], dtype=torch.bool),
        "clinical": torch.stack([it["clinical"].float() for it in items]),
        "has_clinical": torch.tensor([it["has_clinical"] for it in items], dtype=torch.bool),
        "text": torch.stack([it["text"].float() for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "time": torch.tensor([it["time"] for it in items], dtype=torch.float32),
        "event": torch.tensor([it["event"] for it in items], dtype=torch.float32),
        "patient_id": [it["patient_id"] for it in items],
        "site": [it["site"] for it in items],
    }


__all__ = ["CohortData", "PatientDataset", "collate_patients", "place_side_by_side", "read_cases", "read_splits"]
