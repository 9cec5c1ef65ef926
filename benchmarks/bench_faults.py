"""Fault injection: SIGKILL the embedding and the training jobs at random points, rerun, compare.

For each stage one uninterrupted reference run is made in a subprocess. Then each trial starts the same
package call in a fresh subprocess (forked from the bench with torch imported), kills it with SIGKILL
after a random delay drawn uniformly over the reference run's wall time (seeded), and checks:

- corrupt: a file under a final output name that is unreadable, not marked complete, or differs from the
  reference (an output that looks complete but is partial); ``.resume.pt`` must always load;
- after a rerun of the same call (no kill): it exits 0, leaves no ``.<name>.*.part*`` temporary behind
  (the killed job's orphans included), and its outputs equal the reference: features, coords and attrs
  (timings aside) for embedding; ``state.pt`` tensors, ``history.parquet`` (seconds aside) and
  ``metrics.json`` for training + evaluation.

    python benchmarks/bench_faults.py [--trials 50] [--seed 0] [--stage both|embed|train] [--workdir DIR]

``--trials`` is the number of real kills per stage (a job that finished before its random delay is
checked too but does not count). Prints one table row per stage: kills, runs, runs that left an orphaned
temporary after the kill, corrupt outputs, orphans left after the rerun, reruns failed, reruns identical
to the reference. Exit status 1 when any corrupt output,
leftover orphan, failed rerun or difference is found. Runs on CPU (a tiny encoder and a tiny model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
PART = re.compile(r"^\..*\.part(\..*)?$")
TIMING_ATTRS = ("tiles_per_s", "wall_s", "model_load_s")
PATCH, N_PATIENTS, D, N_PATCH = 64, 24, 16, 30


# ------------------------------------------------------------------------------------------- fixtures
def make_slide(root: Path) -> dict:
    """A synthetic 0.5 um/px pyramid with a tissue rectangle, tiled at 64 px (324 tiles)."""
    from modaltune.demo import write_pyramid_tiff
    from modaltune.tiling import tile_slide

    rng = np.random.default_rng(0)
    img = np.full((1536, 1536, 3), 245, np.uint8)
    tissue = rng.integers(-20, 21, size=(1152, 1152, 3)) + np.array([200, 110, 170])
    img[192:1344, 192:1344] = np.clip(tissue, 0, 255).astype(np.uint8)
    slide = root / "slide.tif"
    write_pyramid_tiff(str(slide), img, 0.5)
    tiles = root / "tiles" / "S1.h5"
    tile_slide(str(slide), str(tiles), slide_id="S1", patch_size=PATCH, target_mpp=0.5, min_tissue=0.5,
               tissue_method="otsu")
    return {"slide": str(slide), "tiles": str(tiles)}


def make_cohort(root: Path, seed: int = 0, dim: int = D) -> dict:
    """Cases, one split, pathways, one features file per patient (planted label signal), a sheet."""
    from modaltune.genomics import GROUPS_KEY

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"P{i:03d}" for i in range(N_PATIENTS)]
    label = np.arange(N_PATIENTS) % 2
    cases = pd.DataFrame({
        "patient_id": ids, "case_id": ids, "project_id": "TCGA-FLT", "site": "FLT",
        "primary_diagnosis": np.where(label == 1, "lobular carcinoma", "infiltrating duct carcinoma"),
        "label": label, "survival_months": rng.exponential(30, N_PATIENTS) + 1,
        "event": (rng.random(N_PATIENTS) < 0.7).astype(int), "stage": "II", "t": "T2", "n": "N0", "m": "M0",
        "age": rng.normal(60, 8, N_PATIENTS), "has_rna": True, "n_slides": 1})
    cases.to_parquet(root / "cases.parquet", index=False)
    part = np.array(["test"] * 5 + ["val"] * 5 + ["train"] * (N_PATIENTS - 10))[rng.permutation(N_PATIENTS)]
    pd.DataFrame({"patient_id": ids, "fold": 0, "partition": part, "site": "FLT"}).to_parquet(
        root / "splits.parquet", index=False)
    genes = [f"G{k}" for k in range(12)]
    gx = pd.DataFrame(rng.normal(5, 1, (N_PATIENTS, 12)).astype(np.float32), columns=genes,
                      index=pd.Index(ids, name="patient_id"))
    gx["sample_id"] = [f"{p}-01" for p in ids]
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(gx, preserve_index=True)
    groups = {"PW0": genes[:6], "PW1": genes[6:]}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), GROUPS_KEY: json.dumps(groups).encode()})
    pq.write_table(table, root / "pathways.parquet")
    files, sheet = [], []
    for i, p in enumerate(ids):
        f = root / "features" / f"{p}-DX1.h5"
        f.parent.mkdir(parents=True, exist_ok=True)
        feats = rng.normal(0, 1, (N_PATCH, dim)).astype(np.float32)
        feats[:, :4] += label[i]
        grid = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2) * 256
        with h5py.File(f, "w") as h5:
            h5["features"] = feats
            h5["coords"] = (grid * 2).astype(np.int64)
            h5["coords_target"] = grid.astype(np.int64)
            h5.attrs.update(status="ok", error="", feature_dim=dim, encoder="tiny", complete=True,
                            level0_mpp=0.25, target_mpp=0.5, patch_size=256)
        files.append(str(f))
        sheet.append({"slide_id": f"{p}-DX1", "patient_id": p, "path": f"/slides/{p}-DX1.tiff"})
    pd.DataFrame(sheet).to_csv(root / "sheet.tsv", sep="\t", index=False)
    return {"cases_path": str(root / "cases.parquet"), "splits_path": str(root / "splits.parquet"),
            "pathways_path": str(root / "pathways.parquet"), "feature_files": files, "sheet": str(root / "sheet.tsv")}


# --------------------------------------------------------------------------------------------- jobs
# Jobs run in processes forked from this one (torch and the package already imported, one thread), so a
# trial costs the job's own work, not an interpreter start; SIGKILL hits the job as a scheduler would.
def embed_job(tiles: str, out: str) -> None:
    from modaltune.embedding import embed_slide

    embed_slide(tiles, out, encoder="tiny", encoder_kwargs={"img_size": PATCH}, batch_size=8, num_workers=0,
                progress=False)


MODEL_CFG = {"arch": "abmil", "objective": "classification", "hidden": 16, "attn_dim": 8, "dropout": 0.1}
TRAIN_CFG = {"epochs": 6, "warmup_epochs": 1, "lr": 3e-3, "max_patches": 20, "device": "cpu"}


def train_job(cohort: dict, run_dir: str) -> None:
    from modaltune.evaluation import evaluate_run
    from modaltune.training import train_run

    train_run(model_name="abmil", model_cfg=MODEL_CFG, train_cfg=TRAIN_CFG, fold=0, seed=0, text_h5=None,
              out_dir=run_dir, **cohort)
    evaluate_run(run_dir=run_dir, fold=0, out_metrics=f"{run_dir}/metrics.json",
                 out_embeddings=f"{run_dir}/embeddings.npz", **cohort)


def _child(fn, args) -> None:
    import logging

    logging.disable(logging.WARNING)  # trials print only the bench's own lines
    fn(*args)


def _prepare_parent() -> None:
    import torch

    torch.set_num_threads(1)
    import modaltune.embedding  # noqa: F401
    import modaltune.evaluation  # noqa: F401
    import modaltune.training  # noqa: F401
    from modaltune.encoders import encoder_class
    from modaltune.models.registry import build_model  # noqa: F401

    encoder_class("tiny")


def start(job):
    import multiprocessing as mp

    p = mp.get_context("fork").Process(target=_child, args=job, daemon=False)
    p.start()
    return p


def run_to_end(job) -> tuple[int, float]:
    t0 = time.perf_counter()
    p = start(job)
    p.join()
    return p.exitcode, time.perf_counter() - t0


def run_and_kill(job, delay: float) -> tuple[bool, float]:
    """Start, SIGKILL after ``delay`` s. (True when it was still running = a real kill, seconds elapsed)."""
    t0 = time.perf_counter()
    p = start(job)
    p.join(timeout=delay)
    if p.exitcode is not None:
        return False, time.perf_counter() - t0
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    return True, time.perf_counter() - t0


def parts(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if PART.match(p.name))


# ---------------------------------------------------------------------------------------- snapshots
def features_snapshot(path: Path) -> dict | None:
    """Arrays + attrs of a features file; raises when it cannot be read; None when absent."""
    if not path.exists():
        return None
    with h5py.File(path, "r") as f:
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()
                 if k not in TIMING_ATTRS}
        return {"attrs": attrs, **{k: f[k][()] for k in ("features", "coords", "coords_target")}}


def same_features(a: dict, b: dict) -> bool:
    return a["attrs"] == b["attrs"] and all(np.array_equal(a[k], b[k]) for k in ("features", "coords", "coords_target"))


def train_snapshot(run_dir: Path) -> dict:
    """Whatever final outputs exist; raises when one cannot be read (a partial file)."""
    import torch

    snap: dict = {}
    if (run_dir / ".resume.pt").exists():
        torch.load(run_dir / ".resume.pt", map_location="cpu", weights_only=False)  # must load whenever present
    if (run_dir / "state.pt").exists():
        s = torch.load(run_dir / "state.pt", map_location="cpu", weights_only=False)
        snap["state"] = {"best_epoch": s["best_epoch"], "trainable": {k: v.clone() for k, v in s["trainable"].items()}}
    if (run_dir / "history.parquet").exists():
        snap["history"] = pd.read_parquet(run_dir / "history.parquet").drop(columns="seconds")
    if (run_dir / "metrics.json").exists():
        snap["metrics"] = json.loads((run_dir / "metrics.json").read_text())
    if (run_dir / "embeddings.npz").exists():
        with np.load(run_dir / "embeddings.npz", allow_pickle=False) as z:
            snap["embeddings"] = {k: z[k] for k in z.files}
    return snap


def _same(a, b) -> bool:
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, pd.DataFrame):
        return isinstance(b, pd.DataFrame) and a.equals(b)
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


def same_train(a: dict, ref: dict) -> bool:
    """Each output present in ``a`` equals the reference's."""
    return all(k in ref and _same(a[k], ref[k]) for k in a)


