# Input functions and constants of rules/report.smk.
from modaltune.report_rst import register_directives

# `.. modaltune-image::` for the report's front page (report/workflow.rst).
register_directives()

TABLES = f"{RESULTS}/{{cohort}}/tables"
PLOTS = f"{RESULTS}/{{cohort}}/plots"


def prediction_files(cohort):
    """predictions.parquet next to every metrics.json (written by evaluate / evaluate_ood)."""
    return [
        f[: -len("metrics.json")] + "predictions.parquet"
        for f in aggregate_metrics(cohort)
    ]


def aggregate_metrics(cohort):
    return metrics_files(cohort) + ood_metrics_files(cohort)


def qc_thumbnails(cohort):
    """Tiling QC thumbnails declared by the per-slide tile rule (shard jobs list theirs in the manifest;
    imported features are not tiled here, so asking for thumbnails would run tiling for nothing).
    """
    if SLIDES_PER_JOB > 1 or IMPORTING:
        return []
    return [
        f"{RESULTS}/{c}/tiles/{s}.png"
        for c in member_cohorts(cohort)
        for s in SHEETS[c].index
    ]


def benchmark_files(cohort):
    """Benchmark TSVs of every job that made this cohort's results, by stage (rule name)."""
    members = member_cohorts(cohort)
    out = {}
    if SLIDES_PER_JOB > 1:
        out["slide_shard"] = [
            f"benchmarks/out/slide_shard/{c}/{ENCODER}/{k}.tsv"
            for c in members
            for k in range(n_shards(c))
        ]
    else:
        slides = [(c, s) for c in members for s in SHEETS[c].index]
        if not IMPORTING:  # imported features are not tiled here
            out["tile"] = [f"benchmarks/out/tile/{c}/{s}.tsv" for c, s in slides]
        out["embed_patches"] = [
            f"benchmarks/out/embed_patches/{c}/{ENCODER}/{s}.tsv" for c, s in slides
        ]
    for stage in ("rna_pathways", "clinical_table"):
        out[stage] = [f"benchmarks/out/{stage}/{c}.tsv" for c in members]
    out["splits"] = [f"benchmarks/out/splits/{c}_{SCHEME}.tsv" for c in members]
    if cohort in PANCANCER:
        out["pancancer_merge"] = [f"benchmarks/out/pancancer_merge/{cohort}.tsv"]
    if any(
        model_needs_text(config, m) for m in MODELS
    ):  # text targets only for text_kl models
        out["text_targets"] = expand(
            f"benchmarks/out/text_targets/{cohort}_fold_{{fold}}.tsv", fold=FOLDS
        )
    runs = dict(model=MODELS, seed=SEEDS, fold=FOLDS)
    pattern = (
        f"benchmarks/out/{{stage}}/{cohort}/{{model}}/seed_{{seed}}_fold_{{fold}}.tsv"
    )
    out["train"] = expand(pattern, stage="train", **runs)
    out["evaluate"] = expand(pattern, stage="evaluate", **runs)
    return {f"bench_{k}": v for k, v in out.items()}


def report_cohorts():
    """Cohorts with a summary: the targets and every OOD evaluation cohort."""
    evals = [pair["eval"] for pair in config.get("ood", [])]
    return list(dict.fromkeys(target_cohorts(config) + evals))


def n_slides(cohort):
    return sum(len(SHEETS[c]) for c in member_cohorts(cohort))


def n_patients(cohort):
    return sum(SHEETS[c]["patient_id"].nunique() for c in member_cohorts(cohort))


def gpu_rules():
    """Rules holding a GPU (resources: gpu >= 1): their wall hours are the run's GPU hours (the embedding
    rules hold none when features are imported)."""
    return sorted(r.name for r in workflow.rules if (r.resources.get("gpu") or 0))
