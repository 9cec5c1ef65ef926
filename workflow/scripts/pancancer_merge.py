"""Snakemake adapter: union of site cohorts into one pan-cancer cohort."""

from modaltune.pancancer import merge_cohorts
from modaltune.workflow import log_to

with log_to(snakemake.log[0]):
    merge_cohorts(
        dict(zip(snakemake.params.members, snakemake.input.cases, strict=True)),
        dict(zip(snakemake.params.members, snakemake.input.pathways, strict=True)),
        dict(zip(snakemake.params.members, snakemake.input.splits, strict=True)),
        out_cases=snakemake.output.cases,
        out_pathways=snakemake.output.pathways,
        out_splits=snakemake.output.splits,
    )
