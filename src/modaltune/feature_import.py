"""Reuse patch features computed elsewhere: TRIDENT, CLAM or STAMP HDF5 -> our features HDF5.

``embedding.source: import`` makes the embed stage convert each slide's existing file instead of
tiling and embedding it; the output is the features HDF5 of docs/ARCHITECTURE.md, so every later stage
is unchanged. What the three tools write (facts of their formats, checked against their code):

- TRIDENT: datasets ``features`` (N, D) and ``coords`` (N, 2) int level-0 top-left corners; attrs of
  ``coords``: ``patch_size`` (px at the target magnification), ``patch_size_level0``,
  ``level0_magnification``, ``target_magnification``, ``overlap``, ``level0_width``, ``level0_height``;
  attrs of ``features``: ``encoder``.
- CLAM (``h5_files/{slide}.h5``): ``features`` (N, D) float32 and ``coords`` (N, 2) level-0, no attrs
  (the patch size lives in the separate patches file, optionally copied as ``coords`` attrs
  ``patch_size`` / ``patch_level``).
- STAMP: ``feats`` (N, D) (float16) and ``coords`` (N, 2) float in micrometres (root attrs
  ``unit="um"``, ``tile_size_um``, ``tile_size_px``, ``extractor``); files of old STAMP versions have no
  unit and a stride of 224 for 256 um tiles.

Coordinates are converted to level-0 pixels (and target-mpp pixels for ``coords_target``, with the
tiling stage's rounding) and checked against the slide: every patch's top-left corner lies inside the
level-0 image, the recorded level-0 size equals the slide's, the patch geometry matches the tiling
config (``patch_size`` px at ``target_mpp``), and a grid stride equal to the patch size in target-mpp
pixels instead of its level-0 footprint is reported as coordinates in the wrong unit. Provenance attrs
(``import_path``, ``import_sha256``, ``import_format``, ``import_source_encoder``) record the source.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from modaltune import __version__
from modaltune.embedding import _stale_reason, embed_slide
from modaltune.errors import InputError
from modaltune.io_utils import atomic_path, file_sha256, remove_orphans
from modaltune.slide_io import open_slide
from modaltune.tables import attr_value

log = logging.getLogger(__name__)

FORMATS = ("trident", "clam", "stamp")
# embedding config keys read here (with their defaults), not by embed_slide
IMPORT_DEFAULTS = {"source": "embed", "import_dir": None, "import_format": "auto"}
IMPORT_KEYS = tuple(IMPORT_DEFAULTS)
GEOMETRY_RTOL = 0.05  # magnification-based tools round mpp (20x ~ 0.5 um/px); allow 5 %
# Published encoder names that mean the same model as ours (lower case, only letters and digits).
_ALIASES = {"provgigapath": {"gigapath", "provgigapath"}, "conchv15": {"conchv15", "conch15", "conchv1point5"}}
_HISTORIC_STAMP = (256.0, 224.0)  # um, px: coordinates of old STAMP files are in 224-px units of 256 um tiles


def find_import_file(import_dir: str | os.PathLike, slide_id: str, slide_path: str | None = None) -> Path | None:
    """``{import_dir}/{slide_id}.h5``, else ``{import_dir}/{slide file stem}.h5`` (TRIDENT, CLAM and STAMP
    name files after the slide file); also looked for in an ``h5_files`` subfolder (CLAM). None if absent."""
    root = Path(import_dir)
    names = [slide_id]
    if slide_path:
        stem = Path(slide_path).name.split(".")[0]
        names += [Path(slide_path).stem, stem]
    for folder in (root, root / "h5_files"):
        for name in dict.fromkeys(names):
            p = folder / f"{name}.h5"
            if p.is_file():
                return p
    return None


def check_import_dir(import_dir: str | os.PathLike | None, slide_ids: list[str], slide_paths: list[str]) -> None:
    """DAG-time check: the folder exists and holds a file for at least one slide (else a wrong folder)."""
    if not import_dir:
        raise InputError("config embedding.import_dir is not set; with embedding.source: import it must name "
                         "the folder of the existing features files (one {slide}.h5 per slide)")
    if not Path(import_dir).is_dir():
        raise InputError(f"config embedding.import_dir: folder {import_dir} does not exist; point it at the "
                         "folder of TRIDENT/CLAM/STAMP features files")
    if slide_ids and not any(find_import_file(import_dir, s, p) for s, p in zip(slide_ids, slide_paths, strict=True)):
        raise InputError(f"config embedding.import_dir: {import_dir} holds no features file for any slide of "
                         f"the sheet (looked for e.g. {slide_ids[0]}.h5); check the folder or the slide ids")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _same_encoder(ours: str, theirs: str) -> bool:
    a, b = _norm(ours), _norm(theirs)
    return a == b or b in _ALIASES.get(a, set())


def detect_format(f: h5py.File, path: str) -> str:
    if "feats" in f:
        return "stamp"
    if "features" not in f or "coords" not in f:
        raise InputError(f"imported features {path}: found datasets {sorted(f.keys())}; expected 'features' + "
                         "'coords' (TRIDENT/CLAM) or 'feats' + 'coords' (STAMP)")
    c = f["coords"].attrs
    if "patch_size_level0" in c or "level0_magnification" in c or "encoder" in f["features"].attrs:
        return "trident"
    return "clam"


def expected_feature_dim(encoder: str, encoder_kwargs: dict | None = None) -> int:
    """Output width of ``encoder`` with ``encoder_kwargs``, built on the meta device (no weights, no init)."""
    import torch

    from modaltune.encoders import build_encoder, encoder_class

    cls = encoder_class(encoder)
    try:
        with torch.device("meta"):
            return int(build_encoder(encoder, **(encoder_kwargs or {})).feature_dim)
    except InputError:
        raise
    except Exception:  # an encoder that cannot be built on meta: fall back to its declared width
        if cls.feature_dim_hint is None:
            raise
        return int(cls.feature_dim_hint)


def _grid_stride(v: np.ndarray) -> float | None:
    u = np.unique(np.asarray(v, np.float64))
    d = np.diff(u)
    d = d[d > 0]
    return float(np.median(d)) if len(d) else None


def read_external(path: str | os.PathLike, fmt: str = "auto") -> dict[str, Any]:
    """Features, raw coords and format facts of one TRIDENT/CLAM/STAMP file (nothing converted yet)."""
    path = os.fspath(path)
    if fmt not in ("auto", *FORMATS):
        raise InputError(f"config embedding.import_format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"imported features {path}: not a readable HDF5 file ({e}); re-export it") from e
    with f:
        found = detect_format(f, path)
        if fmt == "auto":
            fmt = found
        fkey = "feats" if fmt == "stamp" else "features"
        for key in (fkey, "coords"):
            if key not in f:
                raise InputError(f"imported features {path}: dataset {key!r} missing for import_format {fmt} "
                                 f"(file looks like {found}); set embedding.import_format to match the file")
        feats = np.asarray(f[fkey][()])
        coords = np.asarray(f["coords"][()])
        cattrs = {k: attr_value(v) for k, v in f["coords"].attrs.items()}
        fattrs = {k: attr_value(v) for k, v in f[fkey].attrs.items()}
        rattrs = {k: attr_value(v) for k, v in f.attrs.items()}
    src_encoder = fattrs.get("encoder") or rattrs.get("extractor") or rattrs.get("encoder")
    return {"path": path, "format": fmt, "features": feats, "coords": coords, "coords_attrs": cattrs,
            "features_attrs": fattrs, "root_attrs": rattrs, "source_encoder": None if src_encoder in (None, "None")
            else str(src_encoder)}


def to_level0(ext: dict, level0_mpp: float, level_downsamples: tuple[float, ...]) -> tuple[np.ndarray, dict]:
    """(coords (N, 2) int64 level-0, geometry facts: patch footprint at level 0 and patch size in px)."""
    path, fmt, c = ext["path"], ext["format"], ext["coords"]
    ca, ra = ext["coords_attrs"], ext["root_attrs"]
    if c.ndim != 2 or c.shape[1] != 2:
        raise InputError(f"imported features {path}: 'coords' has shape {c.shape}, expected (N, 2)")
    if not np.isfinite(c).all():
        raise InputError(f"imported features {path}: 'coords' holds NaN/inf; re-export the file")
    geo: dict[str, Any] = {"footprint0": None, "patch_px": None, "unit": "level0 px"}
    if fmt == "stamp":
        unit = ra.get("unit")
        tile_um = ra.get("tile_size_um") or (ra.get("tile_size") if unit == "um" else None)
        if unit == "um" or tile_um:
            um = c.astype(np.float64)
        elif _grid_stride(c[:, 0]) is not None and round(_grid_stride(c[:, 0])) == _HISTORIC_STAMP[1]:
            tile_um = _HISTORIC_STAMP[0]
            um = c.astype(np.float64) / _HISTORIC_STAMP[1] * _HISTORIC_STAMP[0]
        else:
            raise InputError(f"imported features {path}: STAMP coordinates without unit attrs ('unit', "
                             "'tile_size_um'); re-extract with a current STAMP or convert the file")
        level0 = np.round(um / level0_mpp)
        geo.update(unit="um", footprint0=float(tile_um) / level0_mpp if tile_um else None,
                   patch_px=int(ra["tile_size_px"]) if ra.get("tile_size_px") else None)
    else:
        if not np.allclose(c, np.round(c)):
            raise InputError(f"imported features {path}: {fmt} 'coords' are not whole pixels; expected level-0 "
                             "pixel corners (set embedding.import_format: stamp for micrometre coordinates)")
        level0 = c.astype(np.float64)
        if "patch_size_level0" in ca:
            geo["footprint0"] = float(ca["patch_size_level0"])
        elif "patch_size" in ca and "patch_level" in ca:  # CLAM patches-file attrs copied along
            lv = int(ca["patch_level"])
            if 0 <= lv < len(level_downsamples):
                geo["footprint0"] = float(ca["patch_size"]) * float(level_downsamples[lv])
        if "patch_size" in ca and fmt == "trident":
            geo["patch_px"] = int(ca["patch_size"])
    return level0.astype(np.int64), geo


def import_slide_features(src_h5: str | os.PathLike | None, out_h5: str | os.PathLike, *, slide_path: str,
                          slide_id: str | None = None, encoder: str, encoder_kwargs: dict | None = None,
                          import_format: str = "auto", patch_size: int = 256, target_mpp: float = 0.5,
                          mpp_override: float | None = None, feature_dtype: str = "float32",
                          checkpoint: str | None = None, **_ignored) -> dict:
    """Convert one slide's TRIDENT/CLAM/STAMP file ``src_h5`` into our features HDF5 ``out_h5``.

    ``src_h5=None`` (no file for this slide) writes a failed record (status "failed", 0 rows) so the
    cohort goes on, as for a slide that failed tiling. Bad files raise InputError naming the file.
    Returns the summary dict of :func:`modaltune.embedding.embed_slide`.
    """
    out_h5 = Path(out_h5)
    slide_id = slide_id or Path(slide_path).stem
    remove_orphans(out_h5)
    if feature_dtype not in ("float32", "float16"):
        raise InputError(f"config embedding.feature_dtype {feature_dtype!r} must be 'float32' or 'float16'")
    dim = expected_feature_dim(encoder, encoder_kwargs)
    with open_slide(slide_path, mpp_override) as slide:
        m0, (w0, h0) = float(slide.level0_mpp), slide.dimensions
        downsamples = tuple(slide.level_downsamples)
    level0_size = max(1, round(patch_size * target_mpp / m0))
    base = {"encoder": encoder, "encoder_kwargs": json.dumps(encoder_kwargs or {}, sort_keys=True),
            "feature_dtype": feature_dtype, "checkpoint_sha256": "imported", "patch_size": int(patch_size),
            "target_mpp": float(target_mpp), "level0_mpp": m0, "level0_size": int(level0_size),
            "slide_path": str(slide_path), "slide_id": slide_id, "feature_dim": int(dim), "source": "import",
            "modaltune_version": __version__, "tiles_per_s": 0.0, "wall_s": 0.0}
    if src_h5 is None:
        error = (f"no imported features file for slide {slide_id} in embedding.import_dir (looked for "
                 f"{slide_id}.h5); embed this slide or drop it from the sheet")
        return _write(out_h5, np.zeros((0, dim), feature_dtype), np.zeros((0, 2), np.int64),
                      np.zeros((0, 2), np.int64), dict(base, status="failed", error=error, n_tiles=0,
                                                        import_path="", import_sha256="", import_format=""))
    sha = file_sha256(src_h5)
    keys = ("encoder", "encoder_kwargs", "feature_dtype", "patch_size", "target_mpp", "level0_mpp", "slide_path")
    if out_h5.exists() and _stale_reason(out_h5, {**{k: base[k] for k in keys}, "import_sha256": sha}) is None:
        log.info("features %s: imported from the same file already; skipped", out_h5)
        with h5py.File(out_h5, "r") as f:
            a = {k: attr_value(v) for k, v in f.attrs.items()}
        return {"status": "skipped", "stored_status": a.get("status"), "out_h5": str(out_h5), "slide": slide_id,
                "encoder": encoder, "n_tiles": int(a.get("n_rows", 0)), "tiles_per_s": 0.0, "wall_s": 0.0,
                "error": a.get("error", "")}
    ext = read_external(src_h5, import_format)
    path = ext["path"]
    feats = ext["features"]
    if feats.ndim != 2:
        raise InputError(f"imported features {path}: features have shape {feats.shape}, expected (N, D) patch "
                         "features (a 1-D array is a slide embedding; import patch features instead)")
    if feats.shape[1] != dim:
        raise InputError(f"imported features {path}: feature dimension {feats.shape[1]} but encoder {encoder!r} "
                         f"(config embedding.encoder) gives {dim}; import features of that encoder or set "
                         "embedding.encoder to the one that made them")
    if len(feats) != len(ext["coords"]):
        raise InputError(f"imported features {path}: {len(feats)} feature rows but {len(ext['coords'])} coords")
    if not np.isfinite(feats).all():
        raise InputError(f"imported features {path}: features hold NaN/inf; re-export the file")
    src = ext["source_encoder"]
    if src and not _same_encoder(encoder, src):
        log.warning("imported features %s were made by %r, config embedding.encoder is %r", path, src, encoder)
    coords, geo = to_level0(ext, m0, downsamples)
    _check_geometry(path, coords, geo, ext, w0=w0, h0=h0, m0=m0, level0_size=level0_size,
                    patch_size=patch_size, target_mpp=target_mpp)
    coords_t = np.round(coords * (m0 / target_mpp)).astype(np.int64)  # as tiling.tile_slide
    attrs = dict(base, status="ok", error="", n_tiles=len(coords), import_path=os.path.abspath(path),
                 import_sha256=sha, import_format=ext["format"],
                 import_source_encoder=src or "", import_coords_unit=geo["unit"],
                 import_coords_attrs=json.dumps(ext["coords_attrs"], sort_keys=True, default=str))
    return _write(out_h5, feats.astype(feature_dtype, copy=False), coords, coords_t, attrs)


def _check_geometry(path, coords, geo, ext, *, w0, h0, m0, level0_size, patch_size, target_mpp) -> None:
    ca = ext["coords_attrs"]
    fix = ("set tiling.patch_size / tiling.target_mpp to the geometry the features were made with, or "
           "re-embed the slide")
    if "level0_width" in ca and "level0_height" in ca and (int(ca["level0_width"]), int(ca["level0_height"])) \
            != (int(w0), int(h0)):
        raise InputError(f"imported features {path}: coords attrs say a level-0 size of {ca['level0_width']} x "
                         f"{ca['level0_height']} px but the slide is {w0} x {h0}; the file belongs to another "
                         "slide or scan (check the slide ids / embedding.import_dir)")
    fp0 = geo["footprint0"]
    if fp0 is not None and not math.isclose(fp0, level0_size, rel_tol=GEOMETRY_RTOL):
        raise InputError(f"imported features {path}: a patch covers {fp0:g} level-0 px ({fp0 * m0:.1f} um) but "
                         f"the config asks {patch_size} px at {target_mpp} um/px = {level0_size} level-0 px "
                         f"({patch_size * target_mpp:.1f} um); {fix}")
    px = geo["patch_px"]
    if px is not None and ext["format"] == "trident" and px != patch_size:
        raise InputError(f"imported features {path}: patch_size attr {px} px but config tiling.patch_size is "
                         f"{patch_size}; {fix}")
    if len(coords) == 0:
        return
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    if lo.min() < 0 or hi[0] >= w0 or hi[1] >= h0:
        raise InputError(f"imported features {path}: patch corners reach ({int(hi[0])}, {int(hi[1])}) / "
                         f"({int(lo[0])}, {int(lo[1])}) level-0 px, outside the slide ({w0} x {h0} px at "
                         f"{m0:g} um/px); the coordinates are not level-0 pixels of this slide (wrong slide, "
                         "wrong import_format, or a wrong mpp in the sheet)")
    stride = _grid_stride(coords[:, 0]) or _grid_stride(coords[:, 1])
    overlap = int(ca.get("overlap", 0) or 0)
    if stride is not None and overlap == 0 and abs(level0_size - patch_size) > GEOMETRY_RTOL * level0_size \
            and math.isclose(stride, patch_size, rel_tol=GEOMETRY_RTOL) \
            and not math.isclose(stride, level0_size, rel_tol=GEOMETRY_RTOL):
        raise InputError(f"imported features {path}: coordinates step by {stride:g} px = the patch size at "
                         f"{target_mpp} um/px, not its level-0 footprint ({level0_size} px): they look like "
                         "target-mpp pixels; export level-0 coordinates (TRIDENT/CLAM write level-0)")


def _write(out_h5: Path, feats, coords, coords_t, attrs: dict) -> dict:
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        n, d = feats.shape
        f.create_dataset("features", data=feats, chunks=(max(1, min(n, 1024)), d) if n else None)
        f.create_dataset("coords", data=coords.reshape(-1, 2).astype(np.int64))
        f.create_dataset("coords_target", data=coords_t.reshape(-1, 2).astype(np.int64))
        attrs = dict(attrs, n_rows=int(n))
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["complete"] = True
    log.info("features %s: imported %d rows (%s)", out_h5, attrs["n_rows"], attrs.get("import_path") or "failed")
    return {"status": attrs["status"], "out_h5": str(out_h5), "slide": attrs["slide_id"],
            "encoder": attrs["encoder"], "n_tiles": attrs["n_rows"], "tiles_per_s": 0.0, "wall_s": 0.0,
            "error": attrs["error"]}


def slide_features(out_h5: str | os.PathLike, embedding: dict, *, tiles_h5: str | None = None,
                   imported: str | None = None, slide_path: str | None = None, slide_id: str | None = None,
                   mpp: float | None = None, tiling: dict | None = None) -> dict:
    """The embed stage of one slide: embed its tiles (``source: embed``) or import a file (``import``)."""
    emb = dict(embedding)
    source = emb.pop("source", IMPORT_DEFAULTS["source"])
    emb.pop("import_dir", None)
    fmt = emb.pop("import_format", IMPORT_DEFAULTS["import_format"])
    # set by the workflow in import mode (rules/slides.smk): the sheet's mpp override, the patch geometry
    mpp = emb.pop("import_mpp", mpp)
    tiling = emb.pop("import_tiling", tiling)
    if source == "embed":
        if tiles_h5 is None:
            raise InputError(f"features {out_h5}: embedding.source is 'embed' but no tiles file was given")
        return embed_slide(tiles_h5, out_h5, **emb)
    if source != "import":
        raise InputError(f"config embedding.source {source!r} must be 'embed' or 'import'")
    if slide_path is None:
        raise InputError(f"features {out_h5}: importing needs the slide file (coordinates are checked on it)")
    tiling = tiling or {}
    return import_slide_features(imported, out_h5, slide_path=slide_path, slide_id=slide_id, mpp_override=mpp,
                                 encoder=emb["encoder"], encoder_kwargs=emb.get("encoder_kwargs") or {},
                                 import_format=fmt, feature_dtype=emb.get("feature_dtype", "float32"),
                                 patch_size=int(tiling.get("patch_size", 256)),
                                 target_mpp=float(tiling.get("target_mpp", 0.5)))


__all__ = ["FORMATS", "IMPORT_DEFAULTS", "IMPORT_KEYS", "check_import_dir", "detect_format", "find_import_file",
           "import_slide_features", "read_external", "slide_features", "to_level0"]
