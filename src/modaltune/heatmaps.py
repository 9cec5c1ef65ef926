"""Tile heatmaps of trained runs: per-slide scores (HDF5), a thumbnail overlay and a top-tile gallery (PNG),
and a GeoJSON that QuPath opens.

What a tile's score is, per model (each model's ``tile_scores(batch)``, contract C5):

* ABMIL (and late fusion with an ABMIL/TransMIL slide side): the gated-attention pooling weight.
* TransMIL: the last layer's CLS-to-patch attention (mean over heads; square-grid copies summed).
* MCAT: the genomic-guided co-attention weight (pathway tokens query the patches), mean over pathways.
* SurvPath: the interaction layer's pathway-to-patch attention, mean over pathways and heads.
* ModalTune: the Modal Adapter's Extractor cross-attention, in which the modal tokens are the queries
  and the image tokens the keys. A tile's score for task pass t is the weight the task token of that
  pass puts on the tile, averaged over heads and over every Extractor (scores "general", "diagnosis",
  "survival"; "modal_tokens" averages all modal tokens). Why this and not the frozen encoder's
  self-attention: the Extractor is the only place where the trained part of the model reads the image,
  and the task token is what the task embedding is built from; the Injector's attention runs the other
  way (image queries the modal tokens) and says nothing about which tiles matter.

A patient's scores cover all of its slides (the bag is the patient); a slide's heatmap shows its share.
Scores are attention weights, so they are comparable within a patient, not across patients; the PNG
therefore colours each tile by the percentile of its score within the slide, while the HDF5 and the
GeoJSON keep the raw values. Coordinates are level-0 pixels of the slide (top-left corners), as in the
features HDF5, and a tile covers ``tile_size_level0`` pixels at level 0.

Selection (rules/heatmaps.smk): explicit slide ids from config, or the k highest/lowest-risk test
patients of a run (read from the run's ``predictions.parquet``) written into k numbered slot files, so
that every output is known when the DAG is built.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from modaltune import __version__
from modaltune.data import PatientDataset, collate_patients, load_gene_table, usable_slide
from modaltune.errors import InputError
from modaltune.io_utils import atomic_path, file_sha256
from modaltune.models import positional_grid
from modaltune.runs import build_from_state, load_state, pick_device, restore_preprocessing, to_device
from modaltune.tables import read_sheets, read_splits, read_table

log = logging.getLogger(__name__)

# The score drawn when config does not name one (the first key of the model's tile_scores otherwise).
DEFAULT_SCORE = {"modaltune": "diagnosis"}


# ------------------------------------------------------------------------------------------ run loading
def load_run_and_data(run_dir, *, cases, splits, fold: int, pathways_path, feature_files, sheet,
                      patient_ids: Sequence[str] | None = None, partitions=("train", "val", "test")):
    """(state, model in eval mode, PatientDataset of ``patient_ids`` (or every patient of ``partitions``)).

    The one place that uses the run-loading API (C4: ``modaltune.runs`` after the merge); the dataset is
    built exactly as evaluation builds it: the run's gene scaler and covariates, every patch.
    """
    state = load_state(run_dir)
    train_cfg = state["train_cfg"]
    split = read_splits(splits, int(fold))
    sheet_df = read_sheets(sheet)
    if patient_ids is not None:
        wanted = set(map(str, patient_ids))
        unknown = sorted(wanted - set(split["patient_id"]))
        if unknown:
            raise InputError(f"splits {splits}: patient(s) {unknown[:5]} are not in fold {fold}; heatmaps can "
                             "only be drawn for patients of the run's cohort")
        split = split[split["patient_id"].isin(wanted)]
        sheet_df = sheet_df[sheet_df["patient_id"].isin(wanted)]
    gene_table = load_gene_table(pathways_path)
    if gene_table[1] != list(state["gene_names"]):
        raise InputError(f"pathways {pathways_path}: the gene list differs from the one run {run_dir} was "
                         "trained on; draw heatmaps on the run's own cohort")
    gene_scaler, cov_state = restore_preprocessing(state)
    device = pick_device(train_cfg.get("device", "auto"))
    model = build_from_state(state, device)
    ngrids, tile = positional_grid(state["arch"], state["model_cfg"])
    ds = PatientDataset(
        cases, split, int(fold), list(partitions), feature_files=list(feature_files),
        sheet=sheet_df, pathways_path=pathways_path, text_h5=None, gene_scaler=gene_scaler,
        covariate_state=cov_state, coords_space=train_cfg.get("coords_space", "target"),
        slide_gap=train_cfg.get("slide_gap", 1500), max_patches=None, seed=int(state["seed"]), train=False,
        grid_ngrids=ngrids, grid_tile=tile, gene_table=gene_table,
        drop_without_slides=bool(train_cfg.get("drop_patients_without_slides", True)),
    )
    return state, model, ds, device


# ------------------------------------------------------------------------------------------ scoring
def patient_slides(dataset, patient_id: str) -> list[tuple[str, str, int]]:
    """(slide_id, features file, n rows) in the order the dataset concatenates the patient's slides."""
    out = []
    for f in dataset.slides[patient_id]:
        if not usable_slide(f):
            continue
        with h5py.File(f, "r") as h5:
            n = int(h5["features"].shape[0])
        out.append((slide_id_of(f), f, n))
    return out


