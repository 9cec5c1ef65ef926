"""Tiling benchmark: tissue mask + grid + reading every tile as an RGB array, per tool, same slides.

Tools (256 px at 0.5 um/px, keep a patch when >= 95 % tissue, i.e. <= 5 % background):
  ours        modaltune.tiling.tile_slide + iter_tile_batches with --workers reader threads
  ours-1      the same with one reader (this process)
  openslide   our coordinates, then plain OpenSlide in one thread: read_region at level 0 of the
              level-0 footprint, drop alpha, resize to 256 px (what a naive loop does)
  lazyslide   find_tissues + tile_tissues(mpp=0.5, background_fraction=0.05) + iter.tile_images
  tiatoolbox  SlidingWindowPatchExtractor(resolution=0.5 mpp, input_mask="otsu", min_mask_ratio=0.95)
lazyslide and tiatoolbox run with the interpreters of their own virtual environments (they pin
conflicting packages): --venvs DIR/{lazyslide,tiatoolbox}/bin/python. Each measurement is a fresh child
process; time excludes imports and includes everything from opening the slide to the last tile array.
CPU s = user + system time of the child and its reaped children over the same span (less sensitive
than wall time to other load on a shared machine). Peak RSS = the largest sum of RSS over the child's process tree (sampled every 20 ms; forked readers'
shared pages count once per process, which overstates ours).

Example:
  python benchmarks/bench_tiling.py --synthetic-size 20000 --repeats 2 \
      --markdown benchmarks/results/tiling.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATCH, MPP, MIN_TISSUE = 256, 0.5, 0.95
BACKEND = os.environ.get("BENCH_READER_BACKEND", "thread")
TOOLS = ("ours", "ours-1", "openslide", "lazyslide", "tiatoolbox")


# ------------------------------------------------------------------ slides

def synthetic_slide(path: Path, size: int, seed: int = 0) -> Path:
    """A demo-like slide: size x size px at 0.25 um/px, a few irregular tissue blobs with H&E-like
    colour fields, fine texture and white glass, written with modaltune.demo.write_pyramid_tiff."""
    if path.exists():
        return path
    import numpy as np
    from PIL import Image

    from modaltune.demo import write_pyramid_tiff

    rng = np.random.default_rng(seed)
    lo = 1024  # fields drawn at low resolution, then upsampled (smooth shapes need no fine grid)
    yy, xx = np.mgrid[0:lo, 0:lo].astype(np.float32) / lo
    q = np.full((lo, lo), np.inf, np.float32)
    for _ in range(4):
        cx, cy, a = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.12, 0.25)
        b, th = a * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / a
        v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / b
        q = np.minimum(q, np.sqrt(u * u + v * v))
    tissue = (q < 1).astype(np.float32)
    hema = rng.uniform(0, 1, (lo // 16, lo // 16)).astype(np.float32)

    def up(field: np.ndarray, rows: slice) -> np.ndarray:
        img = Image.fromarray(field, mode="F").resize((size, size), Image.BILINEAR)
        return np.asarray(img)[rows]

    rgb = np.empty((size, size, 3), np.uint8)
    step = 2048
    t_full, h_full = up(tissue, slice(None)), up(hema, slice(None))
    for y0 in range(0, size, step):
        rows = slice(y0, min(size, y0 + step))
        t, h = t_full[rows], h_full[rows]
        noise = rng.normal(0, 12, (t.shape[0], size, 3)).astype(np.float32)
        pink = np.array([215, 120, 180], np.float32) - h[..., None] * np.array([90, 70, 10], np.float32)
        glass = np.float32(243)
        px = glass * (1 - t[..., None]) + pink * t[..., None] + noise * t[..., None]
        rgb[rows] = np.clip(px, 0, 255).astype(np.uint8)
    del t_full, h_full
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramid_tiff(str(path), rgb, 0.25)
    return path


def cmu_slide() -> Path:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest_slides import cmu_small_region

    return cmu_small_region()


# ------------------------------------------------------------------ one measurement (child process)

def run_ours(slide: str, workers: int) -> tuple[int, float]:
    from modaltune.tiling import iter_tile_batches, tile_slide

    with tempfile.TemporaryDirectory() as d:
        h5 = os.path.join(d, "t.h5")
        res = tile_slide(slide, h5, patch_size=PATCH, target_mpp=MPP, min_tissue=MIN_TISSUE, on_error="raise")
        total = 0.0
        for _, batch in iter_tile_batches(h5, batch_size=32, workers=workers, backend=BACKEND):
            total += float(batch[:, ::64, ::64].sum())  # touch every tile
        return res["n_tiles"], total


def run_openslide(slide: str) -> tuple[int, float]:
    import numpy as np
    import openslide

    from modaltune.tiling import read_tiles_attrs, tile_slide

    with tempfile.TemporaryDirectory() as d:
        h5 = os.path.join(d, "t.h5")
        tile_slide(slide, h5, patch_size=PATCH, target_mpp=MPP, min_tissue=MIN_TISSUE, on_error="raise")
        coords, _, attrs = read_tiles_attrs(h5)
    size0 = int(attrs["level0_size"])
    total = 0.0
    with openslide.OpenSlide(slide) as s:
        for x, y in coords:
            im = s.read_region((int(x), int(y)), 0, (size0, size0)).convert("RGB").resize((PATCH, PATCH))
            total += float(np.asarray(im)[::64, ::64].sum())
    return len(coords), total


def run_lazyslide(slide: str) -> tuple[int, float]:
    import lazyslide as zs

    wsi = zs.open_wsi(slide, store=tempfile.mkdtemp() + "/s.zarr")
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, PATCH, mpp=MPP, background_fraction=1 - MIN_TISSUE)
    total, n = 0.0, 0
    for t in wsi.iter.tile_images("tiles"):
        total += float(t.image[::64, ::64].sum())
        n += 1
    return n, total


def run_tiatoolbox(slide: str) -> tuple[int, float]:
    from tiatoolbox.tools.patchextraction import get_patch_extractor

    ext = get_patch_extractor("slidingwindow", input_img=slide, input_mask="otsu", patch_size=(PATCH, PATCH),
                              resolution=MPP, units="mpp", min_mask_ratio=MIN_TISSUE, within_bound=True)
    total, n = 0.0, 0
    for patch in ext:
        total += float(patch[::64, ::64].sum())
        n += 1
    return n, total


def child(tool: str, slide: str, workers: int) -> None:
    # import the tool's modules before the clock starts
    if tool in ("ours", "ours-1", "openslide"):
        # modaltune imports these lazily (CPU rules stay light); load them now like the peers' imports
        import h5py  # noqa: F401
        import PIL.Image  # noqa: F401
        import scipy.ndimage  # noqa: F401
        import skimage.color  # noqa: F401
        import skimage.filters  # noqa: F401
        import skimage.morphology  # noqa: F401

        import modaltune.tiling  # noqa: F401
    elif tool == "lazyslide":
        import lazyslide  # noqa: F401
    elif tool == "tiatoolbox":
        import tiatoolbox.tools.patchextraction  # noqa: F401
    import resource

    def cpu_s() -> float:
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    c0, t0 = cpu_s(), time.perf_counter()
    if tool == "ours":
        n, total = run_ours(slide, workers)
    elif tool == "ours-1":
        n, total = run_ours(slide, 1)
    elif tool == "openslide":
        n, total = run_openslide(slide)
    elif tool == "lazyslide":
        n, total = run_lazyslide(slide)
    else:
        n, total = run_tiatoolbox(slide)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    print("RESULT " + json.dumps({"tool": tool, "n_tiles": n, "wall_s": wall, "cpu_s": cpu, "checksum": total}))


# ------------------------------------------------------------------ harness

def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    rss = 0
    for q in procs:
        try:
            rss += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return rss


def measure(tool: str, slide: Path, python: str, workers: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [python, str(Path(__file__).resolve()), "--child", tool, "--slide", str(slide), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.02)
    out, err = proc.communicate()
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"tool": tool, "error": (err or out).strip().splitlines()[-1:] or ["no output"]}
    res = json.loads(line[7:])
    res["peak_rss_gb"] = peak / 1e9
    res["tiles_per_s"] = res["n_tiles"] / res["wall_s"]
    res["tiles_per_cpu_s"] = res["n_tiles"] / max(res["cpu_s"], 1e-9)
    return res


def tool_python(tool: str, venvs: Path) -> str | None:
    if tool in ("lazyslide", "tiatoolbox"):
        py = venvs / tool / "bin" / "python"
        return str(py) if py.exists() else None
    return sys.executable


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    ap.add_argument("--slides", default="cmu,synthetic", help="cmu, synthetic and/or paths to slide files")
    ap.add_argument("--synthetic-size", type=int, default=20000, help="level-0 side of the synthetic slide (px)")
    ap.add_argument("--workers", type=int, default=2, help="reader processes for 'ours'")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool and slide; the fastest is reported")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="cache for synthetic slides")
    ap.add_argument("--venvs", type=Path, default=HERE / "out" / "venvs", help="folder with lazyslide/, tiatoolbox/")
    ap.add_argument("--markdown", type=Path, default=None, help="append a results table to this file")
    ap.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    ap.add_argument("--slide", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.slide, args.workers)
        return

    slides = []
    for s in args.slides.split(","):
        if s == "cmu":
            slides.append(("CMU-1-Small-Region (2220x2967, 0.499 um/px)", cmu_slide()))
        elif s == "synthetic":
            n = args.synthetic_size
            slides.append((f"synthetic {n}x{n} @ 0.25 um/px",
                           synthetic_slide(args.out / f"synthetic_{n}.tif", n)))
        else:
            slides.append((Path(s).name, Path(s)))
    rows = []
    for label, slide in slides:
        for tool in args.tools.split(","):
            py = tool_python(tool, args.venvs)
            if py is None:
                res = {"tool": tool, "error": [f"no venv at {args.venvs / tool}"]}
            else:
                runs = [measure(tool, slide, py, args.workers) for _ in range(args.repeats)]
                ok = [r for r in runs if "error" not in r]
                res = max(ok, key=lambda r: r["tiles_per_s"]) if ok else runs[-1]
            res["slide"] = label
            rows.append(res)
            if "error" in res:
                print(f"{label} | {tool}: FAILED {res['error']}", flush=True)
            else:
                print(f"{label} | {tool}: {res['tiles_per_s']:.0f} tiles/s, {res['tiles_per_cpu_s']:.0f} tiles/CPU-s, "
                      f"{res['n_tiles']} tiles, {res['wall_s']:.2f} s, peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)
    if args.markdown:
        write_markdown(args.markdown, rows, args, argv)


def write_markdown(path: Path, rows: list[dict], args, argv) -> None:
    load = os.getloadavg()
    lines = [
        f"\n### Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"Command: `python benchmarks/bench_tiling.py {' '.join(argv or sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)  ",
        f"Best of {args.repeats} run(s) per tool; ours with {args.workers} reader {BACKEND}s.",
        "",
        "| slide | tool | tiles | tiles/s (wall) | tiles per CPU-s | wall s | CPU s | peak RSS GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['slide']} | {r['tool']} | failed: {' '.join(r['error'])[:120]} | | | | | |")
        else:
            lines.append(f"| {r['slide']} | {r['tool']} | {r['n_tiles']} | {r['tiles_per_s']:.0f} | "
                         f"{r['tiles_per_cpu_s']:.0f} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_gb']:.2f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
