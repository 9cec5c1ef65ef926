# Shared helpers: cohort sheets, input functions, wildcard constraints.
import os
from pathlib import Path

import pandas as pd

from modaltune.preflight import print_run_summary, recheck_preflight
from modaltune.splits import import_split_files
from modaltune.settings import result_config, result_settings
from modaltune.workflow import (
    cohort_inputs,
    demo_cohorts,
    fold_ids,
    load_sheet,
    model_needs_text,
    pancancer_members,
    site_cohorts,
    target_cohorts,
    target_models,
)
from modaltune.models.configs import model_config

RESULTS = config.get("results_dir", "results")
ENCODER = config["embedding"]["encoder"]
SCHEME = config["splits"]["scheme"]
SEEDS = [int(s) for s in config["seeds"]]
MODELS = target_models(config)
FOLDS = fold_ids(config)

SITE_COHORTS = site_cohorts(config)
PANCANCER = {
    name: members
    for name, members in pancancer_members(config).items()
    if name in target_cohorts(config)
    or name in {p[side] for p in config.get("ood", []) for side in ("train", "eval")}
}
INPUTS = {c: cohort_inputs(config, c) for c in SITE_COHORTS}
SHEETS = {c: load_sheet(config, c) for c in SITE_COHORTS}


def _alt(names):
    return "|".join(sorted(names)) or "__none__"


wildcard_constraints:
    cohort="[A-Za-z0-9_.-]+",
    slide="[^/]+",
    encoder="[A-Za-z0-9_.-]+",
    model="[A-Za-z0-9_.-]+",
    seed=r"\d+",
    fold=r"\d+",
    shard=r"\d+",


def slide_file(wildcards):
    sheet = SHEETS[wildcards.cohort]
    return sheet.at[wildcards.slide, "path"]


def slide_mpp(wildcards):
    mpp = SHEETS[wildcards.cohort].at[wildcards.slide, "mpp"]
    return None if pd.isna(mpp) else float(mpp)


def member_cohorts(cohort):
    return PANCANCER.get(cohort, [cohort])


# Slides per cluster job in the cohort DAG: 1 = one tile + one embed job per slide; N > 1 = one
# "slide_shard" job per N slides (a 20,000-slide DAG stays small). Per-slide targets keep working.
SLIDES_PER_JOB = int(config.get("sharding", {}).get("slides_per_job", 1))


def shard_slides(cohort, shard):
    ids = SHEETS[cohort].index
    return list(ids[int(shard) * SLIDES_PER_JOB : (int(shard) + 1) * SLIDES_PER_JOB])