def slide_id_of(features_file) -> str:
    name = Path(features_file).name
    return name[: -len(".h5")] if name.endswith(".h5") else Path(name).stem


def score_patient(model, dataset, patient_id: str, device="cpu") -> dict[str, dict[str, np.ndarray]]:
    """{slide_id: {score name: (n_tiles,) float32}} for one patient, from ``model.tile_scores``."""
    import torch


    if not hasattr(model, "tile_scores"):
        raise InputError(f"model {type(model).__name__} has no tile scores; choose heatmap models among "
                         "abmil, transmil, mcat, survpath, modaltune and late fusion with an abmil slide side")
    if patient_id not in dataset.patient_ids:
        raise InputError(f"patient {patient_id}: not in the run's dataset (no usable slide?); pick another slide")
    batch = to_device(collate_patients([dataset[dataset.patient_ids.index(patient_id)]]), device)
    model.eval()
    with torch.inference_mode():
        scores = {k: v[0].float().cpu().numpy() for k, v in model.tile_scores(batch).items()}
    out, start = {}, 0
    for sid, _, n in patient_slides(dataset, patient_id):
        out[sid] = {k: v[start:start + n].astype(np.float32) for k, v in scores.items()}
        start += n
    total = next(iter(scores.values())).shape[0]
    if start != total:
        raise InputError(f"patient {patient_id}: {total} scored tiles but the feature files hold {start} rows")
    return out


