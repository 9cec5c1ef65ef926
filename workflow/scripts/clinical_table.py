"""Snakemake adapter: GDC clinical + biospecimen exports -> one row per patient."""

from modaltune.clinical import build_clinical_table
from modaltune.workflow import log_to

with log_to(snakemake.log[0]):
    build_clinical_table(
        snakemake.input.clinical,
        snakemake.input.biospecimen or None,
        snakemake.output.parquet,
        cohort=snakemake.params.site,
        label_map=snakemake.params.label_map,
        sheet=snakemake.input.sheet or None,
        rna_parquet=snakemake.input.rna,
        report_path=snakemake.output.report,
    )
