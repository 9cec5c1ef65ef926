# Per-slide stages: tissue detection + grid, then patch embedding (one job per slide).
# embedding.source: import converts existing TRIDENT/CLAM/STAMP features instead (no tiling, no GPU;
# helpers in rules/common.smk): the same outputs, so later rules do not change.


rule tile:
    input:
        slide=slide_file,
        preflight=PREFLIGHT,
    output:
        h5=f"{RESULTS}/{{cohort}}/tiles/{{slide}}.h5",
        # QC thumbnail; the report shows a contact sheet of them (aggregate: plots/tiling_qc.png) rather than
        # embedding every slide's thumbnail in the report HTML (20,000 slides would make it huge).
        qc=f"{RESULTS}/{{cohort}}/tiles/{{slide}}.png",
    log:
        "logs/tile/{cohort}/{slide}.log",
    benchmark:
        "benchmarks/out/tile/{cohort}/{slide}.tsv"
    group:
        "slides"
    conda:
        "../envs/tiling.yaml"
    params:
        tiling=result_settings(config, "tiling"),
        mpp=slide_mpp,
    script:
        "../workflow/scripts/tile.py"


rule embed_patches:
    input:
        unpack(embed_inputs),
    output:
        h5=f"{RESULTS}/{{cohort}}/features/{{encoder}}/{{slide}}.h5",
    log:
        "logs/embed_patches/{cohort}/{encoder}/{slide}.log",
    benchmark:
        "benchmarks/out/embed_patches/{cohort}/{encoder}/{slide}.tsv"
    group:
        "slides"
    conda:
        "../envs/embed.yaml"
    threads: 1
    resources:
        # import converts existing features on the CPU: no GPU requested then
        gpu=0 if IMPORTING else 1,
    params:
        embedding=embedding_params,
    script:
        "../workflow/scripts/embed_patches.py"


rule slide_shard:
    input:
        unpack(shard_inputs),
    output:
        manifest=f"{RESULTS}/{{cohort}}/features/{{encoder}}/shards/{{shard}}.tsv",
        # the shard's tiles + features; update(): kept when the job reruns, so it resumes per slide
        slides=update(
            directory(f"{RESULTS}/{{cohort}}/features/{{encoder}}/shards/{{shard}}")
        ),
    log:
        "logs/slide_shard/{cohort}/{encoder}/{shard}.log",
    benchmark:
        "benchmarks/out/slide_shard/{cohort}/{encoder}/{shard}.tsv"
    conda:
        "../envs/embed.yaml"
    threads: 2
    resources:
        gpu=0 if IMPORTING else 1,
    params:
        slides=lambda wc: SHEETS[wc.cohort]
        .loc[shard_slides(wc.cohort, wc.shard), ["slide_id", "path", "mpp"]]
        .to_dict("records"),
        tiling=result_settings(config, "tiling"),
        embedding=lambda wc: {
            k: v
            for k, v in result_settings(config, "embedding").items()
            if IMPORTING or k not in IMPORT_KEYS
        },
    script:
        "../workflow/scripts/slide_shard.py"