def tile_geometry(features_file) -> tuple[np.ndarray, float, dict]:
    """(level-0 coords (N, 2) int64, tile side in level-0 px, attrs) of a features HDF5."""
    with h5py.File(features_file, "r") as h5:
        coords = np.asarray(h5["coords"][()], np.int64).reshape(-1, 2)
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
    try:
        size = float(attrs["patch_size"]) * float(attrs["target_mpp"]) / float(attrs["level0_mpp"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise InputError(f"features {features_file}: attrs patch_size/target_mpp/level0_mpp missing or invalid "
                         f"({e}); re-embed the slide with this version") from e
    return coords, size, attrs


# ------------------------------------------------------------------------------------------ writers
def write_heatmap_h5(path, coords: np.ndarray, scores: dict[str, np.ndarray], score: str, tile_size: float,
                     provenance: dict) -> None:
    """datasets ``coords`` (N, 2) int64 level-0 top-left, ``scores`` (N,) float32 (the chosen score),
    ``all_scores/<name>``; attrs: provenance + score name, tile size, modaltune version."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        h5.create_dataset("scores", data=np.asarray(scores.get(score, np.zeros(len(coords))), np.float32))
        grp = h5.create_group("all_scores")
        for k, v in scores.items():
            grp.create_dataset(k, data=np.asarray(v, np.float32))
        attrs = {**provenance, "score": score, "tile_size_level0": float(tile_size),
                 "score_names": json.dumps(sorted(scores)), "modaltune_version": __version__}
        for k, v in attrs.items():
            h5.attrs[k] = "none" if v is None else (json.dumps(v) if isinstance(v, (dict, list, tuple)) else v)


def geojson_features(coords: np.ndarray, tile_size: float, scores: np.ndarray, score: str) -> dict:
    """QuPath-readable FeatureCollection: one closed square Polygon per tile (level-0 px), the score as
    a measurement (QuPath 0.4+ reads ``measurements`` as a name -> value mapping)."""
    feats = []
    s = float(tile_size)
    for (x, y), v in zip(np.asarray(coords, float), np.asarray(scores, float), strict=True):
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        feats.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "tile", "name": f"{score} {v:.4g}" if np.isfinite(v) else score,
                           "measurements": {score: float(v) if np.isfinite(v) else None}},
        })
    return {"type": "FeatureCollection", "features": feats}


def write_geojson(path, coords, tile_size, scores, score) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(geojson_features(coords, tile_size, scores, score)))


def percentile_rank(scores: np.ndarray) -> np.ndarray:
    """Percentile (0-100) of each finite score within the slide; NaN stays NaN."""
    from scipy.stats import rankdata

    out = np.full(len(scores), np.nan)
    ok = np.isfinite(scores)
    if ok.sum() == 1:
        out[ok] = 100.0
    elif ok.any():
        out[ok] = 100.0 * (rankdata(scores[ok]) - 1) / (ok.sum() - 1)
    return out


def _thumbnail(slide_path, max_px: int) -> tuple[np.ndarray, float]:
    """(RGB thumbnail, level-0 px per thumbnail px)."""
    from modaltune.slide_io import open_openslide

    with open_openslide(slide_path) as osr:
        w0, _ = osr.dimensions
        thumb = np.asarray(osr.get_thumbnail((max_px, max_px)).convert("RGB"))
    return thumb, w0 / thumb.shape[1]


def draw_heatmap_png(path, slide_path, coords, tile_size, scores, *, title: str, score: str,
                     max_px: int = 1600) -> None:
    """Thumbnail (left) and thumbnail with the tiles coloured by score percentile (right), colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thumb, down = _thumbnail(slide_path, max_px)
    pct = percentile_rank(np.asarray(scores, float))
    raster = np.full(thumb.shape[:2], np.nan, np.float32)
    s = tile_size / down
    for (x, y), v in zip(np.asarray(coords, float) / down, pct, strict=True):
        if np.isfinite(v):
            x0, y0 = int(round(x)), int(round(y))
            raster[y0:max(y0 + 1, int(round(y + s))), x0:max(x0 + 1, int(round(x + s)))] = v
    h, w = thumb.shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6 * h / w + 1.2), constrained_layout=True)
    axes[0].imshow(thumb)
    axes[0].set_title("slide")
    axes[1].imshow(thumb)
    im = axes[1].imshow(np.ma.masked_invalid(raster), cmap="jet", alpha=0.5, vmin=0, vmax=100,
                        interpolation="nearest")
    axes[1].set_title(f"{score} (n = {int(np.isfinite(pct).sum())} tiles)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    del im  # the colour bar is drawn opaque (the overlay's alpha would wash it out)
    bar = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 100), cmap="jet")
    cb = fig.colorbar(bar, ax=axes[1], fraction=0.046, pad=0.02)
    cb.set_label(f"{score}: percentile within slide (100 = highest)")
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def draw_gallery_png(path, slide_path, coords, tile_size, scores, *, k: int, title: str, score: str,
                     px: int = 192) -> None:
    """The k highest-scoring tiles (top row) and, for contrast, the k lowest (bottom row), read with
    OpenSlide at level 0 and labelled with rank and score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from modaltune.slide_io import open_openslide

    v = np.asarray(scores, float)
    ok = np.flatnonzero(np.isfinite(v))
    order = ok[np.argsort(-v[ok], kind="stable")]
    k = max(1, min(int(k), len(order))) if len(order) else 1
    rows = [("highest", order[:k]), ("lowest", order[::-1][:k])]
    fig, axes = plt.subplots(2, k, figsize=(2.1 * k, 5.0), squeeze=False, constrained_layout=True)
    side = int(round(tile_size))
    with open_openslide(slide_path) as osr:
        for r, (label, idx) in enumerate(rows):
            for c in range(k):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= len(idx):
                    ax.axis("off")
                    continue
                i = int(idx[c])
                x, y = (int(t) for t in coords[i])
                tile = osr.read_region((x, y), 0, (side, side)).convert("RGB").resize((px, px), Image.BILINEAR)
                ax.imshow(np.asarray(tile))
                ax.set_title(f"{label} #{c + 1}\n{score} {v[i]:.3g}\n({x}, {y})", fontsize=7)
    fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def draw_empty_png(path, text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------ selection
def rank_test_slides(predictions, sheet, k: int, which: str = "high") -> list[tuple[str, str, float]]:
    """(slide_id, patient_id, risk) of the ``k`` test patients with the highest (``which="high"``) or
    lowest risk in a run's predictions table (C2: ``patient_id``, ``partition``, ``risk``, higher =
    worse); per patient its first slide in the sheet. Patients without a risk (NaN) are skipped."""

    if which not in ("high", "low"):
        raise InputError(f"rank_test_slides: which={which!r}; use 'high' or 'low'")
    pred = read_table(predictions, "predictions", ["patient_id", "partition", "risk"])
    test = pred[(pred["partition"] == "test") & np.isfinite(pred["risk"].astype(float))]
    test = test.sort_values(["risk", "patient_id"], ascending=[which == "low", True])
    sh = read_sheets(sheet)
    first = sh.drop_duplicates("patient_id").set_index("patient_id")["slide_id"]
    out = []
    for pid, risk in zip(test["patient_id"], test["risk"].astype(float), strict=True):
        if pid in first.index:
            out.append((str(first[pid]), str(pid), float(risk)))
        if len(out) == int(k):
            break
    return out


# ------------------------------------------------------------------------------------------ the stage
def _provenance(state: dict, run_dir, model_name: str | None) -> dict:

    cfg = state.get("model_cfg") or {}
    ckpt = (cfg.get("backbone") or {}).get("checkpoint") or ((cfg.get("slide") or {}).get("backbone") or {}).get(
        "checkpoint")
    return {
        "model": model_name or state.get("model_name"), "arch": state.get("arch"), "run_dir": str(run_dir),
        "seed": int(state["seed"]), "fold": int(state.get("fold", -1)),
        "state_sha256": file_sha256(Path(run_dir) / "state.pt") or "none",
        "checkpoint_sha256": (file_sha256(ckpt) if ckpt and os.path.isfile(ckpt) else "none"),
    }


def make_heatmaps(*, run_dir, slides: Sequence[str | None], outputs: Sequence[dict], cases, splits, fold: int,
                  pathways_path, feature_files, sheet, score: str | None = None, top_tiles: int = 8,
                  thumbnail_px: int = 1600, labels: Sequence[str] | None = None) -> list[dict]:
    """Draw one heatmap per slide of ``slides`` into ``outputs[i]`` (keys h5, png, geojson, tiles).

    A ``None`` slide (an unfilled ranked slot) gets placeholder files that say so. ``labels[i]`` is
    added to the title and the h5 attrs (e.g. "highest risk #1, risk 1.23"). Returns one summary per slide.
    """
    if len(slides) != len(outputs):
        raise InputError(f"make_heatmaps: {len(slides)} slides but {len(outputs)} output sets")
    labels = list(labels) if labels is not None else [""] * len(slides)
    # The workflow's sheet reader: slide paths resolved against each sheet's folder.
    sh = read_sheets(sheet).drop_duplicates("slide_id").set_index("slide_id", drop=False)
    wanted = [s for s in slides if s is not None]
    missing = sorted(set(wanted) - set(sh.index))
    if missing:
        raise InputError(f"heatmaps: slide(s) {missing[:5]} are not in the cohort sheet; fix heatmaps.slides")
    patients = sorted({str(sh.at[s, "patient_id"]) for s in wanted})
    fmap = {slide_id_of(f): str(f) for f in feature_files}
    state, model, ds, device = (None, None, None, "cpu")
    if wanted:
        state, model, ds, device = load_run_and_data(
            run_dir, cases=cases, splits=splits, fold=fold, pathways_path=pathways_path,
            feature_files=[f for s, f in fmap.items() if s in sh.index and str(sh.at[s, "patient_id"]) in patients],
            sheet=sheet, patient_ids=patients)
    done: dict[str, dict] = {}
    summaries = []
    for slide, out, label in zip(slides, outputs, labels, strict=True):
        if slide is None:
            msg = f"no patient for this slot ({label})" if label else "no patient for this slot"
            write_heatmap_h5(out["h5"], np.zeros((0, 2)), {}, score or "none", 0.0,
                             {"status": "empty", "selection": label})
            write_geojson(out["geojson"], np.zeros((0, 2)), 0.0, np.zeros(0), score or "score")
            draw_empty_png(out["png"], msg)
            draw_empty_png(out["tiles"], msg)
            summaries.append({"slide_id": None, "status": "empty"})
            continue
        pid = str(sh.at[slide, "patient_id"])
        if pid not in done:
            done[pid] = score_patient(model, ds, pid, device)
        per_slide = done[pid]
        if slide not in per_slide:
            raise InputError(f"slide {slide}: no usable features (failed or empty slide); remove it from "
                             "heatmaps.slides")
        scores = per_slide[slide]
        name = score or DEFAULT_SCORE.get(state.get("arch"), next(iter(scores)))
        if name not in scores:
            raise InputError(f"heatmaps.score: {name!r} is not a tile score of model {state['model_name']} "
                             f"(available: {sorted(scores)})")
        coords, size, attrs = tile_geometry(fmap[slide])
        prov = {**_provenance(state, run_dir, state.get("model_name")), "fold": int(fold), "slide_id": slide,
                "patient_id": pid, "partition": ds.partition.get(pid, ""), "features_file": fmap[slide],
                "encoder": attrs.get("encoder", ""), "level0_mpp": float(attrs.get("level0_mpp", np.nan)),
                "selection": label or "slides", "status": "ok"}
        write_heatmap_h5(out["h5"], coords, scores, name, size, prov)
        write_geojson(out["geojson"], coords, size, scores[name], name)
        title = (f"{state['model_name']} seed {prov['seed']} fold {fold} - slide {slide} (patient {pid}, "
                 f"{prov['partition']})" + (f" - {label}" if label else ""))
        slide_path = sh.at[slide, "path"]
        draw_heatmap_png(out["png"], slide_path, coords, size, scores[name], title=title, score=name,
                         max_px=thumbnail_px)
        draw_gallery_png(out["tiles"], slide_path, coords, size, scores[name], k=top_tiles, title=title,
                         score=name)
        summaries.append({"slide_id": slide, "patient_id": pid, "score": name, "n_tiles": int(len(coords)),
                          "status": "ok"})
        log.info("heatmap %s / %s: %d tiles, score %s", state["model_name"], slide, len(coords), name)
    return summaries


def make_ranked_heatmaps(*, predictions, k: int, which: str, outputs: Sequence[dict], sheet, **kw) -> list[dict]:
    """Heatmaps of the ``k`` highest/lowest-risk test patients (slot i = i-th patient; slots beyond the
    number of test patients get placeholder files)."""
    ranked = rank_test_slides(predictions, sheet, k, which)
    slides = [r[0] for r in ranked] + [None] * (len(outputs) - len(ranked))
    word = "highest" if which == "high" else "lowest"
    labels = [f"{word} risk #{i + 1}" + (f", risk {ranked[i][2]:.3g}" if i < len(ranked) else "")
              for i in range(len(outputs))]
    return make_heatmaps(slides=slides, outputs=outputs, sheet=sheet, labels=labels, **kw)


__all__ = ["geojson_features", "load_run_and_data", "make_heatmaps", "make_ranked_heatmaps", "percentile_rank",
           "rank_test_slides", "score_patient", "tile_geometry", "write_heatmap_h5"]
