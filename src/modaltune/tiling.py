"""Tissue detection, the patch grid, the per-slide tiles HDF5 (+ QC png) and a fast tile reader.

Method (as in ModalTune's preprocessing, made explicit):

1. Tissue mask on a low-resolution image: the smallest pyramid level whose longer side exceeds
   1000 px (paper). When that level's longer side exceeds ``MAX_MASK_SIDE`` (2048: a sparse or missing
   pyramid) it is box-reduced by the integer factor that keeps the longer side just above 1000 px, as if
   the pyramid had that level (colour conversion and morphology cost grows with pixels). Transparent
   (unscanned) pixels count as white background.
   - ``"lab"`` (default, the paper's): tissue where CIELAB a* (``skimage.color.rgb2lab``) exceeds
     ``lab_factor`` (1.1) x the mean a* of the image. We add an absolute floor a* > ``LAB_MIN_A`` so an
     empty slide (a* ~ 0 +- JPEG noise, mean ~ 0) does not turn its noise into tissue.
   - ``"otsu"``: Otsu threshold (``skimage.filters.threshold_otsu``) on HSV saturation, with a floor
     ``OTSU_MIN_SATURATION`` for the same reason.
   Then morphological closing with a ``close_kernel`` x ``close_kernel`` square (edge-padded so the
   slide border does not erode tissue), filling of holes smaller than one patch footprint (larger
   lumina and background enclosed by tissue stay background, like the paper's ``remove_all_holes=False``;
   ``max_hole_px=None`` fills all holes), and removal of connected components smaller than a quarter of
   one patch footprint (they cannot carry a patch).
2. Non-overlapping grid at ``target_mpp``: one patch covers ``level0_size = round(patch_size *
   target_mpp / level0_mpp)`` level-0 px; the grid starts at (0, 0) and keeps only patches fully inside
   the slide. A patch is kept when its tissue fraction >= ``min_tissue`` (paper: 0.95). The fraction is
   exact for the mask's pixel grid: the area-weighted mean of the mask over the patch footprint,
   from a summed-area table interpolated bilinearly at the (fractional) footprint corners.
3. Reading: the pyramid level with the largest downsample whose region for one patch is still at
   least ``patch_size`` px (``read_size = round(level0_size / downsample)``), so reading never
   upsamples; regions are resized to ``patch_size`` (area averaging) only when no level matches exactly.
   Generic-TIFF and Aperio levels stored as regular JPEG/LZW/deflate tile grids are decoded straight
   from their TIFF tiles (bit-identical to OpenSlide's pixels, ~5x less CPU); everything else goes
   through ``OpenSlide.read_region``. ``iter_tile_batches`` reads with parallel threads.

Slide-level failures (unreadable, no mpp, no tissue) are recorded in the HDF5 (``status="failed"``)
rather than stopping a cohort run, unless ``on_error="raise"``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from modaltune import __version__
from modaltune.errors import InputError, SlideError
from modaltune.io_utils import atomic_path
from modaltune.slide_io import SlideHandle, TiffLevelReader, open_openslide, open_slide
from modaltune.tables import read_tiles

MASK_MIN_SIDE = 1000
MAX_MASK_SIDE = 2048
LAB_MIN_A = 2.0
OTSU_MIN_SATURATION = 8 / 255
TISSUE_METHODS = ("lab", "otsu")
QC_MAX_SIDE = 1024


# ---------------------------------------------------------------- tissue mask

def mask_source(slide: SlideHandle, min_side: int = MASK_MIN_SIDE,
                max_side: int = MAX_MASK_SIDE) -> tuple[np.ndarray, tuple[float, float]]:
    """Low-resolution RGB uint8 image of the whole slide for tissue detection, and its scale
    (mask px per level-0 px, x and y). See the module docstring for the choice of level."""
    dims = slide.level_dimensions
    candidates = [lv for lv in range(slide.level_count) if max(dims[lv]) > min_side]
    level = max(candidates) if candidates else 0
    w, h = dims[level]
    factor = max(1, max(w, h) // min_side) if max(w, h) > max_side else 1
    ds = slide.level_downsamples[level]
    # Read in row strips (a multiple of the reduction factor) so memory stays bounded even when a
    # slide has no usable pyramid level; Image.reduce is an exact box average over factor^2 blocks.
    strip = factor * max(1, 2048 // factor)
    parts = []
    for y in range(0, h, strip):
        rows = min(strip, h - y)
        img = slide.read_region((0, int(round(y * ds))), level, (w, rows))
        parts.append(np.asarray(img.reduce(factor) if factor > 1 else img))
    rgb = rgba_to_rgb(np.concatenate(parts, axis=0))
    w0, h0 = slide.dimensions
    return rgb, (w / w0 / factor, h / h0 / factor)


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Drop alpha; transparent (unscanned) pixels become white, as on the glass."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return np.round(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def detect_tissue(rgb: np.ndarray, method: str = "lab", lab_factor: float = 1.1, close_kernel: int = 9,
                  min_object_px: int = 0, max_hole_px: int | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image (method in the module docstring)."""
    from scipy import ndimage
    from skimage import color, filters, morphology, util

    if method == "lab":
        # float32 halves rgb2lab's time (float64 by default) at < 1e-4 a* units difference.
        a_star = color.rgb2lab(util.img_as_float32(rgb))[..., 1]
        mask = a_star > max(lab_factor * float(a_star.mean()), LAB_MIN_A)
    elif method == "otsu":
        sat = color.rgb2hsv(util.img_as_float32(rgb))[..., 1]
        thr = filters.threshold_otsu(sat) if sat.max() > sat.min() else 1.0
        mask = sat > max(thr, OTSU_MIN_SATURATION)
    else:
        raise InputError(f"tissue_method {method!r} is unknown; use one of {TISSUE_METHODS}")
    if close_kernel > 1:
        # Closing with a k x k square = max filter then min filter (separable, O(1) per pixel, unlike
        # binary_closing's k^2); mode "nearest" pads with the edge so the border does not erode tissue.
        m = mask.astype(np.uint8)
        m = ndimage.minimum_filter(ndimage.maximum_filter(m, size=close_kernel, mode="nearest"),
                                   size=close_kernel, mode="nearest")
        mask = m.astype(bool)
    if max_hole_px is None:
        mask = ndimage.binary_fill_holes(mask)
    elif max_hole_px > 0:
        mask = morphology.remove_small_holes(mask, max_size=int(max_hole_px))
    if min_object_px > 1:
        mask = morphology.remove_small_objects(mask, max_size=int(min_object_px) - 1)
    return mask


