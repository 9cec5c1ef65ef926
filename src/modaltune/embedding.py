"""Streaming patch embedding: tiles HDF5 -> features HDF5 (CLAM/TRIDENT layout, docs/ARCHITECTURE.md).

Tiles are read and resized/cropped as uint8 in DataLoader workers, normalised on the device, encoded
under autocast on CUDA, and each batch is appended to resizable HDF5 datasets as soon as it is
computed, so peak memory does not grow with the number of tiles. The file is written under a temp
name and renamed when complete (``complete=True`` is the last attribute written). An existing
complete output whose provenance attrs match is skipped; any mismatch is logged and redone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from modaltune import __version__, devices
from modaltune.errors import InputError
from modaltune.io_utils import atomic_path, remove_orphans
from modaltune.tables import attr_value, read_tiles_attrs

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Attributes that must match for an existing features file to be reused.
RESUME_KEYS = ("encoder", "checkpoint_sha256", "encoder_kwargs", "feature_dtype", "patch_size", "target_mpp",
               "n_tiles", "slide_path")
# Tiling attrs copied into the features file (provenance for loaders and the failures table).
TILING_KEYS = ("slide_path", "slide_id", "patch_size", "target_mpp", "level0_mpp", "read_level", "read_size",
               "level0_size", "tissue_method", "min_tissue", "n_tiles")
_COPY_ROWS = 65536  # coords are copied in slices of this many rows


def pick_device(device: str = "auto") -> torch.device:
    return devices.pick_device(device, key="embedding.device")


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = run in fp32 (the one mixed-precision policy, modaltune.devices)."""
    return devices.amp_settings(precision, device, key="embedding.precision")[0]


class _TileDataset:
    """Map-style dataset: index -> (uint8 CHW tensor, index). Picklable if the source is."""

    def __init__(self, source, resize_crop: Callable):
        self.source = source
        self.resize_crop = resize_crop

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        return self.resize_crop(self.source[i]), i


def _worker_init(_: int) -> None:
    import torch

    # Each worker decodes tiles; intra-op threads there would only fight the encoder for cores.
    torch.set_num_threads(1)


def _default_reader(tiles_h5: str):
    from modaltune.tiling import TileReader  # lazy: tiling pulls in OpenSlide

    return TileReader(tiles_h5)


def _canonical_kwargs(encoder: str, encoder_kwargs: dict) -> tuple[str, int | None]:
    from modaltune.encoders import encoder_class

    cls = encoder_class(encoder)
    cfg = cls.resolve_config(**encoder_kwargs)
    return json.dumps(cfg, sort_keys=True), cls.feature_dim_hint


def _stale_reason(out_h5: Path, expected: dict) -> str | None:
    """None if ``out_h5`` is complete and matches ``expected``; else why it must be redone."""
    try:
        with h5py.File(out_h5, "r") as f:
            attrs = {k: attr_value(v) for k, v in f.attrs.items()}
    except OSError as exc:
        return f"unreadable ({exc})"
    if not attrs.get("complete", False):
        return "not marked complete"
    for key, want in expected.items():
        have = attrs.get(key)
        if isinstance(want, float) and isinstance(have, float | int):
            same = np.isclose(have, want)
        else:
            same = have == want
        if not same:
            return f"attr {key!r} differs (file: {have!r}, now: {want!r})"
    return None


def _summary(status: str, out_h5: Path, attrs: dict, **extra) -> dict:
    out = {"status": status, "out_h5": str(out_h5), "slide": attrs.get("slide_id", out_h5.stem),
           "encoder": attrs.get("encoder"), "n_tiles": int(attrs.get("n_rows", 0) or 0),
           "tiles_per_s": float(attrs.get("tiles_per_s", 0.0)), "wall_s": float(attrs.get("wall_s", 0.0)),
           "error": attrs.get("error", "")}
    out.update(extra)
    return out


