# Preflight: every input the cohort's DAG reads is checked before the cohort's first stage (and any GPU
# job) runs. The rule runs once per cohort (no params, no inputs besides a demo cohort's generated sheet):
# rerunning it would rerun every stage after it. Later config or input edits are re-checked by the
# Snakefile's onstart (modaltune.preflight.recheck_preflight), which stops the run before any job.


rule preflight:
    input:
        demo_sheet=lambda wc: (
            [INPUTS[wc.cohort]["sheet"]] if wc.cohort in DEMO_COHORTS else []
        ),
    output:
        json=f"{RESULTS}/{{cohort}}/preflight.json",
    log:
        "logs/preflight/{cohort}.log",
    wildcard_constraints:
        cohort=_alt(SITE_COHORTS),
    conda:
        "../envs/preflight.yaml"
    script:
        "../workflow/scripts/preflight.py"
