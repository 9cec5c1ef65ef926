"""Deterministic demo cohort: pyramidal TIFF slides, Xena RNA matrix, GMT gene sets, GDC clinical TSVs.

Everything a real TCGA cohort provides, in the same file formats (including their quirks), with a known
ground truth (class, risk, survival) so the pipeline's metrics can be checked against it. No torch here:
the generator runs in CPU-only rules and ``demo_sheet`` is called at Snakefile parse time.
"""

from __future__ import annotations

import gzip
import os
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from modaltune.errors import InputError
from modaltune.io_utils import atomic_path

# 10,000 micrometres per centimetre: TIFF resolution is stored in pixels per resolution unit.
_UM_PER_CM = 1.0e4


def write_pyramid_tiff(path, rgb: np.ndarray, mpp: float | None, tile: int = 256, quality: int = 85) -> None:
    """Write ``rgb`` (H, W, 3 uint8) as a tiled, JPEG-compressed, pyramidal BigTIFF that OpenSlide reads.

    Levels /1 /2 /4 ... are consecutive top-level pages (lower levels flagged as reduced-resolution),
    which is the layout OpenSlide's ``generic-tiff`` driver expects. ``mpp`` (micrometres per pixel at
    level 0) is stored as X/YResolution in pixels per centimetre so OpenSlide sets
    ``openslide.mpp-x/y``; ``mpp=None`` writes no resolution tags (a slide without mpp).
    """
    import tifffile  # lazy: keeps ``demo_sheet`` (Snakefile parse time) light

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"write_pyramid_tiff({path}): need an (H, W, 3) uint8 array, got "
                         f"{rgb.shape} {rgb.dtype}; convert the image to 8-bit RGB first")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise InputError(f"write_pyramid_tiff({path}): mpp must be a positive number or None, got {mpp!r}")
    if tile % 16:
        raise InputError(f"write_pyramid_tiff({path}): TIFF tile size must be a multiple of 16, got {tile}")

    levels = [rgb]
    # Stop once the smaller side drops below ~512 px: a deeper level would be a single tile anyway.
    while min(levels[-1].shape[:2]) // 2 >= 512:
        levels.append(_halve(levels[-1]))

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, level in enumerate(levels):
            kwargs = {}
            if mpp is not None:
                ppcm = _UM_PER_CM / (mpp * 2**i)
                kwargs = {"resolution": (ppcm, ppcm), "resolutionunit": "CENTIMETER"}
            tw.write(
                level,
                photometric="rgb",
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": quality},
                subfiletype=1 if i else 0,
                metadata=None,
                **kwargs,
            )


def _halve(img: np.ndarray) -> np.ndarray:
    """2x2 box-filter downsample (odd edge row/column dropped), as slide scanners build their pyramids."""
    from PIL import Image  # PIL's reduce() is ~10x faster than skimage's downscale_local_mean here

    return np.asarray(Image.fromarray(img).reduce(2))


# ---------------------------------------------------------------------------------------------------------
# Cohort layout: who is in which class, who has two slides / no RNA / a normal sample. Cheap (no images) so
# that ``demo_sheet`` can run at Snakefile parse time and agree exactly with ``make_demo_cohort``.

PROJECT_ID = "TCGA-BRCA"
LEVEL0_MPP = 0.25
DIAGNOSIS = {0: "Infiltrating duct carcinoma, NOS", 1: "Lobular carcinoma, NOS"}
OUT_OF_TASK_DIAGNOSIS = "Mucinous adenocarcinoma"
MISSING = "'--"  # GDC's literal for an empty field

# Survival model: hazard per day h = H0 * exp(B_CLASS * class + B_RISK * risk), exponential times.
H0_PER_DAY = 1.0 / 2500.0
B_CLASS = 0.7
B_RISK = 0.9
CENSOR_FRACTION = 0.35

# Each part draws from its own stream, [seed, namespace, ...]. NumPy's SeedSequence ignores trailing zeros
# ([s, 2, i] == [s, 2, i, 0]), so every stream gets a distinct namespace rather than a longer key.
_NS_LAYOUT, _NS_SLIDE, _NS_RNA, _NS_CLINICAL, _NS_PATIENT, _NS_PLANT = 1, 2, 3, 4, 5, 6

# Planted regions (heatmap ground truth): on the first slide of this share of the class-1 patients the
# tissue carries the class-0 look except inside one box, which carries the patient's class-1 look. The box
# spans about PLANT_BOX of the slide's width and height, aligned to PLANT_GRID level-0 px (one default tile,
# 256 px at 0.5 mpp), and is placed where it covers the most tissue. Recorded in truth_regions.tsv.
PLANT_FRACTION = 0.25
PLANT_BOX = (0.40, 0.45)
PLANT_GRID = 512


def _patient_ids(n: int) -> list[str]:
    return [f"TCGA-D0-A{i + 1:03d}" for i in range(n)]


