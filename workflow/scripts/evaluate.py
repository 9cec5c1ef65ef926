"""Snakemake adapter: linear probes on a trained run's embeddings (in-distribution or OOD)."""

from pathlib import Path

from modaltune.evaluation import evaluate_run
from modaltune.shards import expand_feature_inputs
from modaltune.workflow import limit_threads, log_to

limit_threads(snakemake.threads)
with log_to(snakemake.log[0]):
    evaluate_run(
        run_dir=str(Path(snakemake.input.state).parent),
        cases_path=snakemake.input.cases,
        splits_path=snakemake.input.splits,
        fold=int(snakemake.wildcards.fold),
        pathways_path=snakemake.input.pathways,
        feature_files=expand_feature_inputs(snakemake.input.features),
        sheet=list(snakemake.input.sheets),
        out_metrics=snakemake.output.metrics,
        out_embeddings=snakemake.output.embeddings,
        out_predictions=snakemake.output.predictions,
        probe_cfg=snakemake.params.probes,
        eval_cohort=snakemake.params.eval_cohort,
    )
