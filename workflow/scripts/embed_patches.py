"""Snakemake adapter: embed one slide's tiles into a features HDF5.

Result-changing settings come as params, speed-only ones (batch size, readers, device) from the config.
"""

from modaltune.embedding import embed_slide
from modaltune.settings import job_settings
from modaltune.workflow import limit_threads, log_to

limit_threads(snakemake.threads)
with log_to(snakemake.log[0]):
    embed_slide(
        snakemake.input.tiles,
        snakemake.output.h5,
        **job_settings(snakemake.params.embedding, snakemake.config, "embedding"),
    )
