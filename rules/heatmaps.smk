# Tile heatmaps (h5 + PNG overlay + top-tile gallery + QuPath GeoJSON) and pathway attribution of the
# trained runs named in config `heatmaps:`. What is drawn is fixed when the DAG is built: explicit slide
# ids, or k numbered slots for the highest/lowest-risk test patients of the chosen run.
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
        "../envs/heatmaps.yaml"
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
                    labels={
                        "model": "{model}",
                        "slide": f"{_which} risk #{i}",
                        "figure": "heatmap",
                    },
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
            "../envs/heatmaps.yaml"
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
        "../envs/heatmaps.yaml"
    resources:
        gpu=1,
    params:
        fold=HM_PLAN["fold"],
        task=(HM.get("attribution") or {}).get("task", "survival"),
        max_patients=(HM.get("attribution") or {}).get("max_patients"),
        top=int((HM.get("attribution") or {}).get("top", 15)),
    script:
        "../workflow/scripts/heatmaps_attribution.py"
