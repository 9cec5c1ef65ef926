"""Snakemake adapter: the subtype and survival tables over every evaluation cohort."""

from pathlib import Path

from modaltune.aggregate import comparison_tables
from modaltune.workflow import log_to

with log_to(snakemake.log[0]):
    comparison_tables(list(snakemake.input.metrics), str(Path(snakemake.output.subtype_csv).parent.parent))
