"""Snakemake adapter: tile + embed a shard of slides into the shard's folder, write its manifest."""

from pathlib import Path

from modaltune.settings import job_settings
from modaltune.shards import run_shard
from modaltune.workflow import limit_threads, log_to

limit_threads(snakemake.threads)
with log_to(snakemake.log[0]):
    out = Path(snakemake.output.slides)
    run_shard(
        snakemake.params.slides,
        snakemake.output.manifest,
        tiles_dir=str(out / "tiles"),
        features_dir=str(out),
        tiling=job_settings(snakemake.params.tiling, snakemake.config, "tiling"),
        embedding=job_settings(snakemake.params.embedding, snakemake.config, "embedding"),
    )
