"""Snakemake adapter: tissue detection + grid for one slide."""

from modaltune.settings import job_settings
from modaltune.tiling import tile_slide
from modaltune.workflow import log_to

with log_to(snakemake.log[0]):
    tile_slide(
        snakemake.input.slide,
        snakemake.output.h5,
        slide_id=snakemake.wildcards.slide,
        mpp_override=snakemake.params.mpp,
        qc_png=snakemake.output.qc,
        **job_settings(snakemake.params.tiling, snakemake.config, "tiling"),
    )
