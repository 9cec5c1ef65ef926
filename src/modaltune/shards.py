"""Several slides per cluster job: tile + embed a shard of slides into the usual per-slide files.

The per-slide files are exactly those of the per-slide rules (same functions, same resume rules),
so a shard job that is rerun recomputes only slides whose outputs are missing or stale, and a
single slide can still be rebuilt with its per-slide target.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from modaltune.io_utils import atomic_path

log = logging.getLogger(__name__)


def run_shard(slides: list[dict], manifest: str, *, tiles_dir: str, features_dir: str,
              tiling: dict, embedding: dict) -> pd.DataFrame:
    """Process ``slides`` (dicts with slide_id, path, mpp) and write a manifest TSV
    (slide_id, tiles_h5, features_h5, status, error)."""
    from modaltune.feature_import import find_import_file, slide_features
    from modaltune.tiling import tile_slide

    importing = embedding.get("source", "embed") == "import"
    rows = []
    for rec in slides:
        sid = rec["slide_id"]
        tiles_h5 = Path(tiles_dir) / f"{sid}.h5"
        feats_h5 = Path(features_dir) / f"{sid}.h5"
        mpp = rec.get("mpp")
        mpp = None if mpp is None or (isinstance(mpp, float) and math.isnan(mpp)) else float(mpp)
        if importing:  # existing TRIDENT/CLAM/STAMP features: no tiling, no embedding
            src = find_import_file(embedding["import_dir"], sid, rec["path"])
            out = slide_features(str(feats_h5), embedding, imported=src and str(src), slide_path=rec["path"],
                                 slide_id=sid, mpp=mpp, tiling=tiling)
        else:
            # The QC png is written before the tiles HDF5, but a png lost after an earlier failure (disk
            # full) must still be redone: it is not an output the manifest check would notice.
            qc_png = tiles_h5.with_suffix(".png")
            if not (tiles_current(tiles_h5, tiling) and qc_png.is_file()):
                tile_slide(rec["path"], str(tiles_h5), slide_id=sid, mpp_override=mpp, qc_png=str(qc_png),
                           **tiling)
            out = slide_features(str(feats_h5), embedding, tiles_h5=str(tiles_h5))
        # a slide skipped on resume reports what its stored record says (ok or failed)
        status = out.get("stored_status", out.get("status", "ok")) if out.get("status") == "skipped" else out.get("status", "ok")
        log.info("slide %s: %s", sid, status)
        rows.append({"slide_id": sid, "tiles_h5": str(tiles_h5), "features_h5": str(feats_h5),
                     "status": status, "error": out.get("error", "")})
    table = pd.DataFrame(rows, columns=["slide_id", "tiles_h5", "features_h5", "status", "error"])
    with atomic_path(manifest) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    return table


def tiles_current(tiles_h5: Path, tiling: dict) -> bool:
    """True when ``tiles_h5`` is complete and was made with these tiling parameters."""
    import h5py

    if not tiles_h5.exists():
        return False
    try:
        with h5py.File(tiles_h5, "r") as f:
            attrs = dict(f.attrs)
    except OSError:
        return False
    for key, value in tiling.items():
        if key in attrs and key != "on_error" and attrs[key] != value:
            log.info("%s: tiling parameter %s changed (%r -> %r): re-tiling", tiles_h5, key, attrs[key], value)
            return False
    return True


def expand_feature_inputs(paths: list[str]) -> list[str]:
    """Feature HDF5 paths from a mix of per-slide files and shard manifests (``.tsv``)."""
    out: list[str] = []
    for p in paths:
        if str(p).endswith(".tsv"):
            out += pd.read_csv(p, sep="\t")["features_h5"].tolist()
        else:
            out.append(str(p))
    return out
