# Tile heatmaps (h5 + PNG overlay + top-tile gallery + QuPath GeoJSON) and pathway attribution of the
# trained runs named in config `heatmaps:`. What is drawn is fixed when the DAG is built: explicit slide
# ids, or k numbered slots for the highest/lowest-risk test patients of the chosen run.
from modaltune.heatmaps import heatmap_plan

HM_PLAN = heatmap_plan(
    config,
    {c: SHEETS[c] for c in target_cohorts(config) if c in SHEETS},
    MODELS,
    SEEDS,
    N_FOLDS,
)
HM = config.get("heatmaps") or {}
HM_DIR = f"{RESULTS}/{{cohort}}/heatmaps/{{model}}"
HM_RUN = f"{RESULTS}/{{cohort}}/runs/{{model}}/seed_{HM_PLAN['seed']}/fold_{HM_PLAN['fold']}"
HM_PARAMS = {
    "score": HM.get("score") or {},
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
        "state": HM_RUN.format(cohort=wildcards.cohort, model=wildcards.model) + "/state.pt",
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


rule heatmap:
    input:
        unpack(heatmap_inputs),
    output:
        h5=f"{HM_DIR}/{{slide}}.h5",
        png=_figure(f"{HM_DIR}/{{slide}}.png", "heatmap"),
        tiles=_figure(f"{HM_DIR}/tiles/{{slide}}.png", "top tiles"),
        geojson=f"{HM_DIR}/{{slide}}.geojson",
    log:
        "logs/heatmap/{cohort}/{model}/{slide}.log",
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    params:
        **HM_PARAMS,
    script:
        "../workflow/scripts/heatmaps.py"


for _which in ("high", "low"):
    _k = HM_PLAN["risk"][_which]
    if not _k:
        continue
    _slot = f"{HM_DIR}/ranked/{_which}_{{i}}"

    rule:
        name:
            f"heatmap_risk_{_which}"
        input:
            unpack(ranked_inputs),
        output:
            h5=expand(f"{_slot}.h5", i=range(1, _k + 1), allow_missing=True),
            png=[
                report(
                    p,
                    caption="../report/heatmaps.rst",
                    category="Heatmaps",
                    subcategory="{model}",
                    labels={"model": "{model}", "slide": f"{_which} risk #{i}", "figure": "heatmap"},
                )
                for i, p in enumerate(
                    expand(f"{_slot}.png", i=range(1, _k + 1), allow_missing=True), 1
                )
            ],
            tiles=expand(
                f"{HM_DIR}/ranked/tiles/{_which}_{{i}}.png",
                i=range(1, _k + 1),
                allow_missing=True,
            ),
            geojson=expand(f"{_slot}.geojson", i=range(1, _k + 1), allow_missing=True),
        log:
            f"logs/heatmap_risk_{_which}/{{cohort}}/{{model}}.log",
        conda:
            "../envs/train.yaml"
        resources:
            gpu=1,
        params:
            **HM_PARAMS,
            which=_which,
            k=_k,
        script:
            "../workflow/scripts/heatmaps.py"


rule pathway_attribution:
    input:
        unpack(eval_data_inputs),
        state=f"{HM_RUN}/state.pt",
        embeddings=f"{HM_RUN}/embeddings.npz",
    output:
        tsv=f"{RESULTS}/{{cohort}}/attribution/{{model}}/pathways.tsv",
        png=report(
            f"{RESULTS}/{{cohort}}/attribution/{{model}}/pathways.png",
            caption="../report/attribution.rst",
            category="Heatmaps",
            subcategory="pathway attribution",
            labels={"model": "{model}", "figure": "pathway attribution"},
        ),
    log:
        "logs/pathway_attribution/{cohort}/{model}.log",
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    params:
        fold=HM_PLAN["fold"],
        task=(HM.get("attribution") or {}).get("task", "survival"),
        max_patients=(HM.get("attribution") or {}).get("max_patients"),
        top=int((HM.get("attribution") or {}).get("top", 15)),
    script:
        "../workflow/scripts/heatmaps_attribution.py"


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
                    out += [f"{base}/ranked/{which}_{i}.{e}" for e in ("h5", "png", "geojson")]
                    out.append(f"{base}/ranked/tiles/{which}_{i}.png")
        for m in HM_PLAN["attribution_models"]:
            out += [f"{RESULTS}/{c}/attribution/{m}/pathways.{e}" for e in ("tsv", "png")]
    return out
