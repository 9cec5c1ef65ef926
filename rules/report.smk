# Comparison tables, plots, cost and run manifest per cohort; every file is registered for
# `snakemake --report results/report.html` (captions in report/*.rst).


include: "report_common.smk"


rule aggregate:
    input:
        metrics=lambda wc: aggregate_metrics(wc.cohort),
        predictions=lambda wc: prediction_files(wc.cohort),
        histories=lambda wc: history_files(wc.cohort),
        features=lambda wc: feature_files(wc.cohort),
        qc=lambda wc: qc_thumbnails(wc.cohort),
    output:
        md=f"{TABLES}/summary.md",
        csv=report(
            f"{TABLES}/summary.csv",
            category="Tables",
            labels={"table": "linear probes", "cohort": "{cohort}"},
            caption="../report/probe_table.rst",
        ),
        html=report(
            f"{TABLES}/summary.html",
            category="Tables",
            labels={"table": "task tables", "cohort": "{cohort}"},
            caption="../report/task_tables.rst",
        ),
        subtype_csv=report(
            f"{TABLES}/subtype.csv",
            category="Tables",
            labels={"table": "subtype", "cohort": "{cohort}"},
            caption="../report/task_tables.rst",
        ),
        subtype_md=f"{TABLES}/subtype.md",
        survival_csv=report(
            f"{TABLES}/survival.csv",
            category="Tables",
            labels={"table": "survival", "cohort": "{cohort}"},
            caption="../report/task_tables.rst",
        ),
        survival_md=f"{TABLES}/survival.md",
        paired=report(
            f"{TABLES}/paired.csv",
            category="Tables",
            labels={"table": "paired differences", "cohort": "{cohort}"},
            caption="../report/paired.rst",
        ),
        common=report(
            f"{TABLES}/common.csv",
            category="Tables",
            labels={"table": "same test patients", "cohort": "{cohort}"},
            caption="../report/common.rst",
        ),
        summary_png=report(
            f"{PLOTS}/summary.png",
            category="Tables",
            labels={"table": "probe bar chart", "cohort": "{cohort}"},
            caption="../report/probe_table.rst",
        ),
        curves=report(
            f"{PLOTS}/curves.png",
            category="Training",
            labels={"figure": "training curves", "cohort": "{cohort}"},
            caption="../report/curves.rst",
        ),
        km=report(
            f"{PLOTS}/km.png",
            category="Survival",
            labels={"figure": "Kaplan-Meier", "cohort": "{cohort}"},
            caption="../report/km.rst",
        ),
        forest_survival=report(
            f"{PLOTS}/forest_survival.png",
            category="Survival",
            labels={"figure": "paired differences", "cohort": "{cohort}"},
            caption="../report/forest.rst",
        ),
        roc=report(
            f"{PLOTS}/roc.png",
            category="Classification",
            labels={"figure": "ROC", "cohort": "{cohort}"},
            caption="../report/roc.rst",
        ),
        confusion=report(
            f"{PLOTS}/confusion.png",
            category="Classification",
            labels={"figure": "confusion matrices", "cohort": "{cohort}"},
            caption="../report/confusion.rst",
        ),
        forest_subtype=report(
            f"{PLOTS}/forest_subtype.png",
            category="Classification",
            labels={"figure": "paired differences", "cohort": "{cohort}"},
            caption="../report/forest.rst",
        ),
        tiling_qc=report(
            f"{PLOTS}/tiling_qc.png",
            category="QC",
            labels={"item": "tiling thumbnails", "cohort": "{cohort}"},
            caption="../report/tiling_qc.rst",
        ),
        failures=report(
            f"{RESULTS}/{{cohort}}/failures.tsv",
            category="QC",
            labels={"item": "failed slides", "cohort": "{cohort}"},
            caption="../report/failures.rst",
        ),
        throughput=report(
            f"{RESULTS}/{{cohort}}/throughput.tsv",
            category="Cost",
            labels={"item": "tiles/s per slide", "cohort": "{cohort}"},
            caption="../report/throughput.rst",
        ),
    log:
        "logs/aggregate/{cohort}.log",
    benchmark:
        "benchmarks/out/aggregate/{cohort}.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../workflow/scripts/aggregate.py"


rule comparison_tables:
    input:
        metrics=lambda wc: list(
            dict.fromkeys(f for c in report_cohorts() for f in aggregate_metrics(c))
        ),
    output:
        subtype_csv=report(
            f"{RESULTS}/tables/subtype.csv",
            category="Tables",
            labels={"table": "subtype", "cohort": "all cohorts"},
            caption="../report/task_tables.rst",
        ),
        subtype_md=f"{RESULTS}/tables/subtype.md",
        survival_csv=report(
            f"{RESULTS}/tables/survival.csv",
            category="Tables",
            labels={"table": "survival", "cohort": "all cohorts"},
            caption="../report/task_tables.rst",
        ),
        survival_md=f"{RESULTS}/tables/survival.md",
    log:
        "logs/comparison_tables.log",
    conda:
        "../envs/report.yaml"
    script:
        "../workflow/scripts/comparison_tables.py"


rule cost:
    input:
        unpack(lambda wc: benchmark_files(wc.cohort)),
        throughput=f"{RESULTS}/{{cohort}}/throughput.tsv",
        cases=f"{RESULTS}/{{cohort}}/clinical/cases.parquet",
    output:
        tsv=report(
            f"{RESULTS}/{{cohort}}/cost/stages.tsv",
            category="Cost",
            labels={"item": "wall, CPU and GPU hours per stage", "cohort": "{cohort}"},
            caption="../report/cost.rst",
        ),
        md=f"{RESULTS}/{{cohort}}/cost/stages.md",
        rates=f"{RESULTS}/{{cohort}}/cost/rates.json",
    log:
        "logs/cost/{cohort}.log",
    conda:
        "../envs/report.yaml"
    params:
        gpu_rules=lambda wc: gpu_rules(),
        n_slides=lambda wc: n_slides(wc.cohort),
        n_patients=lambda wc: n_patients(wc.cohort),
    script:
        "../workflow/scripts/cost.py"


rule manifest:
    input:
        failures=f"{RESULTS}/{{cohort}}/failures.tsv",
    output:
        json=report(
            f"{RESULTS}/{{cohort}}/manifest.json",
            category="QC",
            labels={"item": "run manifest", "cohort": "{cohort}"},
            caption="../report/manifest.rst",
        ),
    log:
        "logs/manifest/{cohort}.log",
    conda:
        "../envs/report.yaml"
    params:
        # speed-only settings (device, batch size, readers) do not change results: not in the fingerprint
        config=result_config(config),
    script:
        "../workflow/scripts/manifest.py"
