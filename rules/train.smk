# Per (model, seed, fold) jobs: training on a GPU, then linear-probe evaluation.


rule train:
    input:
        unpack(training_inputs),
    output:
        state=f"{RUN}/state.pt",
        history=f"{RUN}/history.parquet",
        curve=report(
            f"{RUN}/curve.png",
            category="Training",
            subcategory="{model}",
            labels={
                "cohort": "{cohort}",
                "model": "{model}",
                "seed": "{seed}",
                "fold": "{fold}",
            },
            caption="../report/run_curve.rst",
        ),
    log:
        "logs/train/{cohort}/{model}/seed_{seed}_fold_{fold}.log",
    benchmark:
        "benchmarks/out/train/{cohort}/{model}/seed_{seed}_fold_{fold}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        model_cfg=lambda wc: model_config(config, wc.model, wc.cohort),
        train_cfg=result_settings(config, "training"),
        probe_lr=config["probes"].get("lr", "standard"),
    script:
        "../workflow/scripts/train.py"


rule evaluate:
    input:
        unpack(eval_data_inputs),
        state=rules.train.output.state,
    output:
        metrics=f"{RUN}/metrics.json",
        embeddings=f"{RUN}/embeddings.npz",
        predictions=f"{RUN}/predictions.parquet",
    log:
        "logs/evaluate/{cohort}/{model}/seed_{seed}_fold_{fold}.log",
    benchmark:
        "benchmarks/out/evaluate/{cohort}/{model}/seed_{seed}_fold_{fold}.tsv"
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    params:
        probes=result_settings(config, "probes"),
        eval_cohort=lambda wc: wc.cohort,
    script:
        "../workflow/scripts/evaluate.py"


rule evaluate_ood:
    input:
        unpack(eval_data_inputs),
        state=f"{RESULTS}/{{cohort}}/runs/{{model}}/seed_{{seed}}/fold_{{fold}}/state.pt",
    output:
        metrics=f"{RESULTS}/{{eval_cohort}}/ood/{{cohort}}/{{model}}/seed_{{seed}}/fold_{{fold}}/metrics.json",
        embeddings=f"{RESULTS}/{{eval_cohort}}/ood/{{cohort}}/{{model}}/seed_{{seed}}/fold_{{fold}}/embeddings.npz",
        predictions=f"{RESULTS}/{{eval_cohort}}/ood/{{cohort}}/{{model}}/seed_{{seed}}/fold_{{fold}}/predictions.parquet",
    log:
        "logs/evaluate_ood/{eval_cohort}/{cohort}/{model}/seed_{seed}_fold_{fold}.log",
    benchmark:
        "benchmarks/out/evaluate_ood/{eval_cohort}/{cohort}/{model}/seed_{seed}_fold_{fold}.tsv"
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    params:
        probes=result_settings(config, "probes"),
        eval_cohort=lambda wc: wc.eval_cohort,
    script:
        "../workflow/scripts/evaluate.py"