def footprint_fractions(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: float) -> np.ndarray:
    """Area-weighted mean of ``mask`` over squares [x0, x0+size) x [y0, y0+size) in (fractional) mask px.

    The integral of a piecewise-constant image is bilinear inside each pixel, so bilinear interpolation
    of the summed-area table at the corners is exact (no rounding of footprints to whole mask pixels).
    """
    from scipy import ndimage

    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)
    xa, xb = np.clip(x0, 0, w), np.clip(x0 + size, 0, w)
    ya, yb = np.clip(y0, 0, h), np.clip(y0 + size, 0, h)

    def integral(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(sat, [ys, xs], order=1, mode="nearest")

    total = integral(yb, xb) - integral(ya, xb) - integral(yb, xa) + integral(ya, xa)
    return np.clip(total / (size * size), 0.0, 1.0)


# ---------------------------------------------------------------- grid geometry

def choose_read_level(level_downsamples: tuple[float, ...], level0_size: int, patch_size: int) -> tuple[int, int]:
    """(read_level, read_size): the coarsest level whose patch region is still >= patch_size px."""
    best, best_ds = 0, level_downsamples[0]
    for lv, ds in enumerate(level_downsamples):
        if round(level0_size / ds) >= patch_size and ds > best_ds:
            best, best_ds = lv, ds
    return best, max(1, round(level0_size / best_ds))


def grid_coords(level0_dims: tuple[int, int], level0_size: int, read_dims: tuple[int, int],
                read_ds: float, read_size: int) -> np.ndarray:
    """Row-major (y, then x) level-0 top-left corners of all patches fully inside the slide at level 0
    and at the read level."""
    w0, h0 = level0_dims
    xs = np.arange(w0 // level0_size, dtype=np.int64) * level0_size
    ys = np.arange(h0 // level0_size, dtype=np.int64) * level0_size
    # OpenSlide maps a level-0 location to floor(x / ds) at the read level.
    xs = xs[np.floor(xs / read_ds).astype(np.int64) + read_size <= read_dims[0]]
    ys = ys[np.floor(ys / read_ds).astype(np.int64) + read_size <= read_dims[1]]
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


# ---------------------------------------------------------------- the stage

def tile_slide(slide_path: str, out_h5: str, *, slide_id: str | None = None, patch_size: int = 256,
               target_mpp: float = 0.5, mpp_override: float | None = None, tissue_method: str = "lab",
               lab_factor: float = 1.1, close_kernel: int = 9, min_tissue: float = 0.95,
               qc_png: str | None = None, on_error: str = "record") -> dict[str, Any]:
    """Tile one slide into ``out_h5`` (tiles HDF5, docs/ARCHITECTURE.md) and optionally a QC png.

    Returns a summary dict (status, n_tiles, error, geometry). With ``on_error="record"`` a SlideError
    (unreadable, no mpp, no tissue) is written as ``status="failed"`` with 0 rows; ``"raise"`` re-raises.
    """
    slide_path = os.fspath(slide_path)
    slide_id = slide_id or Path(slide_path).stem
    _check_args(patch_size, target_mpp, tissue_method, lab_factor, close_kernel, min_tissue, on_error)
    t0 = time.perf_counter()
    attrs: dict[str, Any] = dict(
        slide_path=slide_path, slide_id=slide_id, patch_size=int(patch_size), target_mpp=float(target_mpp),
        level0_mpp=float("nan"), read_level=-1, read_size=-1, level0_size=-1, tissue_method=tissue_method,
        min_tissue=float(min_tissue), lab_factor=float(lab_factor), close_kernel=int(close_kernel),
        n_tiles=0, status="ok", error="", modaltune_version=__version__, mpp_source="",
    )
    empty = np.zeros((0, 2), np.int64)
    coords, coords_t, frac = empty, empty, np.zeros(0, np.float32)
    qc: dict[str, Any] = {}
    try:
        with open_slide(slide_path, mpp_override) as slide:
            m0 = slide.level0_mpp
            level0_size = max(1, round(patch_size * target_mpp / m0))
            read_level, read_size = choose_read_level(slide.level_downsamples, level0_size, patch_size)
            attrs.update(level0_mpp=m0, mpp_source=slide.mpp_source, level0_size=level0_size,
                         read_level=read_level, read_size=read_size)
            thumb, (scale_x, scale_y) = mask_source(slide)
            qc["thumb"] = thumb
            footprint = level0_size * scale_x
            mask = detect_tissue(thumb, tissue_method, lab_factor, close_kernel,
                                 min_object_px=int(0.25 * footprint * footprint * scale_y / scale_x),
                                 max_hole_px=int(footprint * footprint * scale_y / scale_x))
            qc["mask"] = mask
            grid = grid_coords(slide.dimensions, level0_size, slide.level_dimensions[read_level],
                               slide.level_downsamples[read_level], read_size)
            # Mask pixels are square up to rounding of the level sizes; use the mean scale.
            s = (scale_x + scale_y) / 2
            fr = footprint_fractions(mask, grid[:, 0] * scale_x, grid[:, 1] * scale_y, level0_size * s)
            keep = fr >= min_tissue
            coords, frac = grid[keep], fr[keep].astype(np.float32)
            qc["scale"] = (scale_x, scale_y)
            if len(coords) == 0:
                raise SlideError(slide_path, f"no tissue: none of {len(grid)} grid patches of {patch_size} px at "
                                 f"{target_mpp} um/px has tissue fraction >= {min_tissue} (method "
                                 f"{tissue_method}); check the slide, or lower min_tissue")
            coords_t = np.round(coords * (m0 / target_mpp)).astype(np.int64)
    except SlideError as e:
        if on_error == "raise":
            raise
        attrs.update(status="failed", error=str(e))
        coords, coords_t, frac = empty, empty, np.zeros(0, np.float32)
    attrs["n_tiles"] = int(len(coords))
    # The QC png first, the tiles HDF5 last: the HDF5 is what resume checks look at (shards.tiles_current),
    # so a write that fails in between (disk full) leaves no HDF5 and the rerun redoes both.
    if qc_png:
        write_qc_png(qc_png, qc.get("thumb"), qc.get("mask"), coords, qc.get("scale"), attrs)
    _write_tiles_h5(out_h5, coords, coords_t, frac, attrs)
    return {**{k: attrs[k] for k in ("status", "error", "n_tiles", "slide_id", "level0_mpp", "mpp_source",
                                      "read_level", "read_size", "level0_size")},
            "out_h5": os.fspath(out_h5), "qc_png": qc_png, "wall_s": time.perf_counter() - t0}


def _check_args(patch_size, target_mpp, tissue_method, lab_factor, close_kernel, min_tissue, on_error) -> None:
    if not (isinstance(patch_size, int | np.integer) and patch_size > 0):
        raise InputError(f"tiling patch_size must be a positive integer (pixels), got {patch_size!r}")
    if not (math.isfinite(float(target_mpp)) and target_mpp > 0):
        raise InputError(f"tiling target_mpp must be a positive number (um/px), got {target_mpp!r}")
    if tissue_method not in TISSUE_METHODS:
        raise InputError(f"tiling tissue_method {tissue_method!r} is unknown; use one of {TISSUE_METHODS}")
    if not lab_factor > 0 or not isinstance(close_kernel, int | np.integer) or close_kernel < 0:
        raise InputError(f"tiling lab_factor must be > 0 and close_kernel an int >= 0, got "
                         f"{lab_factor!r}, {close_kernel!r}")
    if not 0.0 <= min_tissue <= 1.0:
        raise InputError(f"tiling min_tissue must lie in [0, 1], got {min_tissue!r}")
    if on_error not in ("record", "raise"):
        raise InputError(f"tiling on_error must be 'record' or 'raise', got {on_error!r}")


def _write_tiles_h5(out_h5: str, coords: np.ndarray, coords_t: np.ndarray, frac: np.ndarray,
                    attrs: dict[str, Any]) -> None:
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=coords.astype(np.int64).reshape(-1, 2))
        f.create_dataset("coords_target", data=coords_t.astype(np.int64).reshape(-1, 2))
        f.create_dataset("tissue_fraction", data=frac.astype(np.float32).reshape(-1))
        for k, v in attrs.items():
            f.attrs[k] = v


def write_qc_png(path: str, thumb: np.ndarray | None, mask: np.ndarray | None, coords: np.ndarray,
                 scale: tuple[float, float] | None, attrs: dict[str, Any]) -> None:
    """Thumbnail with the tissue-mask contour (green) and kept patches (blue); the error text if failed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    if thumb is not None:
        step = max(1, int(math.ceil(max(thumb.shape[:2]) / QC_MAX_SIDE)))
        ax.imshow(thumb[::step, ::step], extent=(0, thumb.shape[1], thumb.shape[0], 0), interpolation="nearest")
        if mask is not None and mask.any() and not mask.all():
            small = mask[::step, ::step].astype(np.uint8)
            xs = np.arange(small.shape[1]) * step + step / 2
            ys = np.arange(small.shape[0]) * step + step / 2
            ax.contour(xs, ys, small, levels=[0.5], colors="lime", linewidths=0.8)
        if len(coords) and scale is not None:
            sx, sy = scale
            s0 = attrs["level0_size"]
            x, y = coords[:, 0] * sx, coords[:, 1] * sy
            w, h = s0 * sx, s0 * sy
            quads = np.stack([np.stack([x, y], 1), np.stack([x + w, y], 1), np.stack([x + w, y + h], 1),
                              np.stack([x, y + h], 1)], axis=1)
            ax.add_collection(PolyCollection(quads, facecolors="none", edgecolors="royalblue", linewidths=0.4))
    title = f"{attrs['slide_id']}: {attrs['n_tiles']} tiles, {attrs['patch_size']} px @ {attrs['target_mpp']} um/px"
    if attrs["status"] != "ok":
        title = f"{attrs['slide_id']}: FAILED"
        ax.text(0.5, 0.5, attrs["error"], transform=ax.transAxes, ha="center", va="center", wrap=True,
                fontsize=9, color="darkred")
    ax.set_title(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


# ---------------------------------------------------------------- reading tiles

def region_to_patch(region, patch_size: int):
    """OpenSlide RGBA region -> RGB PIL image of patch_size px: transparent (unscanned) pixels over white,
    then downscaled by area averaging (Image.reduce for integer factors, else the BOX filter)."""
    from PIL import Image

    # All in Pillow: its C paths are several times faster here than numpy's strided RGBA->RGB copy.
    if region.mode == "RGBA" and region.getchannel("A").getextrema()[0] < 255:
        region = Image.alpha_composite(Image.new("RGBA", region.size, (255, 255, 255, 255)), region)
    rgb = region.convert("RGB")
    rs = rgb.size[0]
    if rs == patch_size:
        return rgb
    if rs > patch_size and rs % patch_size == 0:
        return rgb.reduce(rs // patch_size)
    return rgb.resize((patch_size, patch_size), Image.Resampling.BOX if rs > patch_size else Image.Resampling.BILINEAR)


class TileReader:
    """Tiles of one slide as (patch_size, patch_size, 3) uint8 RGB arrays, indexable like a Dataset.

    Picklable: holds the slide path, not the OpenSlide handle, and (re)opens the slide lazily in each
    process, so it is safe in DataLoader workers and multiprocessing pools. ``slide_path`` overrides the
    path stored in the HDF5 (slides moved since tiling). ``fast``: decode TIFF tiles directly when the
    read level is a plain tiled TIFF page (:class:`modaltune.slide_io.TiffLevelReader`), else OpenSlide.
    """

    def __init__(self, tiles_h5: str, slide_path: str | None = None, fast: bool = True):
        self.tiles_h5 = os.fspath(tiles_h5)
        self.coords, self.coords_target, self.attrs = read_tiles(self.tiles_h5)
        self.slide_path = os.fspath(slide_path or self.attrs["slide_path"])
        self.patch_size = int(self.attrs["patch_size"])
        self.read_level = int(self.attrs["read_level"])
        self.read_size = int(self.attrs["read_size"])
        self.fast = fast
        self._osr = None
        self._tiff: TiffLevelReader | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_osr"], state["_tiff"], state["_pid"] = None, None, None
        return state

    def _slide(self):
        if self._osr is None or self._pid != os.getpid():
            self._osr = open_openslide(self.slide_path)
            self._pid = os.getpid()
            self._tiff = None
            if self.fast:
                self._tiff = TiffLevelReader.open(self.slide_path, self._osr.level_dimensions[self.read_level],
                                                  self._osr.properties.get("openslide.vendor"))
                self._ds = self._osr.level_downsamples[self.read_level]
        return self._osr

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.coords)
        if not -n <= i < n:
            raise IndexError(f"tile {i} out of range for {n} tiles of {self.tiles_h5}")
        x, y = self.coords[i]
        return self.read_at(int(x), int(y))

    def read_at(self, x: int, y: int) -> np.ndarray:
        """The patch with level-0 top-left (x, y) as RGB uint8 (patch_size, patch_size, 3)."""
        import openslide
        from PIL import Image

        rs = self.read_size
        osr = self._slide()
        if self._tiff is not None:
            # OpenSlide's mapping of a level-0 location to the level: x / downsample
            rgb = self._tiff.read(int(x // self._ds), int(y // self._ds), rs, rs)
            if rs == self.patch_size:
                return rgb
            return np.asarray(region_to_patch(Image.fromarray(rgb), self.patch_size))
        try:
            region = osr.read_region((x, y), self.read_level, (rs, rs))
        except openslide.OpenSlideError as e:
            raise SlideError(self.slide_path, f"OpenSlide failed to read level {self.read_level} at {(x, y)}: {e}") \
                from e
        return np.asarray(region_to_patch(region, self.patch_size))

    def read_batch(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """(len(indices), patch_size, patch_size, 3) uint8, read in the given order."""
        out = np.empty((len(indices), self.patch_size, self.patch_size, 3), np.uint8)
        for j, i in enumerate(indices):
            out[j] = self[int(i)]
        return out

    def close(self) -> None:
        if self._osr is not None and self._pid == os.getpid():
            self._osr.close()
            if self._tiff is not None:
                self._tiff.close()
        self._osr, self._tiff, self._pid = None, None, None


_WORKER_READER: TileReader | None = None


def _init_worker(reader: TileReader) -> None:
    global _WORKER_READER
    _WORKER_READER = reader


def _read_chunk(bounds: tuple[int, int]) -> tuple[int, np.ndarray]:
    assert _WORKER_READER is not None
    return bounds[0], _WORKER_READER.read_batch(range(*bounds))


def iter_tile_batches(tiles_h5: str, batch_size: int = 64, workers: int = 2, backend: str = "thread",
                      slide_path: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (indices, tiles (B, P, P, 3) uint8) for all tiles in order, read by ``workers`` in parallel.

    ``backend="thread"``: threads share one OpenSlide handle (thread-safe) and its tile cache; OpenSlide
    (called through ctypes) and Pillow release the GIL while decoding/resizing, and no pixels are copied
    between processes. ``"process"``: one handle per forked process (batches are pickled back).
    At most 2 x workers batches are in flight, so memory stays bounded when the consumer is slow.
    ``workers <= 1`` reads in the calling thread.
    """
    if backend not in ("thread", "process"):
        raise InputError(f"iter_tile_batches backend must be 'thread' or 'process', got {backend!r}")
    reader = TileReader(tiles_h5, slide_path)
    n = len(reader)
    chunks = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if workers <= 1 or len(chunks) <= 1:
        for s, e in chunks:
            yield np.arange(s, e), reader.read_batch(range(s, e))
        reader.close()
        return
    import collections
    import concurrent.futures as cf

    if backend == "thread":
        if n:
            reader._slide()  # open once here, not racing in the worker threads
        pool: cf.Executor = cf.ThreadPoolExecutor(workers)
        fn = _read_chunk_with(reader)
    else:
        import multiprocessing as mp

        # fork: no re-import of __main__ and a cheap start; each process reopens the slide itself.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(reader,))
        fn = _read_chunk
    pending: collections.deque = collections.deque()
    todo = iter(chunks)
    try:
        with pool:
            for c in todo:
                pending.append(pool.submit(fn, c))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                start, batch = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(fn, nxt))
                yield np.arange(start, start + len(batch)), batch
    finally:
        for f in pending:
            f.cancel()
        reader.close()


def _read_chunk_with(reader: TileReader):
    def read(bounds: tuple[int, int]) -> tuple[int, np.ndarray]:
        return bounds[0], reader.read_batch(range(*bounds))

    return read
