"""End to end: the whole DAG on a reduced demo cohort in a temporary folder, as a user runs it.

The run itself is the session fixture ``demo_run`` (tests/conftest.py). Tests that delete, force or
touch files work on ``demo_copy``, so every test sees the finished run whatever the order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

# The profile's rerun triggers (profiles/slurm/config.yaml): reruns follow data and params, not code mtimes.
TRIGGERS = ("--rerun-triggers", "mtime", "params", "input")


@pytest.mark.slow
def test_demo_dag_writes_summary_with_metrics_above_chance(demo_run):
    tables = demo_run / "results/demo/tables"
    summary = pd.read_csv(tables / "summary.csv")
    assert set(summary["model"]) >= {"modaltune", "snn"}
    md = (tables / "summary.md").read_text()
    assert "modaltune" in md and "±" in md
    metrics = [json.loads(p.read_text()) for p in (demo_run / "results/demo/runs").glob("*/seed_*/fold_*/metrics.json")]
    assert len(metrics) == 4
    for m in metrics:
        assert 0.0 <= m["subtype_bacc"] <= 1.0
    mt = summary.set_index("model").loc["modaltune"]
    # The demo plants class signal in slides and RNA: a working pipeline is clearly above chance.
    assert mt["subtype_bacc_mean"] > 0.7, summary.to_string()
    # Survival: the planted hazard is found by at least one model's probe (20 test patients per fold
    # make a single model's C-index noisy), and every C-index is a valid concordance.
    assert summary["survival_cindex_mean"].max() > 0.55, summary.to_string()
    assert summary["survival_cindex_mean"].dropna().between(0, 1).all()


@pytest.mark.slow
def test_fresh_clone_mtimes_schedule_nothing_with_profile(demo_copy, planned_jobs):
    # A fresh clone gives every tracked file (scripts, rules, config) a new mtime.
    for part in ("Snakefile", "rules", "workflow", "config", "test_config.yaml"):
        for f in [demo_copy / part] if (demo_copy / part).is_file() else (demo_copy / part).rglob("*"):
            f.touch()
    assert planned_jobs(demo_copy, "--profile", "profiles/slurm") == {}
    assert planned_jobs(demo_copy) == {}  # profiles/default applies the same triggers to plain runs


@pytest.mark.slow
def test_deleting_one_output_reruns_only_that_job(demo_copy, planned_jobs, snakemake):
    run = demo_copy / "results/demo/runs/snn/seed_0/fold_0"
    (run / "metrics.json").unlink()
    target = str((run / "metrics.json").relative_to(demo_copy))
    # Only the evaluation is redone: its training run, text targets and slides are reused.
    assert planned_jobs(demo_copy, target, *TRIGGERS) == {"evaluate": 1}
    res = snakemake(demo_copy, "-c1", target, *TRIGGERS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "metrics.json").exists()
    # the cost table and the manifest read aggregate's throughput / failures tables
    assert planned_jobs(demo_copy, "--forcerun", "aggregate", *TRIGGERS) == {"aggregate": 1, "cost": 1,
                                                                            "manifest": 1, "all": 1}


@pytest.mark.slow
def test_rerun_one_slide_and_one_run_alone(demo_copy, planned_jobs, snakemake):
    # The demo runs sharded (slides_per_job 16): a shard reruns only its missing slide.
    manifest = demo_copy / "results/demo/features/tiny/shards/0.tsv"
    slide = sorted((demo_copy / "results/demo/features/tiny/shards/0").glob("*.h5"))[0]
    before = {p: p.stat().st_mtime_ns for p in (demo_copy / "results").rglob("*.h5") if p != slide}
    slide.unlink()
    target = str(manifest.relative_to(demo_copy))
    assert planned_jobs(demo_copy, target, "--forcerun", "slide_shard", *TRIGGERS) == {"slide_shard": 1}
    res = snakemake(demo_copy, "-c1", target, "--forcerun", "slide_shard", *TRIGGERS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert slide.exists()
    changed = [p for p in before if p.stat().st_mtime_ns != before[p]]
    assert changed == []  # every other slide's tiles and features were kept, not recomputed

    run = "results/demo/runs/snn/seed_0/fold_1/state.pt"
    assert planned_jobs(demo_copy, run, "--force", *TRIGGERS) == {"train": 1}


@pytest.mark.slow
def test_report_of_the_demo_renders_in_chromium(demo_run, snakemake, tmp_path):
    """`snakemake --report` after the demo: the front page shows the task tables, Kaplan-Meier and a heatmap."""
    from tests.browser_helpers import check_report_page, chromium, render

    chromium()
    res = snakemake(demo_run, "--report", str(tmp_path / "report.html"))  # outside results/: the run stays as it was
    assert res.returncode == 0, res.stderr[-5000:]
    page = render(tmp_path / "report.html", tmp_path)
    # heatmaps are a DAG stage once a rule registers files under the Heatmaps category
    has_heatmaps = any('category="Heatmaps"' in f.read_text() for f in (demo_run / "rules").glob("*.smk"))
    check_report_page(page, heatmap=has_heatmaps)
    assert "snn" in page["text"] and "Sections:" in page["text"]
    for cat in ("Tables", "Survival", "Classification", "Training", "QC", "Cost"):
        assert cat in page["text"], cat  # every category is in the navigation


# Settings that change only speed, never results (modaltune.settings.SPEED_ONLY); a GPU node changes them.
SPEED_CHANGES = {
    "embedding": {"batch_size": 7, "num_workers": 3, "device": "cpu", "channels_last": True},
    "tiling": {"on_error": "raise"},
    "text": {"device": "cpu", "batch_size": 5},
    "training": {"num_workers": 2, "device": "cpu"},
}


def _with(work: Path, name: str, overrides: dict) -> tuple[str, ...]:
    base = yaml.safe_load((work / "test_config.yaml").read_text())
    (work / name).write_text(yaml.safe_dump({**base, **overrides}))
    return ("--configfile", name)


@pytest.mark.slow
def test_speed_only_settings_schedule_nothing(demo_run, planned_jobs):
    from modaltune.settings import SPEED_ONLY

    assert {b: set(v) for b, v in SPEED_CHANGES.items()} == {b: set(v) for b, v in SPEED_ONLY.items()}
    for block, changes in SPEED_CHANGES.items():
        default = yaml.safe_load((demo_run / "config/config.yaml").read_text())[block]
        cfg = _with(demo_run, f"speed_{block}.yaml", {block: {**default, **changes}})
        assert planned_jobs(demo_run, *cfg, *TRIGGERS) == {}, (block, changes)
    # The control: a result-changing setting of the same blocks does reschedule its jobs.
    emb = yaml.safe_load((demo_run / "config/config.yaml").read_text())["embedding"]
    cfg = _with(demo_run, "result_embedding.yaml", {"embedding": {**emb, "precision": "fp32"}})
    assert planned_jobs(demo_run, *cfg, *TRIGGERS).get("slide_shard", 0) > 0
    train = yaml.safe_load((demo_run / "config/config.yaml").read_text())["training"]
    cfg = _with(demo_run, "result_training.yaml", {"training": {**train, "lr": 0.5}})
    assert planned_jobs(demo_run, *cfg, *TRIGGERS).get("train", 0) == 4


IGNORED = (".snakemake", "logs", "benchmarks")


@pytest.mark.slow
def test_every_result_file_is_a_declared_output(demo_run, snakemake):
    """Each file under results/ is a declared output of a job of the DAG (or inside a declared
    directory output); ``snakemake --summary`` lists the DAG's declared outputs."""
    res = snakemake(demo_run, "--summary")
    assert res.returncode == 0, res.stderr[-3000:]
    declared = set()
    for line in res.stdout.splitlines()[1:]:
        path = line.split("\t")[0].strip()
        if path:
            declared.add(Path(path).as_posix())
    assert any(p.endswith("summary.md") for p in declared), res.stdout[:2000]
    dirs = [d for d in declared if (demo_run / d).is_dir()]
    written = [p.relative_to(demo_run).as_posix() for p in (demo_run / "results").rglob("*") if p.is_file()]
    assert written
    undeclared = sorted(
        p for p in written
        if p not in declared and not any(p.startswith(d.rstrip("/") + "/") for d in dirs)
        and not re.match(rf"^({'|'.join(IGNORED)})/", p)
    )
    assert not undeclared, f"{len(undeclared)} file(s) under results/ no job declares: {undeclared[:20]}"
