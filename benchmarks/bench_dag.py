"""Benchmark: build the DAG (`snakemake -n`) for a large cohort and report seconds + peak memory.

Default: 20,000 slides / 1,000 patients x 5 folds x 3 seeds (the issue's target: <= 15 s, <= 1 GB on
a 2-core machine). Input files are created empty: a dry run only needs them to exist.

    python benchmarks/bench_dag.py [--slides 20000 --patients 1000 --folds 5 --seeds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def build_cohort(work: Path, n_slides: int, n_patients: int) -> dict:
    data = work / "data"
    (data / "slides").mkdir(parents=True)
    rows = []
    for i in range(n_slides):
        patient = f"TCGA-XX-{i % n_patients:04d}"
        slide = f"{patient}-01Z-00-DX{i // n_patients + 1}"
        (data / "slides" / f"{slide}.svs").touch()
        rows.append(f"{slide}\t{patient}\tslides/{slide}.svs\t0.25")
    (data / "sheet.tsv").write_text("slide_id\tpatient_id\tpath\tmpp\n" + "\n".join(rows) + "\n")
    for name in ("rna.gz", "sets.gmt", "clinical.tsv", "slide.tsv"):
        (data / name).touch()
    return {
        "site": "BRCA",
        "sheet": "data/sheet.tsv",
        "rna": "data/rna.gz",
        "gene_sets": "data/sets.gmt",
        "clinical": "data/clinical.tsv",
        "biospecimen": "data/slide.tsv",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=20000)
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--slides-per-job", type=int, default=50, help="config sharding.slides_per_job")
    ap.add_argument("--profile", action="store_true", help="also dry-run through profiles/slurm")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workflow folder (debugging)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_dag_"))
    try:
        for part in ("Snakefile", "rules", "workflow", "config", "envs", "profiles"):
            src = ROOT / part
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / part)
        cohort = build_cohort(work, args.slides, args.patients)
        cfg = {
            "cohorts": {"big": cohort},
            "run": {"cohorts": ["big"], "models": ["modaltune"]},
            "splits": {"scheme": "kfold", "n_folds": args.folds},
            "seeds": list(range(args.seeds)),
            "sharding": {"slides_per_job": args.slides_per_job},
        }
        (work / "big.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "snakemake", "-n", "-q", "rules", "--configfile", "big.yaml"]
        if args.profile:
            cmd += ["--profile", "profiles/slurm"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(res.stdout[-3000:] + res.stderr[-3000:])
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        slide_jobs = args.slides * 2 if args.slides_per_job <= 1 else -(-args.slides // args.slides_per_job)
        jobs = slide_jobs + args.folds * (args.seeds * 2 + 1) + 5
        print(f"dag_dry_run slides={args.slides} patients={args.patients} folds={args.folds} "
              f"seeds={args.seeds} slides_per_job={args.slides_per_job} jobs~{jobs} seconds={wall:.1f} peak_rss_mb={peak_mb:.0f} "
              f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