# -------------------------------------------------------------------------------------------- stages
def bench_stage(stage: str, trials: int, seed: int, work: Path) -> dict:
    rng = np.random.default_rng(seed + (0 if stage == "embed" else 1))
    if stage == "embed":
        fx = make_slide(work / "slide")

        def code(d: Path):
            return embed_job, (fx["tiles"], str(d / "features" / "S1.h5"))

        def snap(d: Path):
            return features_snapshot(d / "features" / "S1.h5")

        def same(a, b) -> bool:
            return same_features(a, b)

        def complete(s) -> bool:
            return s is not None
    else:
        cohort = make_cohort(work / "cohort")

        def code(d: Path):
            return train_job, (cohort, str(d / "run"))

        def snap(d: Path):
            return train_snapshot(d / "run")

        def same(a, b) -> bool:
            return same_train(a, b)

        def complete(s) -> bool:
            return all(k in s for k in ("state", "history", "metrics", "embeddings"))

    ref_dir = work / f"{stage}_ref"
    rc, wall = run_to_end(code(ref_dir))
    if rc != 0:
        raise RuntimeError(f"{stage}: reference run failed (exit {rc}; traceback above)")
    ref = snap(ref_dir)
    if not complete(ref):
        raise RuntimeError(f"{stage}: reference run left incomplete outputs")
    out = {"stage": stage, "kills": 0, "runs": 0, "orphans_after_kill": 0, "corrupt": 0,
           "orphans_after_rerun": 0, "rerun_failed": 0, "identical": 0, "ref_wall_s": round(wall, 2)}
    # A trial counts when the SIGKILL hit a running job; a job that finished before its delay is still
    # checked (and rerun) but drawn again, so the table reports ``trials`` real kills.
    t, length = 0, wall
    while out["kills"] < trials and out["runs"] < 3 * trials:
        d = work / f"{stage}_{t:03d}"
        t += 1
        out["runs"] += 1
        delay = float(rng.uniform(0.0, length))
        killed, elapsed = run_and_kill(code(d), delay)
        out["kills"] += killed
        if not killed:  # it finished first: the machine got faster, draw later delays from its real length
            length = min(length, elapsed)
        out["orphans_after_kill"] += bool(parts(d)) if d.exists() else 0
        try:
            s = snap(d)
            if s is not None and not same(s, ref):
                out["corrupt"] += 1
        except Exception:  # unreadable final-name output = corrupt
            out["corrupt"] += 1
        rc, _ = run_to_end(code(d))
        if rc != 0:
            out["rerun_failed"] += 1
            print(f"{stage} run {t}: rerun failed (exit {rc})", file=sys.stderr)
            continue
        left = parts(d)
        if left:
            out["orphans_after_rerun"] += 1
            print(f"{stage} run {t}: left after rerun: {left}", file=sys.stderr)
        try:
            s = snap(d)
            out["identical"] += bool(complete(s) and same(s, ref) and same(ref, s))
        except Exception as e:
            print(f"{stage} run {t}: unreadable after rerun: {e}", file=sys.stderr)
    return out


def machine() -> str:
    return (f"{platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
            f"python {platform.python_version()}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}, "
            f"loadavg {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage", choices=["both", "embed", "train"], default="both")
    ap.add_argument("--workdir", default=None, help="kept for inspection (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    import tempfile

    stages = ["embed", "train"] if args.stage == "both" else [args.stage]
    with tempfile.TemporaryDirectory(prefix="bench_faults_") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        _prepare_parent()
        rows = [bench_stage(s, args.trials, args.seed, work) for s in stages]
    print(f"# bench_faults: {machine()}; seed {args.seed}; {time.perf_counter() - t0:.0f} s")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return rows


if __name__ == "__main__":
    res = main()
    bad = any(r["corrupt"] or r["orphans_after_rerun"] or r["rerun_failed"] or r["identical"] != r["runs"]
              for r in res)
    sys.exit(1 if bad else 0)
