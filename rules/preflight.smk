# Preflight: every input the cohort's DAG reads is checked before the first job (and any GPU job) runs.


rule preflight:
    input:
        unpack(lambda wc: INPUTS[wc.cohort]),
        imports=split_import_inputs,
    output:
        json=f"{RESULTS}/{{cohort}}/preflight.json",
    log:
        "logs/preflight/{cohort}.log",
    wildcard_constraints:
        cohort=_alt(SITE_COHORTS),
    conda:
        "../envs/preflight.yaml"
    params:
        # digest of the whole config: any edit reruns the checks (seconds; later stages are not rerun)
        config_sha=config_digest(config),
    script:
        "../workflow/scripts/preflight.py"
