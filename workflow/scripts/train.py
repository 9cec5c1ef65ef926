"""Snakemake adapter: train one (model, seed, fold)."""

from pathlib import Path

from modaltune.settings import job_settings
from modaltune.shards import expand_feature_inputs
from modaltune.training import train_run
from modaltune.workflow import limit_threads, log_to

limit_threads(snakemake.threads)
with log_to(snakemake.log[0]):
    train_run(
        model_name=snakemake.wildcards.model,
        model_cfg=snakemake.params.model_cfg,
        train_cfg=job_settings(snakemake.params.train_cfg, snakemake.config, "training"),
        cases_path=snakemake.input.cases,
        splits_path=snakemake.input.splits,
        fold=int(snakemake.wildcards.fold),
        seed=int(snakemake.wildcards.seed),
        pathways_path=snakemake.input.pathways,
        feature_files=expand_feature_inputs(snakemake.input.features),
        sheet=list(snakemake.input.sheets),
        text_h5=snakemake.input.get("text"),
        out_dir=str(Path(snakemake.output.state).parent),
        cohort=snakemake.wildcards.cohort,
        probe_lr=snakemake.params.probe_lr,
    )