def _layout(n_patients: int, seed: int) -> pd.DataFrame:
    """Per-patient ground truth and format quirks, drawn from one seeded generator."""
    if int(n_patients) < 8:
        raise InputError(f"demo cohort: n_patients={n_patients} is too small; use at least 8 so both classes, "
                         "two-slide patients and patients without RNA all occur")
    n = int(n_patients)
    rng = np.random.default_rng([int(seed), _NS_LAYOUT])
    cls = np.zeros(n, dtype=int)
    cls[rng.permutation(n)[: n // 2]] = 1
    risk = rng.standard_normal(n)
    # Disjoint roles, so each quirk is exercised on its own patient.
    order = rng.permutation(n)
    n_two = max(1, round(0.15 * n))
    n_norna = max(1, round(0.10 * n))
    n_normal = max(1, round(0.075 * n))
    n_muc = max(1, round(0.06 * n))
    cuts = np.cumsum([n_two, n_norna, 1, n_normal, n_muc])
    two, norna, only02, normal, muc = np.split(order[: cuts[-1]], cuts[:-1])
    df = pd.DataFrame({"patient_id": _patient_ids(n), "class": cls, "risk": risk})
    df["n_slides"] = 1
    df.loc[two, "n_slides"] = 2
    df["has_rna"] = True
    df.loc[norna, "has_rna"] = False
    df["rna_samples"] = "01"
    df.loc[only02, "rna_samples"] = "02"
    df.loc[normal, "rna_samples"] = "11,01"
    df.loc[norna, "rna_samples"] = ""
    df["primary_diagnosis"] = [DIAGNOSIS[c] for c in cls]
    df.loc[muc, "primary_diagnosis"] = OUT_OF_TASK_DIAGNOSIS
    df["label"] = np.where(df["primary_diagnosis"] == OUT_OF_TASK_DIAGNOSIS, -1, cls)

    hazard = H0_PER_DAY * np.exp(B_CLASS * cls + B_RISK * risk)
    t_event = rng.exponential(1.0 / hazard)
    rate_c = _censoring_rate(hazard, CENSOR_FRACTION)
    t_censor = rng.exponential(1.0 / rate_c, size=n)
    df["time_days"] = np.maximum(1, np.rint(np.minimum(t_event, t_censor))).astype(int)
    df["event"] = (t_event <= t_censor).astype(int)
    return df


def _censoring_rate(hazard: np.ndarray, fraction: float) -> float:
    """Exponential censoring rate c with mean_i P(C < T_i) = mean_i c / (c + h_i) = fraction (bisection:
    monotone in c, no library call needed for a 1-D root this simple)."""
    lo, hi = 1e-9, 1.0
    for _ in range(100):
        mid = np.sqrt(lo * hi)
        if np.mean(mid / (mid + hazard)) < fraction:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


# ---------------------------------------------------------------------------------------------------------
# Complementary signal (``signal="complementary"``): a science check that multimodal models can beat every
# single modality. Two independent latents per patient, s (slides only) and g (RNA pathways only):
#   class = 1[s + g > 0],   hazard per day = H0 * exp(B_COMPLEMENT * (s + g) / sqrt(2)).
# Knowing s alone predicts the class with at most 75 % accuracy (P(sign s = sign(s + g)) = 3/4 for
# independent standard normals), likewise g alone, both together up to 100 %; for the hazard each latent
# explains half of the linear predictor's variance. s sets the nuclear phenotype (interpolated between the
# two class phenotypes, with half the redundant demo's per-patient spread so it stays readable); g moves
# the class pathways, CDH1 and the proliferation pathway; clinical stage carries no signal (drawn from
# noise), so clinical covariates cannot stand in for either modality. The cohort layout (patients, slides,
# missing RNA, out-of-task diagnoses) is that of the redundant demo with the same seed.
_NS_COMPLEMENT = 6
B_COMPLEMENT = 1.2
_COMPLEMENT_SPREAD = 0.5
_COMPLEMENT_COLUMNS = ("slide_signal", "pathway_signal")
SIGNAL_MODES = ("redundant", "complementary")


def _signal_mode(signal: str) -> str:
    if signal not in SIGNAL_MODES:
        raise InputError(f"demo cohort: signal={signal!r} is not one of {list(SIGNAL_MODES)}")
    return signal


def complementary_layout(n_patients: int, seed: int) -> pd.DataFrame:
    """``_layout`` with class, risk and survival redrawn from a slide latent and a pathway latent."""
    df = _layout(n_patients, seed)
    n = len(df)
    rng = np.random.default_rng([int(seed), _NS_COMPLEMENT])
    s, g = rng.standard_normal(n), rng.standard_normal(n)
    stage_noise = rng.standard_normal(n)
    cls = (s + g > 0).astype(int)
    risk = (s + g) / np.sqrt(2.0)
    in_task = df["label"] >= 0
    df["class"] = cls
    df["label"] = np.where(in_task, cls, -1)
    df["primary_diagnosis"] = np.where(in_task, [DIAGNOSIS[c] for c in cls], OUT_OF_TASK_DIAGNOSIS)
    df["risk"] = risk
    df["slide_signal"], df["pathway_signal"], df["_stage_noise"] = s, g, stage_noise
    hazard = H0_PER_DAY * np.exp(B_COMPLEMENT * risk)
    t_event = rng.exponential(1.0 / hazard)
    t_censor = rng.exponential(1.0 / _censoring_rate(hazard, CENSOR_FRACTION), size=n)
    df["time_days"] = np.maximum(1, np.rint(np.minimum(t_event, t_censor))).astype(int)
    df["event"] = (t_event <= t_censor).astype(int)
    return df


def _slide_view(layout: pd.DataFrame) -> list:
    """What the slide renderer sees per patient: the class (int), or the slide latent as a float position
    on the class-0 -> class-1 phenotype axis (s = -1 / +1 give the two class means)."""
    if "slide_signal" not in layout:
        return [int(c) for c in layout["class"]]
    return [float(np.clip(0.5 + 0.5 * v, -1.0, 2.0)) for v in layout["slide_signal"]]


def _rna_view(layout: pd.DataFrame) -> pd.DataFrame:
    """What the RNA generator sees: class (+-1 sign = 2 * class - 1) and risk; the pathway latent g for both
    in the complementary demo, so RNA carries g and nothing of s."""
    if "pathway_signal" not in layout:
        return layout
    g = layout["pathway_signal"].to_numpy(float)
    return layout.assign(**{"class": (g + 1.0) / 2.0, "risk": g})


def _clinical_view(layout: pd.DataFrame) -> pd.DataFrame:
    """What the clinical tables see: stage follows ``risk``; in the complementary demo it follows noise."""
    if "_stage_noise" not in layout:
        return layout
    return layout.assign(risk=layout["_stage_noise"])


def _phenotype_at(t: float, rng: np.random.Generator) -> dict:
    """Nuclear phenotype at position ``t`` between the class-0 (t=0) and class-1 (t=1) means."""
    def lerp(table):
        return table[0] + t * (table[1] - table[0])

    k = _COMPLEMENT_SPREAD
    return {
        "spacing": lerp(_NUC_SPACING) * float(np.exp(rng.normal(0, 0.17 * k))),
        "radius": lerp(_NUC_RADIUS) * float(np.exp(rng.normal(0, 0.12 * k))),
        "nuc_h": lerp(_NUC_H) * float(np.exp(rng.normal(0, 0.10 * k))),
        "stroma_h": max(0.0, lerp(_STROMA_H) + float(rng.normal(0, 0.03 * k))),
        "stroma_e": lerp(_STROMA_E) * float(np.exp(rng.normal(0, 0.15 * k))),
        "stain_h": float(np.exp(rng.normal(0, 0.10))),
        "stain_e": float(np.exp(rng.normal(0, 0.10))),
    }


def _slide_ids(layout: pd.DataFrame) -> list[tuple[str, str, int]]:
    """(slide_id, patient_id, slide number) in sheet order."""
    out = []
    for pid, k in zip(layout["patient_id"], layout["n_slides"], strict=True):
        out += [(f"{pid}-01Z-00-DX{j + 1}", pid, j) for j in range(int(k))]
    return out


def demo_sheet(n_patients: int = 40, seed: int = 0, out_dir="resources/demo") -> pd.DataFrame:
    """The cohort sheet ``make_demo_cohort(out_dir, n_patients, seed)`` writes, without writing anything.

    Columns slide_id, patient_id, path (relative to ``out_dir``, the sheet's folder), mpp (NaN: the
    slides carry their own resolution). Milliseconds: safe to call while Snakemake parses the DAG.
    """
    del out_dir  # paths are relative to the sheet's folder whatever it is; kept for a symmetric call
    ids = _slide_ids(_layout(n_patients, seed))
    return pd.DataFrame({
        "slide_id": [s for s, _, _ in ids],
        "patient_id": [p for _, p, _ in ids],
        "path": [f"slides/{s}.tiff" for s, _, _ in ids],
        "mpp": np.full(len(ids), np.nan),
    })


# ---------------------------------------------------------------------------------------------------------
# Slides: H&E-like colour built in optical-density space (Beer-Lambert), so stain strength varies the way
# it does between labs. Stain vectors are the Ruifrok & Johnston haematoxylin / eosin OD directions.

_H_OD = np.array([0.650, 0.704, 0.286], dtype=np.float32)
_E_OD = np.array([0.072, 0.990, 0.105], dtype=np.float32)
_BG_OD = np.float32(-np.log(240.0 / 255.0))

# Class-dependent nuclear phenotype (level-0 px at 0.25 mpp): class 1 denser, larger, darker nuclei.
_NUC_SPACING = {0: 50.0, 1: 42.0}    # mean distance between nuclei
_NUC_RADIUS = {0: 13.0, 1: 15.0}
_NUC_H = {0: 0.90, 1: 1.00}          # haematoxylin concentration inside a nucleus
_STROMA_H = {0: 0.04, 1: 0.07}       # faint haematoxylin in stroma: class 1 looks a little more purple
_STROMA_E = {0: 0.40, 1: 0.38}
# Per-patient spread: each class difference above is about one spread, so only their combination
# separates the classes well (a single colour or size does not).


def _patient_phenotype(cls: int, rng: np.random.Generator) -> dict:
    """Class means with per-patient variation wide enough that no single number separates the classes."""
    if isinstance(cls, float):  # complementary demo: a continuous slide signal, see _phenotype_at
        return _phenotype_at(cls, rng)
    return {
        "spacing": _NUC_SPACING[cls] * float(np.exp(rng.normal(0, 0.17))),
        "radius": _NUC_RADIUS[cls] * float(np.exp(rng.normal(0, 0.12))),
        "nuc_h": _NUC_H[cls] * float(np.exp(rng.normal(0, 0.10))),
        "stroma_h": max(0.0, _STROMA_H[cls] + float(rng.normal(0, 0.03))),
        "stroma_e": _STROMA_E[cls] * float(np.exp(rng.normal(0, 0.15))),
        "stain_h": float(np.exp(rng.normal(0, 0.10))),  # lab-to-lab stain strength, class independent
        "stain_e": float(np.exp(rng.normal(0, 0.10))),
    }


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: a coarse random grid upsampled bilinearly (PIL, fast in C)."""
    from PIL import Image

    h, w = shape
    coarse = rng.uniform(-1, 1, size=(max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)


def _upsample(field: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(field.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def _tissue_mask(rng: np.random.Generator, shape: tuple[int, int], coverage: float) -> np.ndarray:
    """Union of 1-3 irregular ellipses covering ``coverage`` of the image (boolean, given shape)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    q = np.full(shape, np.inf, dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
        a = rng.uniform(0.5, 1.0) * min(h, w)
        b = a * rng.uniform(0.55, 1.0)
        th = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / a
        v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / b
        phi = np.arctan2(v, u)
        edge = 1.0 + sum(rng.uniform(0.03, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
        # q < s is an ellipse scaled by s with a wobbly border; the union is min over blobs
        q = np.minimum(q, np.sqrt(u * u + v * v) / edge)
    q *= 1.0 + 0.06 * _smooth_noise(rng, shape, 12)
    # Scale all blobs together so that exactly `coverage` of the pixels fall inside.
    return q < np.quantile(q, coverage)


def _nucleus_stamps(radius: float, rng: np.random.Generator, n: int = 12) -> list[np.ndarray]:
    """Soft-edged ellipses of varying size/orientation with a little chromatin texture."""
    stamps = []
    for _ in range(n):
        r = radius * float(np.exp(rng.normal(0, 0.2)))
        e = rng.uniform(0.65, 1.0)
        th = rng.uniform(0, np.pi)
        k = int(np.ceil(r * 1.3)) + 2
        yy, xx = np.mgrid[-k:k + 1, -k:k + 1].astype(np.float32)
        u = (xx * np.cos(th) + yy * np.sin(th)) / r
        v = (-xx * np.sin(th) + yy * np.cos(th)) / (r * e)
        d = np.sqrt(u * u + v * v)
        inside = np.clip((1.0 - d) * r / 1.5, 0, 1)  # ~1.5 px soft edge
        texture = 1.0 + 0.15 * rng.standard_normal(inside.shape).astype(np.float32)
        stamps.append((inside * texture).astype(np.float32))
    return stamps


def _od_lut(stain_h: float, stain_e: float) -> np.ndarray:
    """RGB for every quantised (haematoxylin, eosin) concentration pair, shape (256 * 256, 3) uint8.

    Indexing this table replaces three full-size float exp() passes per slide (the slow part on 2 cores).
    """
    c = (np.arange(256, dtype=np.float32) - _Q_OFFSET) / _Q_SCALE
    od = (stain_h * c[:, None, None] * _H_OD + stain_e * c[None, :, None] * _E_OD + _BG_OD)
    return np.clip(np.rint(255.0 * np.exp(-od)), 0, 255).astype(np.uint8).reshape(-1, 3)


_Q_SCALE = 100.0   # concentration quantisation: 0.01 OD units per step
_Q_OFFSET = 12.0   # a few steps below zero so background noise can be lighter than the mean background
_RENDER_DOWN = 2   # fields are drawn at 0.5 mpp (the pipeline's tiling resolution) and upsampled to level 0


def _slide_canvas(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int, np.ndarray]:
    """(w, h) at the render resolution and the tissue mask at a further 1/4: the first draws of a slide's
    stream, so they do not depend on the class (a planted slide's two renders share them)."""
    d = _RENDER_DOWN
    w = int(round(size[0] * rng.uniform(0.9, 1.1) / 32) * 32) // d
    h = int(round(size[1] * rng.uniform(0.9, 1.1) / 32) * 32) // d
    f = 4  # tissue mask and stroma fields at a further 1/4: smooth fields need no fine grid
    return w, h, _tissue_mask(rng, (h // f, w // f), rng.uniform(0.35, 0.50))


def plant_box(slide_seed: list[int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Level-0 box (x0, y0, x1, y1), x1/y1 exclusive, of a planted slide: PLANT_BOX of the slide, on the
    PLANT_GRID, placed where it covers the most tissue (first such place in row-major order)."""
    w, h, mask = _slide_canvas(np.random.default_rng(slide_seed), size)
    w0, h0 = w * _RENDER_DOWN, h * _RENDER_DOWN
    f = _RENDER_DOWN * 4  # level-0 px per mask px
    g = PLANT_GRID
    bw = max(g, int(round(PLANT_BOX[0] * w0 / g)) * g)
    bh = max(g, int(round(PLANT_BOX[1] * h0 / g)) * g)
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best, box = -1, (0, 0, min(bw, w0), min(bh, h0))
    for y0 in range(0, max(1, h0 - bh + 1), g):
        for x0 in range(0, max(1, w0 - bw + 1), g):
            a, b = y0 // f, x0 // f
            c, e = min(mask.shape[0], (y0 + bh) // f), min(mask.shape[1], (x0 + bw) // f)
            cover = integral[c, e] - integral[a, e] - integral[c, b] + integral[a, b]
            if cover > best:
                best, box = int(cover), (x0, y0, min(x0 + bw, w0), min(y0 + bh, h0))
    return box


def _render_slide(slide_seed: list[int], patient_seed: list[int], cls: int, size: tuple[int, int],
                  planted: bool = False) -> np.ndarray:
    """One synthetic H&E slide (H, W, 3) uint8 at 0.25 mpp; deterministic in the two seeds (the patient's
    phenotype is shared by all of a patient's slides). ``planted``: the class-0 look of the same patient
    everywhere except inside :func:`plant_box`, which keeps the class-``cls`` look."""
    if planted:
        img = _render_slide(slide_seed, patient_seed, 0, size).copy()
        x0, y0, x1, y1 = plant_box(slide_seed, size)
        img[y0:y1, x0:x1] = _render_slide(slide_seed, patient_seed, cls, size)[y0:y1, x0:x1]
        return img
    from PIL import Image

    rng = np.random.default_rng(slide_seed)
    ph = _patient_phenotype(cls, np.random.default_rng(patient_seed))
    d = _RENDER_DOWN
    f = 4
    w, h, mask = _slide_canvas(rng, size)
    hs, ws = h // f, w // f
    soft = _upsample(_upsample(mask.astype(np.float32), (ws * 2, hs * 2)), (w, h))  # blurred edge

    # Stroma: eosin with fibre-like streaks plus faint haematoxylin.
    fibres = 0.6 * _smooth_noise(rng, (hs, ws), 2) + 0.4 * _smooth_noise(rng, (hs, ws), 16)
    e_field = _upsample(ph["stroma_e"] * (1.0 + 0.35 * fibres), (w, h)) * soft
    h_field = np.float32(ph["stroma_h"]) * soft

    # Nuclei: Poisson points inside tissue, density modulated smoothly (tumour nests vs sparse stroma).
    spacing = ph["spacing"] / d
    n_cand = int(rng.poisson(h * w / spacing**2))
    xs = rng.uniform(0, w, n_cand)
    ys = rng.uniform(0, h, n_cand)
    density = 0.5 + 0.5 * _smooth_noise(rng, (hs, ws), 32)
    iy, ix = (ys // f).astype(int).clip(0, hs - 1), (xs // f).astype(int).clip(0, ws - 1)
    keep = mask[iy, ix] & (rng.uniform(0, 1, n_cand) < 0.4 + 0.6 * density[iy, ix])
    stamps = _nucleus_stamps(ph["radius"] / d, rng)
    which = rng.integers(0, len(stamps), n_cand)
    dark = np.float32(ph["nuc_h"]) * np.exp(rng.normal(0, 0.15, n_cand)).astype(np.float32)
    nuc = np.zeros((h, w), dtype=np.float32)
    for x, y, s, a in zip(xs[keep], ys[keep], which[keep], dark[keep], strict=True):
        st = stamps[s]
        k = st.shape[0] // 2
        x0, y0 = int(x) - k, int(y) - k
        if x0 < 0 or y0 < 0 or x0 + st.shape[1] > w or y0 + st.shape[0] > h:
            continue
        view = nuc[y0:y0 + st.shape[0], x0:x0 + st.shape[1]]
        np.maximum(view, st * a, out=view)
    h_field += nuc
    e_field *= 1.0 - 0.7 * np.clip(nuc / np.float32(max(ph["nuc_h"], 1e-3)), 0, 1)  # nuclei displace stroma

    # Scanner noise in concentration space, then the stain look-up table.
    noise = rng.standard_normal((2, h, w), dtype=np.float32) * np.float32(0.012 * _Q_SCALE)
    hq = np.clip(h_field * _Q_SCALE + _Q_OFFSET + noise[0], 0, 255).astype(np.uint16)
    eq = np.clip(e_field * _Q_SCALE + _Q_OFFSET + noise[1], 0, 255).astype(np.uint16)
    rgb = np.take(_od_lut(ph["stain_h"], ph["stain_e"]), hq * 256 + eq, axis=0)
    return np.asarray(Image.fromarray(rgb).resize((w * d, h * d), Image.BILINEAR))


def _write_slide(job: tuple[str, list[int], list[int], int, tuple[int, int], bool]) -> str:
    path, slide_seed, patient_seed, cls, size, planted = job
    write_pyramid_tiff(path, _render_slide(slide_seed, patient_seed, cls, size, planted), LEVEL0_MPP)
    return path


def planted_slides(layout: pd.DataFrame, seed: int, fraction: float = PLANT_FRACTION) -> list[str]:
    """Slide ids that get a planted region: the first slide of round(fraction x n) class-1 patients.

    Patients with a second slide are chosen first: their second slide keeps the whole class-1 look, so
    planting (the first slide looks class-0 outside its box) localises the signal without flipping the
    patient's label signal; single-slide patients are planted only when the fraction asks for more.
    """
    rng = np.random.default_rng([int(seed), _NS_PLANT])
    cls1 = layout[layout["class"] == 1]
    multi = rng.permutation(cls1.loc[cls1["n_slides"] >= 2, "patient_id"].tolist()).tolist()
    single = rng.permutation(cls1.loc[cls1["n_slides"] < 2, "patient_id"].tolist()).tolist()
    n = int(round(float(fraction) * len(cls1)))
    chosen = sorted((multi + single)[:n]) if n else []
    return [f"{p}-01Z-00-DX1" for p in chosen]


# ---------------------------------------------------------------------------------------------------------
# Genes and pathways. The gene universe and the pathway list do not depend on the seed.

# Themed pathways built from real gene symbols (older HGNC aliases where the Xena hub uses them: IL8).
_THEMED = {
    "HALLMARK_DEMO_PROLIFERATION": "MKI67 TOP2A CCNB1 CCNB2 CDK1 BUB1 AURKA AURKB PLK1 CENPF MCM2 MCM6 PCNA E2F1 "
                                   "FOXM1 BIRC5 CDC20 KIF2C TPX2 UBE2C",
    "HALLMARK_DEMO_ESTROGEN_RESPONSE": "ESR1 PGR GATA3 FOXA1 TFF1 TFF3 XBP1 GREB1 MYB AR KRT18 KRT8 AGR2 CA12 "
                                       "SLC39A6",
    "REACTOME_DEMO_ADHERENS_JUNCTIONS": "CDH1 CTNNA1 CTNNB1 CTNND1 JUP DSP EPCAM CLDN4 CLDN7 CLDN3 OCLN TJP1 PKP3 "
                                        "DSG2",
    "HALLMARK_DEMO_EPITHELIAL_MESENCHYMAL_TRANSITION": "VIM FN1 SNAI2 TWIST1 ZEB1 ZEB2 CDH2 COL1A1 COL1A2 COL3A1 "
                                                      "SPARC MMP2 TGFB1 POSTN FAP",
    "HALLMARK_DEMO_HYPOXIA": "HIF1A VEGFA CA9 LDHA PGK1 SLC2A1 BNIP3 NDRG1 ADM ENO1 P4HA1 ANKRD37",
    "HALLMARK_DEMO_INFLAMMATORY_RESPONSE": "IL6 CXCL8 CXCL10 CCL2 IL1B TNF NFKBIA PTGS2 ICAM1 SOCS3 CXCL1 CXCL2",
    "HALLMARK_DEMO_INTERFERON_GAMMA_RESPONSE": "STAT1 IRF1 IRF7 ISG15 MX1 OAS1 IFIT1 IFIT3 GBP1 CXCL9 CXCL10",
    "HALLMARK_DEMO_P53_PATHWAY": "TP53 CDKN1A MDM2 BAX GADD45A FAS SESN1 RRM2B TP53I3",
    "REACTOME_DEMO_DNA_REPAIR": "BRCA1 BRCA2 RAD51 ATM ATR CHEK1 CHEK2 XRCC1 PARP1 MLH1 MSH2 ERCC1 PCNA",
    "REACTOME_DEMO_CELL_CYCLE_CHECKPOINTS": "CDK1 CCNB1 CHEK1 CHEK2 BUB1 CDC20 MDM2 TP53 CDKN1A AURKA",
}
# In the GMT these use the modern symbol; the matrix holds the old alias (as the Xena TCGA hub does).
_MATRIX_ALIAS = {"CXCL8": "IL8"}
SIGNAL_CLASS_UP = "HALLMARK_DEMO_ESTROGEN_RESPONSE"      # higher in class 1
SIGNAL_CLASS_DOWN = "REACTOME_DEMO_ADHERENS_JUNCTIONS"   # lower in class 1 (CDH1 loss in lobular carcinoma)
SIGNAL_RISK = "HALLMARK_DEMO_PROLIFERATION"              # pathway mean tracks the hazard's risk term
SIGNAL_GENE = "CDH1"                                     # the single strongest class marker
_FILLER_PREFIXES = ("ZNF", "SLC", "TMEM", "FAM", "CCDC", "ANKRD", "LRRC", "KLHL", "TRIM", "RNF", "ARHGEF",
                    "DNAJC", "PPP1R", "TBC1D", "WDR")
_ABSENT_FROM_MATRIX = ("ZNF9001", "SLC99A1", "TMEM999")  # listed in gene sets, missing from the matrix
_QMARK_IDS = ("?|100130426", "?|100133144", "?|100134869", "?|10357", "?|10431")
N_GENES = 600


def _gene_universe() -> list[str]:
    """~600 symbols: the themed genes (matrix spelling), pseudo-HGNC fillers and a few ``?|`` ids."""
    themed: list[str] = []
    for genes in _THEMED.values():
        themed += [_MATRIX_ALIAS.get(g, g) for g in genes.split() if _MATRIX_ALIAS.get(g, g) not in themed]
    n_fill = N_GENES - len(themed) - len(_QMARK_IDS)
    fillers: list[str] = []
    i = 0
    while len(fillers) < n_fill:
        name = f"{_FILLER_PREFIXES[i % len(_FILLER_PREFIXES)]}{11 + i // len(_FILLER_PREFIXES)}"
        if name not in themed:
            fillers.append(name)
        i += 1
    return themed + fillers + list(_QMARK_IDS)


def _gene_sets() -> dict[str, list[str]]:
    """~24 pathways of 5-40 genes: the themed ones plus random filler-gene sets sharing some members."""
    rng = np.random.default_rng(20250101)  # fixed: the pathway definitions are part of the format, not data
    universe = _gene_universe()
    fillers = [g for g in universe if not g.startswith("?|") and not any(g in v.split() for v in _THEMED.values())]
    fillers = [g for g in fillers if g not in _MATRIX_ALIAS.values()]
    sets = {k: v.split() for k, v in _THEMED.items()}
    topics = ("GLYCOLYSIS", "OXIDATIVE_PHOSPHORYLATION", "ANGIOGENESIS", "APOPTOSIS", "MTORC1_SIGNALING",
              "WNT_SIGNALING", "NOTCH_SIGNALING", "HEDGEHOG_SIGNALING", "TRANSLATION", "RNA_SPLICING",
              "FATTY_ACID_METABOLISM", "CHOLESTEROL_HOMEOSTASIS", "UNFOLDED_PROTEIN_RESPONSE", "KRAS_SIGNALING")
    for i, topic in enumerate(topics):
        prefix = "HALLMARK_DEMO_" if i % 2 == 0 else "REACTOME_DEMO_"
        size = int(rng.integers(5, 41))
        sets[prefix + topic] = [str(g) for g in rng.choice(fillers, size=size, replace=False)]
    # A few members the matrix lacks, as real gene sets list genes a platform never measured.
    for name, gene in zip(("HALLMARK_DEMO_HYPOXIA", "REACTOME_DEMO_OXIDATIVE_PHOSPHORYLATION", "HALLMARK_DEMO_GLYCOLYSIS"),
                          _ABSENT_FROM_MATRIX, strict=True):
        sets[name].append(gene)
    return sets


def _write_gmt(path: Path, sets: dict[str, list[str]]) -> None:
    lines = [
        "\t".join([name, f"https://example.org/modaltune-demo/{name}", *genes]) for name, genes in sets.items()
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _expression(layout: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Genes x samples, log2(RSEM + 1)-like, with planted class and risk signal; Xena column layout."""
    rng = np.random.default_rng([int(seed), _NS_RNA])
    genes = _gene_universe()
    g_index = {g: i for i, g in enumerate(genes)}
    n_g = len(genes)
    mu = rng.uniform(2.0, 12.0, n_g)
    sd = rng.uniform(0.4, 1.2, n_g)
    sets = {k: [g_index[_MATRIX_ALIAS.get(g, g)] for g in v if _MATRIX_ALIAS.get(g, g) in g_index]
            for k, v in _gene_sets().items()}

    def tumour_profile(cls: int, risk: float) -> np.ndarray:
        z = rng.standard_normal(n_g)
        for members in sets.values():  # co-expression: one latent factor per pathway
            z[members] += 0.5 * rng.standard_normal()
        sign = 2.0 * float(cls) - 1.0  # +-1 for a class; the pathway signal in the complementary demo
        z[sets[SIGNAL_CLASS_UP]] += 0.6 * sign
        z[sets[SIGNAL_CLASS_DOWN]] -= 0.6 * sign
        z[g_index[SIGNAL_GENE]] -= 1.2 * sign
        z[sets[SIGNAL_RISK]] += 0.9 * risk
        return mu + sd * z

    def normal_profile() -> np.ndarray:
        z = rng.standard_normal(n_g)
        z[sets[SIGNAL_RISK]] -= 1.5  # normal tissue barely proliferates
        z[sets[SIGNAL_CLASS_DOWN]] += 1.0
        return mu + sd * z

    columns: dict[str, np.ndarray] = {}
    shuffled = layout.rename(columns={"class": "cls"}).iloc[rng.permutation(len(layout))]
    for row in shuffled.itertuples():
        for code in filter(None, row.rna_samples.split(",")):
            barcode = f"{row.patient_id}-{code}"
            columns[barcode] = normal_profile() if code == "11" else tumour_profile(row.cls, row.risk)
    mat = pd.DataFrame(columns, index=genes).clip(lower=0.0)
    # Two gene symbols appear twice (as in real Xena matrices); the copies carry slightly different values.
    dup_rows = mat.iloc[[7, 300]] + rng.normal(0, 0.05, size=(2, mat.shape[1]))
    mat = pd.concat([mat, dup_rows.clip(lower=0.0)])
    mat.index.name = "sample"
    return mat.round(4)


def _write_xena(path: Path, mat: pd.DataFrame) -> None:
    text = mat.to_csv(sep="\t", float_format="%.4f", lineterminator="\n")
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        # Fixed mtime and no file name in the gzip header: identical bytes on every run.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(text.encode())


# ---------------------------------------------------------------------------------------------------------
# GDC clinical and biospecimen exports (old flat column names, "'--" for missing).

_CLINICAL_COLUMNS = (
    "case_id", "case_submitter_id", "project_id", "age_at_index", "age_is_obfuscated", "cause_of_death",
    "days_to_birth", "days_to_death", "ethnicity", "gender", "race", "vital_status", "year_of_birth",
    "year_of_death", "age_at_diagnosis", "ajcc_pathologic_m", "ajcc_pathologic_n", "ajcc_pathologic_stage",
    "ajcc_pathologic_t", "ajcc_staging_system_edition", "days_to_diagnosis", "days_to_last_follow_up",
    "icd_10_code", "morphology", "primary_diagnosis", "prior_malignancy", "site_of_resection_or_biopsy",
    "tissue_or_organ_of_origin", "year_of_diagnosis", "treatment_or_therapy", "treatment_type",
)
_MORPHOLOGY = {"Infiltrating duct carcinoma, NOS": "8500/3", "Lobular carcinoma, NOS": "8520/3",
               OUT_OF_TASK_DIAGNOSIS: "8480/3"}
# (stage, T, N, M) templates from low to high stage; the chosen row rises with the patient's risk.
_STAGES = (
    ("Stage IA", "T1c", "N0 (i-)", "M0"), ("Stage IA", "T1b", "N0", "M0"), ("Stage IIA", "T2", "N0 (i-)", "M0"),
    ("Stage IIA", "T1c", "N1a", "M0"), ("Stage IIB", "T2", "N1a", "MX"), ("Stage IIB", "T3", "N0", "M0"),
    ("Stage IIIA", "T2", "N2a", "M0"), ("Stage IIIA", "T3", "N1", "M0"), ("Stage IIIC", "T4b", "N3a", "M0"),
    ("Stage IV", "T3", "N2", "M1"),
)


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _clinical(layout: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(clinical.tsv rows, slide.tsv rows) as GDC exports them."""
    rng = np.random.default_rng([int(seed), _NS_CLINICAL])
    n = len(layout)
    case_ids = [_uuid(rng) for _ in range(n)]
    two_rows = set(rng.choice(n, size=max(2, n // 3), replace=False).tolist())
    no_stage = set(rng.choice(n, size=max(1, n // 13), replace=False).tolist())
    no_age = set(rng.choice(n, size=max(1, n // 20), replace=False).tolist())
    rows = []
    for i, p in enumerate(layout.itertuples()):
        age = int(np.clip(rng.normal(58, 12), 27, 89))
        year_dx = int(rng.integers(1995, 2014))
        q = 1.0 / (1.0 + np.exp(-(p.risk + rng.normal(0, 0.8))))  # noisy monotone map risk -> stage
        stage, t, nn, m = _STAGES[min(len(_STAGES) - 1, int(q * len(_STAGES)))]
        dead = bool(p.event)
        base = {
            "case_id": case_ids[i], "case_submitter_id": p.patient_id, "project_id": PROJECT_ID,
            "age_at_index": MISSING if i in no_age else str(age), "age_is_obfuscated": "false",
            "cause_of_death": MISSING, "days_to_birth": MISSING if i in no_age else str(-int(age * 365.25)),
            "days_to_death": str(p.time_days) if dead else MISSING, "ethnicity": "not hispanic or latino",
            "gender": "female", "race": "white" if rng.uniform() < 0.75 else "black or african american",
            "vital_status": "Dead" if dead else "Alive", "year_of_birth": str(year_dx - age),
            "year_of_death": str(year_dx + p.time_days // 365) if dead else MISSING,
            "age_at_diagnosis": MISSING if i in no_age else str(int(age * 365.25)),
            "ajcc_pathologic_m": MISSING if i in no_stage else m,
            "ajcc_pathologic_n": MISSING if i in no_stage else nn,
            "ajcc_pathologic_stage": MISSING if i in no_stage else stage,
            "ajcc_pathologic_t": MISSING if i in no_stage else t,
            "ajcc_staging_system_edition": "7th", "days_to_diagnosis": "0",
            # GDC leaves follow-up empty for most dead cases
            "days_to_last_follow_up": MISSING if dead else str(p.time_days),
            "icd_10_code": "C50.9", "morphology": _MORPHOLOGY[p.primary_diagnosis],
            "primary_diagnosis": p.primary_diagnosis, "prior_malignancy": "no",
            "site_of_resection_or_biopsy": "Breast, NOS", "tissue_or_organ_of_origin": "Breast, NOS",
            "year_of_diagnosis": str(year_dx),
        }
        treatments = ["Pharmaceutical Therapy, NOS", "Radiation Therapy, NOS"] if i in two_rows else \
            [str(rng.choice(["Pharmaceutical Therapy, NOS", "Radiation Therapy, NOS"]))]
        for tt in treatments:
            rows.append({**base, "treatment_or_therapy": str(rng.choice(["yes", "no"])), "treatment_type": tt})
    clinical = pd.DataFrame(rows, columns=list(_CLINICAL_COLUMNS))
    clinical = clinical.iloc[rng.permutation(len(clinical))].reset_index(drop=True)

    slides = []
    for i, p in enumerate(layout.itertuples()):
        sample = {"case_id": case_ids[i], "case_submitter_id": p.patient_id, "project_id": PROJECT_ID,
                  "sample_id": _uuid(rng), "sample_submitter_id": f"{p.patient_id}-01A"}
        for j in range(int(p.n_slides)):
            slides.append({**sample, "slide_id": _uuid(rng), "slide_submitter_id": f"{p.patient_id}-01Z-00-DX{j + 1}",
                           "section_location": MISSING, "percent_tumor_cells": str(int(rng.integers(50, 96)))})
        if i % 7 == 3:  # frozen top section: listed by GDC, but no diagnostic image in the cohort
            slides.append({**sample, "slide_id": _uuid(rng), "slide_submitter_id": f"{p.patient_id}-01A-01-TS1",
                           "section_location": "TOP", "percent_tumor_cells": str(int(rng.integers(50, 96)))})
    return clinical, pd.DataFrame(slides)


def _write_tsv(path: Path, df: pd.DataFrame, na_rep: str = "") -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, na_rep=na_rep, lineterminator="\n")


# ---------------------------------------------------------------------------------------------------------


# The demo cohort's input files (relative to its folder), keyed like a real cohort's config inputs.
DEMO_FILES = {
    "sheet": "cohort_sheet.tsv",
    "rna": "rna/HiSeqV2_PANCAN.gz",
    "gene_sets": "genesets/demo.gmt",
    "clinical": "clinical/clinical.tsv",
    "biospecimen": "biospecimen/slide.tsv",
}


def make_demo_cohort(out_dir, n_patients: int = 40, seed: int = 0, *, slide_size: tuple[int, int] = (4096, 3072),
                     workers: int | None = None, planted_fraction: float = PLANT_FRACTION,
                     signal: str = "redundant") -> dict[str, Path]:
    """Write the demo cohort under ``out_dir``; return the paths (keys of ``DEMO_FILES``, plus
    slides_dir, truth, truth_regions).

    Deterministic in ``seed``. ``slide_size`` (level-0 width, height; each slide varies by +-10 %) and
    ``workers`` (slide-writing processes, default min(2, CPUs)) exist for tests and small machines.
    ``planted_fraction``: share of class-1 patients whose first slide carries the class look only in a
    planted box (``truth_regions.tsv``: slide_id, patient_id, x0, y0, x1, y1 in level-0 px, x1/y1
    exclusive); 0 plants nothing, and so does the complementary signal.
    ``signal``: "redundant" (default: class in slides and RNA alike) or "complementary" (see
    ``complementary_layout``: class and hazard need the slide signal and the pathway signal together).
    """
    out = Path(out_dir)
    layout = _layout(n_patients, seed) if _signal_mode(signal) == "redundant" else complementary_layout(n_patients, seed)
    sheet = demo_sheet(n_patients, seed)
    paths = {k: out / v for k, v in DEMO_FILES.items()}
    paths.update(slides_dir=out / "slides", truth=out / "truth.tsv", truth_regions=out / "truth_regions.tsv")
    paths["slides_dir"].mkdir(parents=True, exist_ok=True)

    # Tables first (milliseconds), slides last (seconds): a killed run still leaves usable tables.
    _write_xena(paths["rna"], _expression(_rna_view(layout), seed))
    _write_gmt(paths["gene_sets"], _gene_sets())
    clinical, slides = _clinical(_clinical_view(layout), seed)
    _write_tsv(paths["clinical"], clinical)
    _write_tsv(paths["biospecimen"], slides)
    _write_tsv(paths["truth"], layout[["patient_id", "class", "risk", "time_days", "event", "label",
                                       "primary_diagnosis", "has_rna", "n_slides",
                                       *[c for c in _COMPLEMENT_COLUMNS if c in layout]]].round({"risk": 6, **{c: 6 for c in _COMPLEMENT_COLUMNS}}))

    pidx = {p: i for i, p in enumerate(layout["patient_id"])}
    # int class (redundant) or float position on the phenotype axis (complementary): passed on as is.
    cls = dict(zip(layout["patient_id"], _slide_view(layout), strict=True))
    # Planting draws the class-0 look around a class-1 box; with a continuous slide latent that would
    # overwrite the patient's slide signal, so the complementary demo plants nothing.
    planted = set(planted_slides(layout, seed, planted_fraction)) if "slide_signal" not in layout else set()
    jobs, regions = [], []
    for row in sheet.itertuples():
        i = pidx[row.patient_id]
        j = int(row.slide_id[-1]) - 1
        slide_seed = [int(seed), _NS_SLIDE, i, j]
        jobs.append((str(out / row.path), slide_seed, [int(seed), _NS_PATIENT, i],
                     cls[row.patient_id], tuple(slide_size), row.slide_id in planted))
        if row.slide_id in planted:
            regions.append((row.slide_id, row.patient_id, *plant_box(slide_seed, tuple(slide_size))))
    _write_tsv(paths["truth_regions"], pd.DataFrame(regions, columns=["slide_id", "patient_id", "x0", "y0", "x1",
                                                                      "y1"]))
    n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    if n_workers > 1:
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            list(pool.map(_write_slide, jobs))
    else:
        for job in jobs:
            _write_slide(job)
    # The sheet last: its presence means every slide it lists is complete.
    _write_tsv(paths["sheet"], sheet)
    return paths
