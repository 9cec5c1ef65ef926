# ModalTune workflow: WSI tiling -> patch embedding -> RNA pathways -> clinical table + text targets
# -> splits -> per-fold training -> linear-probe evaluation -> summary tables.
# The default config runs the built-in demo cohort; see README.md for your own cohort and SLURM.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/slides.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/report.smk"
include: "rules/heatmaps_common.smk"
include: "rules/heatmaps.smk"


rule all:
    input:
        all_targets(),
