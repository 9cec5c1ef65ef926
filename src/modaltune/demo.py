"""Deterministic demo cohort: pyramidal TIFF slides, Xena RNA matrix, GMT gene sets, GDC clinical TSVs.

Everything a real TCGA cohort provides, in the same file formats (including their quirks), with a known
ground truth (class, risk, survival) so the pipeline's metrics can be checked against it. No torch here:
the generator runs in CPU-only rules and ``demo_sheet`` is called at Snakefile parse time.
"""

from __future__ import annotations

import numpy as np

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


__all__ = ["write_pyramid_tiff"]