def n_shards(cohort):
    return -(-len(SHEETS[cohort]) // SLIDES_PER_JOB)


def feature_files(cohort):
    """Per-slide feature files, or the shard manifests listing them."""
    if SLIDES_PER_JOB <= 1:
        return [
            f"{RESULTS}/{c}/features/{ENCODER}/{s}.h5"
            for c in member_cohorts(cohort)
            for s in SHEETS[c].index
        ]
    return [
        f"{RESULTS}/{c}/features/{ENCODER}/shards/{k}.tsv"
        for c in member_cohorts(cohort)
        for k in range(n_shards(c))
    ]


def sheet_files(cohort):
    return [INPUTS[c]["sheet"] for c in member_cohorts(cohort) if "sheet" in INPUTS[c]]


def optional_input(key):
    """Input function: a cohort file that a cohort without slides lacks (sheet, biospecimen) -> []."""
    return lambda wc: INPUTS[wc.cohort].get(key, [])


def sheet_patients(wildcards):
    """RNA is read for the sheet's patients; a cohort without a sheet keeps every RNA sample (None)."""
    if "sheet" not in INPUTS[wildcards.cohort]:
        return None
    return sorted(set(SHEETS[wildcards.cohort]["patient_id"]))


# One training run = one (cohort, model, seed, fold).
RUN = f"{RESULTS}/{{cohort}}/runs/{{model}}/seed_{{seed}}/fold_{{fold}}"


def run_files(cohort, name):
    pattern = f"{RESULTS}/{cohort}/runs/{{model}}/seed_{{seed}}/fold_{{fold}}/{name}"
    return expand(pattern, model=MODELS, seed=SEEDS, fold=FOLDS)


def training_inputs(wildcards):
    c = wildcards.cohort
    inputs = {
        "features": feature_files(c),
        "sheets": sheet_files(c),
        "cases": f"{RESULTS}/{c}/clinical/cases.parquet",
        "splits": f"{RESULTS}/{c}/splits/{SCHEME}.parquet",
        "pathways": f"{RESULTS}/{c}/genomics/pathways.parquet",
    }
    # Only models trained with the text_kl objective read the fold's text targets.
    if model_needs_text(config, wildcards.model):
        inputs["text"] = f"{RESULTS}/{c}/text/fold_{wildcards.fold}.h5"
    return inputs


def eval_data_inputs(wildcards):
    """Data of the cohort the probes are fitted and scored on (OOD: another cohort)."""
    c = wildcards.get("eval_cohort", wildcards.cohort)
    return {
        "features": feature_files(c),
        "sheets": sheet_files(c),
        "cases": f"{RESULTS}/{c}/clinical/cases.parquet",
        "splits": f"{RESULTS}/{c}/splits/{SCHEME}.parquet",
        "pathways": f"{RESULTS}/{c}/genomics/pathways.parquet",
    }


def metrics_files(cohort):
    return run_files(cohort, "metrics.json")


def ood_metrics_files(cohort):
    out = []
    for pair in config.get("ood", []):
        if pair["eval"] != cohort:
            continue
        models = pair.get("models", MODELS)
        out += expand(
            f"{RESULTS}/{cohort}/ood/{pair['train']}/{{model}}/seed_{{seed}}/fold_{{fold}}/metrics.json",
            model=models,
            seed=SEEDS,
            fold=FOLDS,
        )
    return out


def history_files(cohort):
    return run_files(cohort, "history.parquet")


def all_targets():
    targets = [f"{RESULTS}/{c}/tables/summary.md" for c in target_cohorts(config)]
    targets += [
        f"{RESULTS}/{pair['eval']}/tables/summary.md" for pair in config.get("ood", [])
    ]
    # the report's cross-cohort tables, cost and manifest (rules/report.smk)
    targets += [f"{RESULTS}/tables/subtype.md", f"{RESULTS}/tables/survival.md"]
    for c in target_cohorts(config):
        targets += [f"{RESULTS}/{c}/cost/stages.tsv", f"{RESULTS}/{c}/manifest.json"]
    # heatmap_targets: rules/heatmaps.smk (included after this file; called only by rule all)
    targets += heatmap_targets()
    return list(dict.fromkeys(targets))


def split_import_inputs(wildcards):
    """Imported split files are inputs of the splits rule: editing one reruns the splits."""
    if SCHEME != "import":
        return []
    return import_split_files(config["splits"].get("import_path"))


# Every cohort's first stages (tile / slide_shard, rna_pathways, clinical_table) wait for its preflight.
PREFLIGHT = f"{RESULTS}/{{cohort}}/preflight.json"
DEMO_COHORTS = set(demo_cohorts(config))

# Cohorts whose results the end-of-run summary reads.
SUMMARY_COHORTS = list(dict.fromkeys(SITE_COHORTS + list(PANCANCER)))


# Inputs/params of the embed stage (rules/slides.smk). embedding.source: import converts existing
# TRIDENT/CLAM/STAMP features instead of tiling + embedding (modaltune.feature_import).
from modaltune.feature_import import IMPORT_KEYS, check_import_dir, find_import_file

IMPORTING = config["embedding"].get("source", "embed") == "import"
if IMPORTING:
    for _c in SITE_COHORTS:
        check_import_dir(
            config["embedding"].get("import_dir"),
            list(SHEETS[_c].index),
            SHEETS[_c]["path"].tolist(),
        )


def imported_file(cohort, slide):
    path = SHEETS[cohort].at[slide, "path"]
    found = find_import_file(config["embedding"]["import_dir"], slide, path)
    return [] if found is None else [str(found)]


def embed_inputs(wildcards):
    if IMPORTING:
        return {
            "slide": slide_file(wildcards),
            "imported": imported_file(wildcards.cohort, wildcards.slide),
            "preflight": PREFLIGHT.format(cohort=wildcards.cohort),
        }
    return {
        "tiles": f"{RESULTS}/{wildcards.cohort}/tiles/{wildcards.slide}.h5",
        "slide": slide_file(wildcards),
    }


def embedding_params(wildcards):
    # Embedding mode passes exactly the embedding block of before (no rerun of finished slides); import
    # mode adds what the per-slide conversion needs (the slide's mpp override, the patch geometry).
    emb = result_settings(config, "embedding")
    if not IMPORTING:
        return {k: v for k, v in emb.items() if k not in IMPORT_KEYS}
    return dict(emb, import_mpp=slide_mpp(wildcards), import_tiling=import_tiling())


def import_tiling():
    return {k: config["tiling"][k] for k in ("patch_size", "target_mpp")}


def shard_inputs(wildcards):
    sheet = SHEETS[wildcards.cohort]
    ids = shard_slides(wildcards.cohort, wildcards.shard)
    out = {
        "slides": sheet.loc[ids, "path"].tolist(),
        "preflight": PREFLIGHT.format(cohort=wildcards.cohort),
    }
    if IMPORTING:
        out["imported"] = [f for s in ids for f in imported_file(wildcards.cohort, s)]
    return out
