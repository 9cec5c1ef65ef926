"""Snakemake adapter: Xena RNA-seq matrix -> pathway-grouped gene table."""

from modaltune.genomics import build_pathways
from modaltune.workflow import log_to

with log_to(snakemake.log[0]):
    build_pathways(
        snakemake.input.rna,
        snakemake.input.gene_sets,
        snakemake.output.parquet,
        snakemake.output.report,
        patients=snakemake.params.patients,
        **snakemake.params.genomics,
    )
