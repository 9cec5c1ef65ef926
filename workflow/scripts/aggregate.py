"""Snakemake adapter: task tables, probe summary, paired comparisons and plots for one cohort."""

from pathlib import Path

from modaltune.aggregate import aggregate, qc_thumbnails
from modaltune.shards import expand_feature_inputs
from modaltune.workflow import log_to

with log_to(snakemake.log[0]):
    aggregate(
        list(snakemake.input.metrics),
        str(Path(snakemake.output.md).parent.parent),
        feature_files=expand_feature_inputs(snakemake.input.features),
        history_files=list(snakemake.input.histories),
        prediction_files=list(snakemake.input.predictions),
        qc_images=qc_thumbnails(list(snakemake.input.features), list(snakemake.input.qc)),
    )
