"""Snakemake adapter: the run manifest of one cohort."""

from modaltune.manifest import write_manifest
from modaltune.workflow import log_to

with log_to(snakemake.log[0]):
    write_manifest(
        dict(snakemake.params.config),
        snakemake.output.json,
        workflow_dir=snakemake.params.workflow_dir,
        failures_tsv=snakemake.input.failures,
    )
