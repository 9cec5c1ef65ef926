"""Benchmark: `modaltune preflight` on a synthetic 1,000-patient cohort (the issue's target: seconds).

The tables (Xena RNA, GMT, GDC clinical + biospecimen, cohort sheet) come from the demo generator's
layout at 1,000 patients; every slide of the sheet is a hard link to one small pyramidal TIFF, so the
slide check opens 1,150 real headers without rendering 1,150 images. Reports wall seconds per check for
a full run (headers opened) and a --quick run (existence only).

    python benchmarks/bench_preflight.py [--patients 1000] [--models abmil modaltune]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from modaltune import demo  # noqa: E402
from modaltune.preflight import format_report, preflight_cohort  # noqa: E402


def build_cohort(out: Path, n_patients: int, seed: int = 0) -> dict:
    layout = demo._layout(n_patients, seed)
    sheet = demo.demo_sheet(n_patients, seed)
    (out / "rna").mkdir(parents=True)
    (out / "genesets").mkdir()
    (out / "clinical").mkdir()
    (out / "biospecimen").mkdir()
    (out / "slides").mkdir()
    demo._write_xena(out / "rna" / "HiSeqV2_PANCAN.gz", demo._expression(layout, seed))
    demo._write_gmt(out / "genesets" / "demo.gmt", demo._gene_sets())
    clinical, slides = demo._clinical(layout, seed)
    demo._write_tsv(out / "clinical" / "clinical.tsv", clinical)
    demo._write_tsv(out / "biospecimen" / "slide.tsv", slides)
    proto = out / "proto.tiff"
    demo.write_pyramid_tiff(proto, np.full((384, 512, 3), 210, np.uint8), mpp=0.25)
    for rel in sheet["path"]:
        os.link(proto, out / rel)
    demo._write_tsv(out / "cohort_sheet.tsv", sheet)
    files = {"sheet": "cohort_sheet.tsv", "rna": "rna/HiSeqV2_PANCAN.gz", "gene_sets": "genesets/demo.gmt",
             "clinical": "clinical/clinical.tsv", "biospecimen": "biospecimen/slide.tsv"}
    return {"site": "BRCA", **{k: str(out / v) for k, v in files.items()}}, len(sheet)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--models", nargs="+", default=["abmil", "modaltune"])
    args = ap.parse_args()
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        block, n_slides = build_cohort(Path(tmp) / "c", args.patients)
        print(f"built a {args.patients}-patient / {n_slides}-slide cohort in {time.perf_counter() - t:.1f} s")
        cfg["cohorts"] = {"c": block}
        cfg["run"] = {"cohorts": ["c"], "models": args.models}
        # cold = first call in the process (imports scikit-learn, PyTorch and the model modules, as the
        # CLI does once); warm = the checks themselves
        for name, quick in (("cold", False), ("warm", False), ("warm --quick", True)):
            t = time.perf_counter()
            report = preflight_cohort(cfg, "c", quick=quick)
            wall = time.perf_counter() - t
            assert not report.problems, format_report([report])
            steps = ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items())
            print(f"preflight {name}: {wall:.1f} s wall ({steps}); "
                  f"{report.composition.iloc[0]['patients']} patients, {len(report.warnings)} warnings")


if __name__ == "__main__":
    main()
