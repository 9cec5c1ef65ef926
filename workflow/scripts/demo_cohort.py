"""Snakemake adapter: write the built-in demo cohort."""

from modaltune.demo import make_demo_cohort
from modaltune.workflow import log_to

with log_to(snakemake.log[0]):
    make_demo_cohort(snakemake.params.out_dir, n_patients=snakemake.params.n_patients, seed=snakemake.params.seed)
