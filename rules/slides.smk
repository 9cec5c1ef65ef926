# Per-slide stages: tissue detection + grid, then patch embedding (one job per slide).
# embedding.source: import converts existing TRIDENT/CLAM/STAMP features instead (no tiling, no GPU);
# the features files and shard manifests are the same outputs, so later rules do not change.
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
        }
    return {
        "tiles": f"{RESULTS}/{wildcards.cohort}/tiles/{wildcards.slide}.h5",
        "slide": slide_file(wildcards),
    }


def embedding_params(wildcards):
    # Embedding mode passes exactly the embedding block of before (no rerun of finished slides); import
    # mode adds what the per-slide conversion needs (the slide's mpp override, the patch geometry).
    emb = dict(config["embedding"])
    if not IMPORTING:
        return {k: v for k, v in emb.items() if k not in IMPORT_KEYS}
    return dict(emb, import_mpp=slide_mpp(wildcards), import_tiling=import_tiling())


def import_tiling():
    return {k: config["tiling"][k] for k in ("patch_size", "target_mpp")}


def shard_inputs(wildcards):
    sheet = SHEETS[wildcards.cohort]
    ids = shard_slides(wildcards.cohort, wildcards.shard)
    out = {"slides": sheet.loc[ids, "path"].tolist()}
    if IMPORTING:
        out["imported"] = [f for s in ids for f in imported_file(wildcards.cohort, s)]
    return out


rule tile:
    input:
        slide=slide_file,
    output:
        h5=f"{RESULTS}/{{cohort}}/tiles/{{slide}}.h5",
        qc=f"{RESULTS}/{{cohort}}/tiles/{{slide}}.png",
    log:
        "logs/tile/{cohort}/{slide}.log",
    group:
        "slides"
    conda:
        "../envs/tiling.yaml"
    params:
        tiling=config["tiling"],
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
        gpu=1,
    params:
        embedding=embedding_params,
    script:
        "../workflow/scripts/embed_patches.py"


rule slide_shard:
    input:
        unpack(shard_inputs),
    output:
        manifest=f"{RESULTS}/{{cohort}}/features/{{encoder}}/shards/{{shard}}.tsv",
    log:
        "logs/slide_shard/{cohort}/{encoder}/{shard}.log",
    benchmark:
        "benchmarks/out/slide_shard/{cohort}/{encoder}/{shard}.tsv"
    conda:
        "../envs/embed.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        slides=lambda wc: SHEETS[wc.cohort]
        .loc[shard_slides(wc.cohort, wc.shard), ["slide_id", "path", "mpp"]]
        .to_dict("records"),
        tiles_dir=lambda wc: f"{RESULTS}/{wc.cohort}/tiles",
        features_dir=lambda wc: f"{RESULTS}/{wc.cohort}/features/{wc.encoder}",
        tiling=config["tiling"],
        embedding=lambda wc: {
            k: v
            for k, v in config["embedding"].items()
            if IMPORTING or k not in IMPORT_KEYS
        },
    script:
        "../workflow/scripts/slide_shard.py"
