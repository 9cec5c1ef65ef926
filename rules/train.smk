# Per (model, seed, fold) jobs: training on a GPU, then linear-probe evaluation.


rule train:
    input:
        unpack(training_inputs),
    output:
        state=f"{run_dir()}/state.pt",
        history=f"{run_dir()}/history.parquet",
    params:
        model_cfg=lambda wc: config["models"][wc.model],
        train_cfg=config["training"],
    resources:
        gpu=1,
    threads: 2
    log:
        "logs/train/{cohort}/{model}/seed_{seed}_fold_{fold}.log",
    benchmark:
        "benchmarks/out/train/{cohort}/{model}/seed_{seed}_fold_{fold}.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/train.py"


rule evaluate:
    input:
        unpack(eval_data_inputs),
        state=rules.train.output.state,
    output:
        metrics=f"{run_dir()}/metrics.json",
        embeddings=f"{run_dir()}/embeddings.npz",
    params:
        probes=config["probes"],
        eval_cohort=lambda wc: wc.cohort,
    resources:
        gpu=1,
    log:
        "logs/evaluate/{cohort}/{model}/seed_{seed}_fold_{fold}.log",
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/evaluate.py"


rule evaluate_ood:
    input:
        unpack(eval_data_inputs),
        state=f"{RESULTS}/{{cohort}}/runs/{{model}}/seed_{{seed}}/fold_{{fold}}/state.pt",
    output:
        metrics=f"{RESULTS}/{{eval_cohort}}/ood/{{cohort}}/{{model}}/seed_{{seed}}/fold_{{fold}}/metrics.json",
        embeddings=f"{RESULTS}/{{eval_cohort}}/ood/{{cohort}}/{{model}}/seed_{{seed}}/fold_{{fold}}/embeddings.npz",
    params:
        probes=config["probes"],
        eval_cohort=lambda wc: wc.eval_cohort,
    resources:
        gpu=1,
    log:
        "logs/evaluate_ood/{eval_cohort}/{cohort}/{model}/seed_{seed}_fold_{fold}.log",
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/evaluate.py"
