# Summary tables, paired comparisons, plots, failures and throughput tables per cohort.


rule aggregate:
    input:
        metrics=lambda wc: metrics_files(wc.cohort) + ood_metrics_files(wc.cohort),
        histories=lambda wc: history_files(wc.cohort),
        features=lambda wc: feature_files(wc.cohort),
    output:
        md=f"{RESULTS}/{{cohort}}/tables/summary.md",
        csv=f"{RESULTS}/{{cohort}}/tables/summary.csv",
    log:
        "logs/aggregate/{cohort}.log",
    conda:
        "../envs/report.yaml"
    script:
        "../workflow/scripts/aggregate.py"
