"""Snakemake adapter: pathway attribution (token occlusion) of one run on its test patients."""

from pathlib import Path

from modaltune.attribution import pathway_attribution
from modaltune.shards import expand_feature_inputs
from modaltune.workflow import limit_threads, log_to

limit_threads(snakemake.threads)
with log_to(snakemake.log[0]):
    pathway_attribution(
        run_dir=str(Path(snakemake.input.state).parent),
        cases=snakemake.input.cases,
        splits=snakemake.input.splits,
        fold=int(snakemake.params.fold),
        pathways_path=snakemake.input.pathways,
        feature_files=expand_feature_inputs(snakemake.input.features),
        sheet=list(snakemake.input.sheets),
        embeddings_npz=snakemake.input.embeddings,
        task=snakemake.params.task,
        max_patients=snakemake.params.max_patients,
        top=snakemake.params.top,
        out_tsv=snakemake.output.tsv,
        out_png=snakemake.output.png,
        title=f"{snakemake.wildcards.cohort} / {snakemake.wildcards.model}: pathway attribution",
    )
