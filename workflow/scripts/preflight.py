"""Snakemake adapter: check every input of one cohort before its first stage runs."""

from modaltune.preflight import preflight_rule
from modaltune.workflow import log_to

with log_to(snakemake.log[0]):
    preflight_rule(dict(snakemake.config), snakemake.wildcards.cohort, snakemake.output.json)
