"""Snakemake adapter: the run manifest of one cohort (the workflow's folder gives the git commit)."""

from pathlib import Path

from modaltune.manifest import write_manifest
from modaltune.workflow import log_to

with log_to(snakemake.log[0]):
    write_manifest(
        dict(snakemake.params.config),
        snakemake.output.json,
        workflow_dir=str(Path(snakemake.scriptdir).parents[1]),
        failures_tsv=snakemake.input.failures,
    )
