"""Snakemake adapter: embed one slide's tiles into a features HDF5."""

from modaltune.embedding import embed_slide
from modaltune.workflow import limit_threads, log_to

limit_threads(snakemake.threads)
with log_to(snakemake.log[0]):
    embed_slide(snakemake.input.tiles, snakemake.output.h5, **snakemake.params.embedding)
