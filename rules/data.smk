# Cohort-level data: RNA pathways, clinical table + labels, splits, per-fold text targets.


rule rna_pathways:
    input:
        rna=lambda wc: INPUTS[wc.cohort]["rna"],
        gene_sets=lambda wc: INPUTS[wc.cohort]["gene_sets"],
        preflight=PREFLIGHT,
    output:
        parquet=f"{RESULTS}/{{cohort}}/genomics/pathways.parquet",
        report=f"{RESULTS}/{{cohort}}/genomics/report.json",
    log:
        "logs/rna_pathways/{cohort}.log",
    benchmark:
        "benchmarks/out/rna_pathways/{cohort}.tsv"
    wildcard_constraints:
        cohort=_alt(SITE_COHORTS),
    conda:
        "../envs/genomics.yaml"
    params:
        genomics=result_settings(config, "genomics"),
        patients=sheet_patients,
    script:
        "../workflow/scripts/rna_pathways.py"


rule clinical_table:
    input:
        clinical=lambda wc: INPUTS[wc.cohort]["clinical"],
        biospecimen=optional_input("biospecimen"),
        sheet=optional_input("sheet"),
        rna=rules.rna_pathways.output.parquet,
        preflight=PREFLIGHT,
    output:
        parquet=f"{RESULTS}/{{cohort}}/clinical/cases.parquet",
        report=f"{RESULTS}/{{cohort}}/clinical/report.json",
    log:
        "logs/clinical_table/{cohort}.log",
    benchmark:
        "benchmarks/out/clinical_table/{cohort}.tsv"
    wildcard_constraints:
        cohort=_alt(SITE_COHORTS),
    conda:
        "../envs/genomics.yaml"
    params:
        site=lambda wc: config["cohorts"][wc.cohort]["site"],
        label_map=lambda wc: config["cohorts"][wc.cohort].get("label_map") or None,
    script:
        "../workflow/scripts/clinical_table.py"


rule splits:
    input:
        cases=f"{RESULTS}/{{cohort}}/clinical/cases.parquet",
        sheet=optional_input("sheet"),
        imports=split_import_inputs,
    output:
        parquet=f"{RESULTS}/{{cohort}}/splits/{{scheme}}.parquet",
        summary=f"{RESULTS}/{{cohort}}/splits/{{scheme}}_summary.tsv",
    log:
        "logs/splits/{cohort}_{scheme}.log",
    benchmark:
        "benchmarks/out/splits/{cohort}_{scheme}.tsv"
    wildcard_constraints:
        cohort=_alt(SITE_COHORTS),
        scheme="kfold|fixed|import",
    conda:
        "../envs/genomics.yaml"
    params:
        # the file name's scheme, not config's: splits/fixed.parquet always holds the fixed split
        splits=lambda wc: {**config["splits"], "scheme": wc.scheme},
    script:
        "../workflow/scripts/splits.py"


rule pancancer_merge:
    input:
        cases=lambda wc: expand(
            f"{RESULTS}/{{c}}/clinical/cases.parquet", c=PANCANCER[wc.cohort]
        ),
        pathways=lambda wc: expand(
            f"{RESULTS}/{{c}}/genomics/pathways.parquet", c=PANCANCER[wc.cohort]
        ),
        splits=lambda wc: expand(
            f"{RESULTS}/{{c}}/splits/{SCHEME}.parquet", c=PANCANCER[wc.cohort]
        ),
    output:
        cases=f"{RESULTS}/{{cohort}}/clinical/cases.parquet",
        pathways=f"{RESULTS}/{{cohort}}/genomics/pathways.parquet",
        splits=f"{RESULTS}/{{cohort}}/splits/{SCHEME}.parquet",
    log:
        "logs/pancancer_merge/{cohort}.log",
    benchmark:
        "benchmarks/out/pancancer_merge/{cohort}.tsv"
    wildcard_constraints:
        cohort=_alt(PANCANCER),
    conda:
        "../envs/genomics.yaml"
    params:
        members=lambda wc: PANCANCER[wc.cohort],
    script:
        "../workflow/scripts/pancancer_merge.py"


rule text_targets:
    input:
        cases=f"{RESULTS}/{{cohort}}/clinical/cases.parquet",
        splits=f"{RESULTS}/{{cohort}}/splits/{SCHEME}.parquet",
    output:
        h5=f"{RESULTS}/{{cohort}}/text/fold_{{fold}}.h5",
    log:
        "logs/text_targets/{cohort}_fold_{fold}.log",
    benchmark:
        "benchmarks/out/text_targets/{cohort}_fold_{fold}.tsv"
    conda:
        "../envs/text.yaml"
    resources:
        gpu=1,
    params:
        text=result_settings(config, "text"),
    script:
        "../workflow/scripts/text_targets.py"