def _base_attrs(tiles_attrs: dict, expected: dict) -> dict:
    import timm
    import torch

    attrs = {k: tiles_attrs[k] for k in TILING_KEYS if k in tiles_attrs and tiles_attrs[k] is not None}
    attrs.update(expected)
    attrs.update(torch_version=str(torch.__version__), timm_version=str(timm.__version__), modaltune_version=__version__)
    return attrs


def _write_failed(out_h5: Path, attrs: dict, feature_dim: int, feature_dtype: str, error: str) -> dict:
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        f.create_dataset("features", shape=(0, feature_dim), dtype=feature_dtype)
        f.create_dataset("coords", shape=(0, 2), dtype=np.int64)
        f.create_dataset("coords_target", shape=(0, 2), dtype=np.int64)
        attrs = dict(attrs, feature_dim=feature_dim, status="failed", error=error, n_rows=0,
                     tiles_per_s=0.0, wall_s=0.0)
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["complete"] = True
    log.warning("features %s: slide failed upstream (%s); wrote a failed record", out_h5, error)
    return _summary("failed", out_h5, attrs)


def embed_slide(tiles_h5: str | Path, out_h5: str | Path, *, encoder: str = "tiny", checkpoint: str | None = None,
                encoder_kwargs: dict | None = None, batch_size: int = 64, num_workers: int = 2,
                device: str = "auto", precision: str = "auto", feature_dtype: str = "float32",
                progress: bool = True, channels_last: bool = False,
                reader_factory: Callable[[str], Any] | None = None) -> dict:
    """Embed every tile of one slide into ``out_h5``; returns a summary dict.

    Returns ``{"status": "ok"|"failed"|"skipped", "out_h5", "slide", "encoder", "n_tiles",
    "tiles_per_s", "wall_s", "error"}``. ``reader_factory(tiles_h5)`` builds the tile source
    (default ``modaltune.tiling.TileReader``): ``len()`` and ``[i] -> uint8 (P, P, 3)``, picklable.
    """
    import torch

    from modaltune.encoders import build_encoder
    from modaltune.encoders.base import sha256_file

    tiles_h5, out_h5 = Path(tiles_h5), Path(out_h5)
    # A job killed mid-write (SIGKILL, preemption) leaves its hidden .part file; this job owns the target
    # (one job per slide), so it removes them even when the existing output turns out to be current.
    remove_orphans(out_h5)
    encoder_kwargs = dict(encoder_kwargs or {})
    if feature_dtype not in ("float32", "float16"):
        raise InputError(f"feature_dtype {feature_dtype!r} must be 'float32' or 'float16'")
    if batch_size < 1:
        raise InputError(f"embedding batch_size must be >= 1, got {batch_size}")
    tiles_attrs = read_tiles_attrs(tiles_h5)
    kwargs_json, dim_hint = _canonical_kwargs(encoder, encoder_kwargs)
    expected = {"encoder": encoder, "encoder_kwargs": kwargs_json, "feature_dtype": feature_dtype,
                "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else "none",
                "patch_size": tiles_attrs.get("patch_size"), "target_mpp": tiles_attrs.get("target_mpp"),
                "n_tiles": int(tiles_attrs.get("n_tiles", 0) or 0), "slide_path": tiles_attrs.get("slide_path")}
    expected = {k: v for k, v in expected.items() if v is not None}

    if out_h5.exists():
        reason = _stale_reason(out_h5, expected)
        if reason is None:
            with h5py.File(out_h5, "r") as f:
                attrs = {k: attr_value(v) for k, v in f.attrs.items()}
            log.info("features %s: complete and up to date; skipped", out_h5)
            return _summary("skipped", out_h5, attrs, stored_status=attrs.get("status"))
        log.warning("features %s: redoing, existing file is stale: %s", out_h5, reason)

    base = _base_attrs(tiles_attrs, expected)
    if tiles_attrs["status"] != "ok" or expected["n_tiles"] == 0:
        error = tiles_attrs.get("error") or ("no tiles" if tiles_attrs["status"] == "ok" else "tiling failed")
        return _write_failed(out_h5, base, dim_hint or 0, feature_dtype, str(error))

    dev = pick_device(device)
    amp_dtype = _autocast_dtype(precision, dev)
    t_load = time.perf_counter()
    enc = build_encoder(encoder, checkpoint=checkpoint, **encoder_kwargs)
    model = enc.model.to(dev)
    normalize = enc.normalize.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    load_s = time.perf_counter() - t_load

    source = (reader_factory or _default_reader)(str(tiles_h5))
    n = len(source)
    if n != expected["n_tiles"]:
        raise InputError(f"tiles file {tiles_h5}: attribute n_tiles={expected['n_tiles']} but the tile source "
                         f"has {n} tiles; re-run tiling for this slide")
    cuda = dev.type == "cuda"
    loader = torch.utils.data.DataLoader(
        _TileDataset(source, enc.resize_crop), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=cuda, persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_worker_init if num_workers > 0 else None)

    from tqdm.auto import tqdm

    attrs = dict(base, feature_dim=enc.feature_dim, precision=str(amp_dtype or torch.float32).replace("torch.", ""),
                 device=dev.type, model_load_s=round(load_s, 3), batch_size=batch_size, num_workers=num_workers)
    np_dtype = np.dtype(feature_dtype)
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        chunk_rows = max(1, min(n, 1024))
        feats = f.create_dataset("features", shape=(0, enc.feature_dim), maxshape=(None, enc.feature_dim),
                                 dtype=np_dtype, chunks=(chunk_rows, enc.feature_dim))
        written = 0
        t0 = time.perf_counter()
        bar = tqdm(total=n, desc=f"embed {tiles_attrs.get('slide_id', tiles_h5.stem)}", unit="tile",
                   disable=not progress, leave=False)
        with torch.inference_mode():
            for images, idx in loader:
                if int(idx[0]) != written:  # rows must line up with the coords copied below
                    raise RuntimeError(f"tile order broken: batch starts at {int(idx[0])}, expected {written}")
                x = images.to(dev, non_blocking=cuda)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                x = normalize(x)
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(x)
                block = out.float().cpu().numpy().astype(np_dtype, copy=False)
                feats.resize(written + len(block), axis=0)
                feats[written:] = block
                written += len(block)
                bar.update(len(block))
        wall = time.perf_counter() - t0
        bar.close()
        del loader  # stop persistent workers before the file is renamed
        _copy_coords(tiles_h5, f, n)
        attrs.update(status="ok", error="", n_rows=written, wall_s=round(wall, 4),
                     tiles_per_s=round(written / wall, 3) if wall > 0 else 0.0)
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["complete"] = True  # last: a reader that sees it knows every row is there
    log.info("features %s: %d tiles in %.1f s (%.1f tiles/s, %s)", out_h5, written, wall,
             attrs["tiles_per_s"], dev.type)
    return _summary("ok", out_h5, attrs)


def _copy_coords(tiles_h5: Path, f: h5py.File, n: int) -> None:
    """Copy coords / coords_target in slices so memory stays flat for any slide size."""
    with h5py.File(tiles_h5, "r") as src:
        for name in ("coords", "coords_target"):
            if name not in src:
                if name == "coords":
                    raise InputError(f"tiles file {tiles_h5}: dataset 'coords' missing; re-run tiling")
                continue
            if src[name].shape != (n, 2):
                raise InputError(f"tiles file {tiles_h5}: dataset {name!r} has shape {src[name].shape}, "
                                 f"expected ({n}, 2); re-run tiling")
            dst = f.create_dataset(name, shape=(n, 2), dtype=np.int64)
            for start in range(0, n, _COPY_ROWS):
                dst[start:start + _COPY_ROWS] = src[name][start:start + _COPY_ROWS]
