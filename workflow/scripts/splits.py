"""Snakemake adapter: patient-level splits with leakage checks."""

from modaltune.splits import make_splits
from modaltune.workflow import log_to

with log_to(snakemake.log[0]):
    make_splits(
        snakemake.input.cases,
        snakemake.output.parquet,
        sheet=snakemake.input.sheet or None,
        summary_path=snakemake.output.summary,
        **snakemake.params.splits,
    )
