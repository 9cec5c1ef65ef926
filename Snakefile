# ModalTune workflow: WSI tiling -> patch embedding -> RNA pathways -> clinical table + text targets
# -> splits -> per-fold training -> linear-probe evaluation -> summary tables.
# The default config runs the built-in demo cohort; see README.md for your own cohort and SLURM.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schemas/config.schema.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/preflight.smk"
include: "rules/slides.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/report.smk"
include: "rules/heatmaps_common.smk"
include: "rules/heatmaps.smk"


rule all:
    input:
        all_targets(),


# Before any job: cohorts already preflighted are checked again when the config or an input changed.
onstart:
    recheck_preflight(config, RESULTS, SITE_COHORTS)


# End of run: everything skipped or degraded (failed slides, RNA/clinical notes, one-class or no-event
# partitions, empty metrics), read from the reports that exist.
onsuccess:
    print_run_summary(RESULTS, SUMMARY_COHORTS, status="finished")


onerror:
    print_run_summary(RESULTS, SUMMARY_COHORTS, status="failed")
