"""Embedding benchmarks (results in benchmarks/results/embedding.md).

(a) ``ratio``: end-to-end tiles/s of ``embed_slide`` (tiles read from a real pyramidal TIFF through
    ``modaltune.tiling.TileReader``, DataLoader workers, model, HDF5 writes) divided by forward-only
    tiles/s of the same encoder on preloaded tensors. Runs alternate (forward, end-to-end) ``--repeats``
    times and the median of the per-pair ratios is printed, so load drifts on a shared machine cancel.
    Target >= 0.90.
(b) ``memory``: peak RSS of a fresh process embedding a synthetic source of ``--big`` tiles divided by
    that of ``--small`` tiles. Features are 1536-d, so holding them in memory would cost ~0.6 GB at
    100k tiles and show up clearly. Target <= 1.2.

    python benchmarks/bench_embedding.py ratio  [--device cpu] [--tiles 256] [--workers 1]
    python benchmarks/bench_embedding.py memory [--small 10000 --big 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return (f"{platform.node()} {os.cpu_count()} cores, {dev}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}, "
            f"loadavg {os.getloadavg()[0]:.1f}")


# ----------------------------------------------------------------------------------------- (a) ratio
def make_slide_tiles(work: Path, n_tiles: int, patch: int) -> str:
    """A textured pyramidal TIFF (0.5 mpp, tissue everywhere) tiled at ``patch`` px / 0.5 mpp."""
    from modaltune.demo import write_pyramid_tiff
    from modaltune.tiling import tile_slide

    side = int(np.ceil(np.sqrt(n_tiles))) * patch
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    base = np.stack([150 + 40 * np.sin(xx / 37.0), 80 + 30 * np.cos(yy / 23.0), 170 + 20 * np.sin((xx + yy) / 51.0)],
                    axis=-1)
    rgb = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    slide = work / "bench_slide.tiff"
    write_pyramid_tiff(slide, rgb, mpp=0.5)
    tiles = work / "bench_tiles.h5"
    res = tile_slide(str(slide), str(tiles), patch_size=patch, target_mpp=0.5, min_tissue=0.0,
                     tissue_method="lab", on_error="raise")
    if res["n_tiles"] < n_tiles // 2:
        raise SystemExit(f"only {res['n_tiles']} tiles found on the benchmark slide")
    return str(tiles)


def forward_only(enc, device, n_tiles: int, batch_size: int, precision: str) -> float:
    import torch

    from modaltune.embedding import _autocast_dtype

    amp = _autocast_dtype(precision, device)
    model, normalize = enc.model.to(device), enc.normalize.to(device)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (batch_size, 3, enc.input_size, enc.input_size), dtype=torch.uint8,
                          generator=gen).to(device)
    n_batches = max(1, n_tiles // batch_size)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        model(normalize(batch[:2]))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            out = model(normalize(batch))
            out.float().cpu()  # the end-to-end loop also brings features back every batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return n_batches * batch_size / wall


def bench_ratio(args) -> None:
    import torch

    from modaltune.embedding import embed_slide, pick_device
    from modaltune.encoders import build_encoder

    torch.manual_seed(0)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiles = make_slide_tiles(work, args.tiles, args.patch)
        with h5py.File(tiles, "r") as f:
            n = int(f.attrs["n_tiles"])
        enc = build_encoder(args.encoder)
        ratios = []
        for r in range(args.repeats):
            fwd = forward_only(enc, device, n, args.batch_size, args.precision)
            out = work / f"feat_{r}.h5"
            res = embed_slide(tiles, out, encoder=args.encoder, batch_size=args.batch_size,
                              num_workers=args.workers, device=str(device), precision=args.precision,
                              progress=False)
            ratios.append(res["tiles_per_s"] / fwd)
            print(f"  repeat {r}: forward-only {fwd:.1f} tiles/s, end-to-end {res['tiles_per_s']:.1f} tiles/s "
                  f"({n} tiles), ratio {ratios[-1]:.3f}", flush=True)
    print(f"machine: {machine()}")
    print(f"encoder {args.encoder}, batch {args.batch_size}, workers {args.workers}, tiles {n} x {args.patch}px")
    print(f"RESULT end-to-end / forward-only = {statistics.median(ratios):.3f} (median of {len(ratios)}; "
          f"target >= 0.90)")


# ---------------------------------------------------------------------------------------- (b) memory
class SyntheticTiles:
    """TileReader-compatible and fast: tiles are views into a small pool of random images."""

    def __init__(self, n: int, patch: int):
        self.n = n
        self.pool = np.random.default_rng(0).integers(0, 256, (16, patch, patch, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return self.pool[i % 16]


def synthetic_factory(n: int, patch: int):
    return lambda _path: SyntheticTiles(n, patch)


def write_fake_tiles_h5(path: Path, n: int, patch: int) -> None:
    with h5py.File(path, "w") as f:
        coords = np.stack([np.arange(n) % 1000, np.arange(n) // 1000], axis=1).astype(np.int64) * patch
        f["coords"] = coords
        f["coords_target"] = coords
        f["tissue_fraction"] = np.ones(n, np.float32)
        f.attrs.update(slide_path="synthetic", slide_id=f"synthetic_{n}", patch_size=patch, target_mpp=0.5,
                       level0_mpp=0.5, read_level=0, read_size=patch, level0_size=patch, tissue_method="none",
                       min_tissue=0.0, n_tiles=n, status="ok", error="", modaltune_version="bench")


def memory_child(n: int, patch: int, dim: int, workers: int) -> None:
    from modaltune.embedding import embed_slide

    with tempfile.TemporaryDirectory() as tmp:
        tiles = Path(tmp) / "tiles.h5"
        write_fake_tiles_h5(tiles, n, patch)
        res = embed_slide(tiles, Path(tmp) / "feat.h5", encoder="tiny",
                          encoder_kwargs={"img_size": patch, "dim": dim}, batch_size=256, num_workers=workers,
                          device="cpu", progress=False, reader_factory=synthetic_factory(n, patch))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"n": n, "peak_rss": peak, "children_peak_rss": kids, "tiles_per_s": res["tiles_per_s"],
                      "wall_s": res["wall_s"]}))


def bench_memory(args) -> None:
    results = {}
    for n in (args.small, args.big):
        cmd = [sys.executable, __file__, "_memory_child", "--n", str(n), "--patch", str(args.patch),
               "--dim", str(args.dim), "--workers", str(args.workers)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[n] = json.loads(out)
        r = results[n]
        print(f"  {n:>7} tiles: peak RSS {r['peak_rss'] / 2**20:.0f} MiB (workers' peak "
              f"{r['children_peak_rss'] / 2**20:.0f} MiB), {r['tiles_per_s']:.0f} tiles/s, {r['wall_s']:.0f} s",
              flush=True)
    ratio = results[args.big]["peak_rss"] / results[args.small]["peak_rss"]
    print(f"machine: {machine()}")
    print(f"encoder tiny dim {args.dim}, {args.patch}px tiles, batch 256, workers {args.workers}; features held "
          f"in memory would be {args.big * args.dim * 4 / 2**20:.0f} MiB at {args.big} tiles")
    print(f"RESULT peak RSS {args.big} tiles / {args.small} tiles = {ratio:.3f} (target <= 1.2)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ratio")
    a.add_argument("--encoder", default="vit-small")
    a.add_argument("--device", default="cpu")
    a.add_argument("--precision", default="auto")
    a.add_argument("--tiles", type=int, default=256)
    a.add_argument("--patch", type=int, default=224)
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--workers", type=int, default=1)
    a.add_argument("--repeats", type=int, default=3)
    m = sub.add_parser("memory")
    m.add_argument("--small", type=int, default=10_000)
    m.add_argument("--big", type=int, default=100_000)
    m.add_argument("--patch", type=int, default=32)
    m.add_argument("--dim", type=int, default=1536)
    m.add_argument("--workers", type=int, default=2)
    c = sub.add_parser("_memory_child")
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--patch", type=int, required=True)
    c.add_argument("--dim", type=int, required=True)
    c.add_argument("--workers", type=int, required=True)
    args = p.parse_args()
    if args.cmd == "ratio":
        bench_ratio(args)
    elif args.cmd == "memory":
        bench_memory(args)
    else:
        memory_child(args.n, args.patch, args.dim, args.workers)


if __name__ == "__main__":
    main()
