"""Deterministic demo cohort: pyramidal TIFF slides, Xena RNA matrix, GMT gene sets, GDC clinical TSVs.

Everything a real TCGA cohort provides, in the same file formats (including their quirks), with a known
ground truth (class, risk, survival) so the pipeline's metrics can be checked against it. No torch here:
the generator runs in CPU-only rules and ``demo_sheet`` is called at Snakefile parse time.
"""

from __future__ import annotations

import gzip
import io
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


def _patient_ids(n: int) -> list[str]:
    return [f"TCGA-D0-A{i + 1:03d}" for i in range(n)]


def _layout(n_patients: int, seed: int) -> pd.DataFrame:
    """Per-patient ground truth and format quirks, drawn from one seeded generator."""
    if int(n_patients) < 8:
        raise InputError(f"demo cohort: n_patients={n_patients} is too small; use at least 8 so both classes, "
                         "two-slide patients and patients without RNA all occur")
    n = int(n_patients)
    rng = np.random.default_rng([int(seed), 1])
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
_NUC_SPACING = {0: 62.0, 1: 46.0}    # mean distance between nuclei
_NUC_RADIUS = {0: 12.0, 1: 16.0}
_NUC_H = {0: 0.85, 1: 1.05}          # haematoxylin concentration inside a nucleus
_STROMA_H = {0: 0.03, 1: 0.09}       # faint haematoxylin in stroma: class 1 looks a little more purple
_STROMA_E = {0: 0.42, 1: 0.36}


def _patient_phenotype(cls: int, rng: np.random.Generator) -> dict:
    """Class means with per-patient variation wide enough that no single number separates the classes."""
    return {
        "spacing": _NUC_SPACING[cls] * float(np.exp(rng.normal(0, 0.18))),
        "radius": _NUC_RADIUS[cls] * float(np.exp(rng.normal(0, 0.12))),
        "nuc_h": _NUC_H[cls] * float(np.exp(rng.normal(0, 0.12))),
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


def _render_slide(seed_seq: list[int], cls: int, size: tuple[int, int]) -> np.ndarray:
    """One synthetic H&E slide (H, W, 3) uint8 at 0.25 mpp; deterministic in ``seed_seq``."""
    from PIL import Image

    rng = np.random.default_rng(seed_seq)
    ph = _patient_phenotype(cls, np.random.default_rng(seed_seq[:-1]))  # shared by a patient's slides
    d = _RENDER_DOWN
    w = int(round(size[0] * rng.uniform(0.9, 1.1) / 32) * 32) // d
    h = int(round(size[1] * rng.uniform(0.9, 1.1) / 32) * 32) // d
    f = 4  # tissue mask and stroma fields at a further 1/4: smooth fields need no fine grid
    hs, ws = h // f, w // f
    mask = _tissue_mask(rng, (hs, ws), rng.uniform(0.35, 0.50))
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


def _write_slide(path: Path, seed_seq: list[int], cls: int, size: tuple[int, int]) -> None:
    write_pyramid_tiff(path, _render_slide(seed_seq, cls, size), LEVEL0_MPP)
