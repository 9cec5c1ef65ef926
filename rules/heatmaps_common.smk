# Heatmap stage: DAG-time selection (config `heatmaps:`), input functions and targets.
from modaltune.heatmap_plan import heatmap_plan

HM_PLAN = heatmap_plan(
    config, SHEETS, MODELS, SEEDS, FOLDS, targets=target_cohorts(config)
)
HM = config.get("heatmaps") or {}
HM_DIR = f"{RESULTS}/{{cohort}}/heatmaps/{{model}}"
HM_RUN = (
    f"{RESULTS}/{{cohort}}/runs/{{model}}/seed_{HM_PLAN['seed']}/fold_{HM_PLAN['fold']}"
)
HM_PARAMS = {
    # per model, so that changing one model's score reruns only that model's heatmaps
    "score": lambda wildcards: (HM.get("score") or {}).get(wildcards.model),
    "top_tiles": int(HM.get("top_tiles", 8)),
    "thumbnail_px": int(HM.get("thumbnail_px", 1600)),
    "fold": HM_PLAN["fold"],
}


def _slide_features(cohort, slides):
    """Feature inputs holding these slides: their per-slide files, or the shard manifests listing them."""
    if SLIDES_PER_JOB <= 1:
        return [f"{RESULTS}/{cohort}/features/{ENCODER}/{s}.h5" for s in slides]
    pos = {s: i for i, s in enumerate(SHEETS[cohort].index)}
    shards = sorted({pos[s] // SLIDES_PER_JOB for s in slides})
    return [f"{RESULTS}/{cohort}/features/{ENCODER}/shards/{k}.tsv" for k in shards]


def heatmap_inputs(wildcards):
    sheet = SHEETS[wildcards.cohort]
    patient = sheet.at[wildcards.slide, "patient_id"]
    slides = sheet.index[sheet["patient_id"] == patient].tolist()
    return {
        "state": f"{HM_RUN}/state.pt".format(
            cohort=wildcards.cohort, model=wildcards.model
        ),
        "features": _slide_features(wildcards.cohort, slides),
        "sheets": sheet_files(wildcards.cohort),
        "cases": f"{RESULTS}/{wildcards.cohort}/clinical/cases.parquet",
        "splits": f"{RESULTS}/{wildcards.cohort}/splits/{SCHEME}.parquet",
        "pathways": f"{RESULTS}/{wildcards.cohort}/genomics/pathways.parquet",
        "slides": [sheet.at[s, "path"] for s in slides],
    }


def ranked_inputs(wildcards):
    c = wildcards.cohort
    run = HM_RUN.format(cohort=c, model=wildcards.model)
    return {
        "state": f"{run}/state.pt",
        "predictions": f"{run}/predictions.parquet",
        "features": feature_files(c),
        "sheets": sheet_files(c),
        "cases": f"{RESULTS}/{c}/clinical/cases.parquet",
        "splits": f"{RESULTS}/{c}/splits/{SCHEME}.parquet",
        "pathways": f"{RESULTS}/{c}/genomics/pathways.parquet",
        "slides": SHEETS[c]["path"].tolist(),
    }


def _figure(path, figure):
    return report(
        path,
        caption="../report/heatmaps.rst",
        category="Heatmaps",
        subcategory="{model}",
        labels={"model": "{model}", "slide": "{slide}", "figure": figure},
    )


def heatmap_targets():
    out = []
    for c, slides in HM_PLAN["slides"].items():
        for m in HM_PLAN["models"]:
            base = f"{RESULTS}/{c}/heatmaps/{m}"
            for s in slides:
                out += [f"{base}/{s}.{ext}" for ext in ("h5", "png", "geojson")]
                out.append(f"{base}/tiles/{s}.png")
            for which, k in HM_PLAN["risk"].items():
                for i in range(1, k + 1):
                    out += [
                        f"{base}/ranked/{which}_{i}.{e}"
                        for e in ("h5", "png", "geojson")
                    ]
                    out.append(f"{base}/ranked/tiles/{which}_{i}.png")
        for m in HM_PLAN["attribution_models"]:
            out += [
                f"{RESULTS}/{c}/attribution/{m}/pathways.{e}" for e in ("tsv", "png")
            ]
    return out
