"""Snakemake adapter: tile + embed a shard of slides, write the shard's manifest."""

from modaltune.shards import run_shard
from modaltune.workflow import limit_threads, log_to

limit_threads(snakemake.threads)
with log_to(snakemake.log[0]):
    run_shard(
        snakemake.params.slides,
        snakemake.output.manifest,
        tiles_dir=snakemake.params.tiles_dir,
        features_dir=snakemake.params.features_dir,
        tiling=snakemake.params.tiling,
        embedding=snakemake.params.embedding,
    )
