# The built-in demo cohort: deterministic synthetic slides, Xena RNA, GMT and GDC tables.
for _cohort in demo_cohorts(config):

    rule:
        name:
            f"demo_cohort_{_cohort}"
        output:
            **INPUTS[_cohort],
            slides=SHEETS[_cohort]["path"].tolist(),
        log:
            f"logs/demo_cohort/{_cohort}.log",
        conda:
            "../envs/tiling.yaml"
        params:
            out_dir=lambda wildcards, output: str(Path(output.sheet).parent),
            n_patients=int(config["cohorts"][_cohort]["demo"].get("n_patients", 40)),
            seed=int(config["cohorts"][_cohort]["demo"].get("seed", 0)),
        script:
            "../workflow/scripts/demo_cohort.py"
