"""Snakemake adapter: embed one slide's tiles (or import its existing features) into a features HDF5.

Result-changing settings come as params, speed-only ones (batch size, readers, device) from the config.
"""

from modaltune.feature_import import slide_features
from modaltune.settings import job_settings
from modaltune.workflow import limit_threads, log_to

limit_threads(snakemake.threads)
with log_to(snakemake.log[0]):
    slide_features(
        snakemake.output.h5,
        job_settings(snakemake.params.embedding, snakemake.config, "embedding"),
        tiles_h5=getattr(snakemake.input, "tiles", None),
        imported=(list(getattr(snakemake.input, "imported", [])) or [None])[0],
        slide_path=snakemake.input.slide,
        slide_id=snakemake.wildcards.slide,
    )
