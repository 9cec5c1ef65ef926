"""Snakemake adapter: label prompts -> text embeddings for one fold."""

from modaltune.settings import job_settings
from modaltune.text import build_text_targets
from modaltune.workflow import limit_threads, log_to

limit_threads(snakemake.threads)
with log_to(snakemake.log[0]):
    build_text_targets(
        snakemake.input.cases,
        snakemake.input.splits,
        int(snakemake.wildcards.fold),
        snakemake.output.h5,
        **job_settings(snakemake.params.text, snakemake.config, "text"),
    )
