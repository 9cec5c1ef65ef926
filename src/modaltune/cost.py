"""Run cost from Snakemake benchmark files: per-stage wall / CPU / GPU hours, measured rates, estimates.

Benchmark TSVs (``benchmark:`` of each rule) hold ``s`` (wall seconds) and ``cpu_time`` (CPU seconds) per
job. GPU hours are the wall hours of the jobs of rules that request ``resources: gpu=1`` (what a cluster
bills: the GPU is held for the whole job, also when the job ran on a CPU-only machine).

Rates are measured per unit of work so that a cohort of another size can be estimated
(``modaltune cost --slides 1000``):

=================  ====================================================================
stage              unit
=================  ====================================================================
embed_patches,     tile (seconds per tile x tiles per slide: real slides have far more
slide_shard        tiles than the demo's, give ``--tiles-per-slide``)
tile               slide
train, evaluate    patient x run, per model (a run = one (seed, fold))
other stages       patient
=================  ====================================================================
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from modaltune.errors import InputError
from modaltune.io_utils import atomic_path, write_json

PER_TILE = {"embed_patches", "slide_shard"}
PER_SLIDE = {"tile"}
PER_RUN = {"train", "evaluate", "evaluate_ood"}


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return np.nan  # "-" / "NA": not measured (a job shorter than the sampling interval)


def read_benchmarks(files_by_stage: dict[str, list[str]]) -> pd.DataFrame:
    """One row per benchmark file: stage, model (train/evaluate: the run folder's model), wall_s, cpu_s, rss."""
    rows = []
    for stage, files in files_by_stage.items():
        for f in files:
            try:
                t = pd.read_csv(f, sep="\t")
            except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
                raise InputError(f"benchmark {f}: cannot read the TSV ({e}); rerun the {stage} rule") from e
            if "s" not in t.columns:
                raise InputError(f"benchmark {f}: no 's' column; is it a Snakemake benchmark file?")
            r = t.iloc[-1]  # with `repeat(...)` the last measurement
            rows.append({"stage": stage, "model": Path(f).parent.name if stage in PER_RUN else None,
                         "file": str(f), "wall_s": _num(r["s"]), "cpu_s": _num(r.get("cpu_time")),
                         "max_rss_mb": _num(r.get("max_rss"))})
    return pd.DataFrame(rows, columns=["stage", "model", "file", "wall_s", "cpu_s", "max_rss_mb"])


def stage_table(bench: pd.DataFrame, gpu_stages) -> pd.DataFrame:
    """Per stage: jobs, wall, CPU and GPU hours, peak RSS."""
    gpu_stages = set(gpu_stages)
    rows = []
    for stage, g in bench.groupby("stage", sort=False):
        wall_h = g["wall_s"].sum() / 3600
        rows.append({"stage": stage, "jobs": len(g), "wall_h": wall_h,
                     "cpu_h": g["cpu_s"].sum() / 3600 if g["cpu_s"].notna().any() else np.nan,
                     "gpu_h": wall_h if stage in gpu_stages else 0.0,
                     "max_rss_mb": g["max_rss_mb"].max()})
    out = pd.DataFrame(rows, columns=["stage", "jobs", "wall_h", "cpu_h", "gpu_h", "max_rss_mb"])
    total = {"stage": "total", "jobs": int(out["jobs"].sum()), "wall_h": out["wall_h"].sum(),
             "cpu_h": out["cpu_h"].sum(min_count=1), "gpu_h": out["gpu_h"].sum(), "max_rss_mb": out["max_rss_mb"].max()}
    return pd.concat([out, pd.DataFrame([total])], ignore_index=True)


def measured_rates(bench: pd.DataFrame, *, gpu_stages, n_slides: int, n_patients: int, n_tiles: int) -> dict:
    """Seconds (wall and CPU) per unit of work for every stage, and the measured cohort's size."""
    if n_patients <= 0:  # a cohort without slides (RNA + clinical only) has 0 slides and is fine
        raise InputError(f"cost: the measured cohort has {n_slides} slides and {n_patients} patients; "
                         "nothing to derive rates from")
    stages: dict = {}
    for stage, g in bench.groupby("stage", sort=False):
        if stage in PER_RUN:
            models = {}
            for model, gm in g.groupby("model"):
                units = len(gm) * n_patients
                models[model] = {"runs": len(gm), "wall_s_per_unit": gm["wall_s"].sum() / units,
                                 "cpu_s_per_unit": gm["cpu_s"].sum() / units if gm["cpu_s"].notna().any() else None}
            stages[stage] = {"unit": "patient x run", "gpu": stage in gpu_stages, "models": models}
            continue
        unit, units = (("tile", n_tiles) if stage in PER_TILE else ("slide", n_slides) if stage in PER_SLIDE
                       else ("patient", n_patients))
        units = max(units, 1)
        stages[stage] = {"unit": unit, "gpu": stage in gpu_stages, "jobs": len(g),
                         "wall_s_per_unit": g["wall_s"].sum() / units,
                         "cpu_s_per_unit": g["cpu_s"].sum() / units if g["cpu_s"].notna().any() else None}
    return {"measured": {"slides": int(n_slides), "patients": int(n_patients), "tiles": int(n_tiles),
                         "tiles_per_slide": n_tiles / n_slides if n_slides else None}, "stages": stages}


def estimate(rates: dict, *, slides: int, patients: int | None = None, models: list[str] | None = None,
             runs: int | None = None, tiles_per_slide: float | None = None) -> pd.DataFrame:
    """Estimated wall / CPU / GPU hours per stage for a cohort of ``slides`` slides.

    ``patients`` defaults to the measured patients-per-slide ratio, ``tiles_per_slide`` to the measured
    mean, ``models`` to every measured model, ``runs`` (seeds x folds per model) to the measured count."""
    if slides <= 0:
        raise InputError("cost: --slides must be a positive number of slides")
    m = rates["measured"]
    if (patients is None and not m["slides"]) or (tiles_per_slide is None and m["tiles_per_slide"] is None):
        raise InputError("cost: the measured run had no slides (RNA + clinical only); give --patients and "
                         "--tiles-per-slide")
    patients = int(patients if patients is not None else math.ceil(slides * m["patients"] / m["slides"]))
    tps = float(tiles_per_slide if tiles_per_slide is not None else m["tiles_per_slide"])
    rows = []
    for stage, s in rates["stages"].items():
        if "models" in s:
            known = sorted(s["models"])
            chosen = models or known
            unknown = sorted(set(chosen) - set(known))
            if unknown:
                raise InputError(f"cost: no measured {stage} rate for model(s) {unknown}; measured: {known}")
            for model in chosen:
                r = s["models"][model]
                n_units = patients * (runs if runs is not None else r["runs"])
                rows.append(_row(f"{stage} ({model})", s["gpu"], n_units, r))
            continue
        n_units = {"tile": slides * tps, "slide": slides}.get(s["unit"], patients)
        rows.append(_row(stage, s["gpu"], n_units, s))
    out = pd.DataFrame(rows, columns=["stage", "units", "wall_h", "cpu_h", "gpu_h"])
    total = {"stage": "total", "units": np.nan, "wall_h": out["wall_h"].sum(),
             "cpu_h": out["cpu_h"].sum(min_count=1), "gpu_h": out["gpu_h"].sum()}
    return pd.concat([out, pd.DataFrame([total])], ignore_index=True)


def _row(stage: str, gpu: bool, n_units: float, r: dict) -> dict:
    wall_h = n_units * r["wall_s_per_unit"] / 3600
    cpu = r.get("cpu_s_per_unit")
    return {"stage": stage, "units": n_units, "wall_h": wall_h,
            "cpu_h": np.nan if cpu is None else n_units * cpu / 3600, "gpu_h": wall_h if gpu else 0.0}


def cost_markdown(stages: pd.DataFrame, throughput: pd.DataFrame) -> str:
    lines = ["| stage | jobs | wall h | CPU h | GPU h | peak RSS MB |", "|---|---|---|---|---|---|"]
    for r in stages.itertuples():
        lines.append(f"| {r.stage} | {r.jobs} | {r.wall_h:.4f} | {r.cpu_h:.4f} | {r.gpu_h:.4f} | {r.max_rss_mb:.0f} |"
                     .replace("nan", "–"))
    lines += ["", "GPU h: wall hours of the jobs of rules that request a GPU (gpu=1).", ""]
    if len(throughput):
        tps = throughput["tiles_per_s"].dropna()
        lines.append(f"Patch embedding: {len(throughput)} slides, {int(throughput['n_tiles'].sum())} tiles, "
                     f"tiles/s per slide median {tps.median():.1f} (min {tps.min():.1f}, max {tps.max():.1f}).")
    return "\n".join(lines) + "\n"


def cost_report(files_by_stage: dict[str, list[str]], *, throughput_tsv, gpu_stages, n_slides: int,
                n_patients: int, out_tsv, out_md, out_rates, cases_parquet=None) -> pd.DataFrame:
    """Write the per-stage table (TSV + Markdown) and the measured rates (JSON for ``modaltune cost``).

    ``n_patients`` 0 (a cohort without a slide sheet) is counted from ``cases_parquet``."""
    if not n_patients and cases_parquet is not None:
        n_patients = len(pd.read_parquet(cases_parquet, columns=["patient_id"]))
    bench = read_benchmarks(files_by_stage)
    throughput = pd.read_csv(throughput_tsv, sep="\t")
    stages = stage_table(bench, gpu_stages)
    rates = measured_rates(bench, gpu_stages=gpu_stages, n_slides=n_slides, n_patients=n_patients,
                           n_tiles=int(throughput["n_tiles"].sum()) if len(throughput) else 0)
    if len(throughput):
        rates["measured"]["tiles_per_s_median"] = float(throughput["tiles_per_s"].median())
    with atomic_path(out_tsv) as tmp:
        stages.to_csv(tmp, sep="\t", index=False)
    with atomic_path(out_md) as tmp:
        tmp.write_text(cost_markdown(stages, throughput))
    write_json(rates, out_rates)
    return stages


def load_rates(path) -> dict:
    try:
        rates = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cost rates {path}: cannot read ({e}); run the workflow (rule cost) first, e.g. "
                         "`snakemake -c2`, or pass --rates results/{cohort}/cost/rates.json") from e
    if "stages" not in rates or "measured" not in rates:
        raise InputError(f"cost rates {path}: not a rates file written by the cost rule")
    return rates


__all__ = ["cost_report", "estimate", "load_rates", "measured_rates", "read_benchmarks", "stage_table"]
