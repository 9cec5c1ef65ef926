"""Snakemake adapter: per-stage wall / CPU / GPU hours and measured rates from the benchmark files."""

from modaltune.cost import cost_report
from modaltune.workflow import log_to

with log_to(snakemake.log[0]):
    cost_report(
        {k.removeprefix("bench_"): list(v) for k, v in snakemake.input.items() if k.startswith("bench_")},
        throughput_tsv=snakemake.input.throughput,
        gpu_stages=snakemake.params.gpu_rules,
        n_slides=snakemake.params.n_slides,
        n_patients=snakemake.params.n_patients,
        out_tsv=snakemake.output.tsv,
        out_md=snakemake.output.md,
        out_rates=snakemake.output.rates,
        cases_parquet=snakemake.input.cases,
    )
