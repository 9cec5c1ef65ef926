"""Preflight: every input of a cohort checked before the DAG runs; composition table; CLI; summary."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from modaltune.cli import main
from modaltune.demo import make_demo_cohort
from modaltune.errors import InputError
from modaltune.preflight import (
    COMPOSITION_COLUMNS,
    format_report,
    load_config,
    preflight_cohort,
    preflight_rule,
    run_summary,
)

ROOT = Path(__file__).resolve().parents[1]
FILES = {"sheet": "cohort_sheet.tsv", "rna": "rna/HiSeqV2_PANCAN.gz", "gene_sets": "genesets/demo.gmt",
         "clinical": "clinical/clinical.tsv", "biospecimen": "biospecimen/slide.tsv"}


def make_cohort(tmp_path_factory) -> Path:
    """A 12-patient demo-layout cohort on disk (small slides: only headers are read here)."""
    root = tmp_path_factory.mktemp("pf_cohort") / "c"
    make_demo_cohort(root, n_patients=12, seed=0, slide_size=(512, 384), workers=1)
    return root


def copy_cohort(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the cohort folder that a test may break."""
    return Path(shutil.copytree(pristine, tmp_path / "c"))


@pytest.fixture(scope="session")
def pristine_cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory)


@pytest.fixture
def cohort(pristine_cohort, tmp_path):
    return copy_cohort(pristine_cohort, tmp_path)


def cohort_config(cdir: Path, models=("abmil",), **overrides) -> dict:
    """The default config with one real (non-demo) cohort ``c`` reading the files under ``cdir``."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["cohorts"] = {"c": {"site": "BRCA", **{k: str(cdir / v) for k, v in FILES.items()}}}
    cfg["run"] = {"cohorts": ["c"], "models": list(models)}
    cfg["results_dir"] = str(cdir.parent / "results")
    for key, val in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **val} if isinstance(val, dict) else val
    return cfg


def check(cfg: dict, *, global_checks: bool = False, **kw):
    return preflight_cohort(copy.deepcopy(cfg), "c", global_checks=global_checks, **kw)


def one_problem(report, *needles):
    """The problem line containing every needle (fails listing them all otherwise)."""
    hits = [p for p in report.problems if all(n in p for n in needles)]
    assert hits, f"no problem with {needles}; problems: {report.problems}"
    return hits[0]


def one_warning(report, *needles):
    hits = [w for w in report.warnings if all(n in w for n in needles)]
    assert hits, f"no warning with {needles}; warnings: {report.warnings}"
    return hits[0]


# ------------------------------------------------------------------------------------------- tests


def test_clean_cohort_passes_with_composition_table(cohort):
    report = check(cohort_config(cohort), global_checks=True)
    assert report.problems == []
    comp = report.composition
    assert list(comp.columns) == COMPOSITION_COLUMNS
    truth = pd.read_csv(cohort / "truth.tsv", sep="\t")
    everyone = comp.iloc[0]
    assert everyone["partition"] == "all" and everyone["patients"] == 12 and everyone["slides"] == 12
    assert everyone["clinical"] == 12 and everyone["events"] == int(truth["event"].sum())
    assert everyone["label"] == int((truth["label"] >= 0).sum())
    assert everyone["rna"] == int(truth["has_rna"].sum())
    # 3 folds x (train, val, test); each fold covers every patient once
    folds = comp.iloc[1:]
    assert len(folds) == 9
    per_fold = folds.assign(fold=folds["partition"].str.split().str[1]).groupby("fold")["patients"].sum()
    assert (per_fold == 12).all()
    text = format_report([report])
    assert "fold 0 test" in text and "0 problem(s)" in text


def test_rule_writes_json_or_raises_with_every_problem(cohort, tmp_path):
    cfg = cohort_config(cohort)
    out = tmp_path / "preflight.json"
    preflight_rule(cfg, "c", out)
    data = json.loads(out.read_text())
    assert data["ok"] and data["composition"][0]["patients"] == 12
    (cohort / "cohort_sheet.tsv").write_text("slide_id\tpatient_id\tpath\n")
    cfg["embedding"]["checkpoint"] = str(tmp_path / "nope.bin")
    out.unlink()
    with pytest.raises(InputError) as err:
        preflight_rule(cfg, "c", out)
    msg = str(err.value)
    assert "problem: cohort sheet" in msg and "no slides" in msg
    assert "problem: config embedding.checkpoint" in msg
    assert not out.exists()


def test_checkpoint_sha256_recorded(cohort, tmp_path):
    import torch

    from modaltune.encoders import build_encoder

    enc = build_encoder("tiny")
    ck = tmp_path / "tiny.pt"
    torch.save(enc.model.state_dict(), ck)
    cfg = cohort_config(cohort, embedding={"checkpoint": str(ck)})
    report = check(cfg, global_checks=True)
    assert report.problems == []
    from modaltune.encoders.base import sha256_file

    assert report.checkpoints["embedding.checkpoint"]["sha256"] == sha256_file(ck)


def test_cli_exit_codes_and_table(cohort, tmp_path, capsys):
    cfg = cohort_config(cohort)
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"cohorts": cfg["cohorts"], "run": cfg["run"]}))
    assert main(["preflight", "--configfile", str(path), "--base-config", str(ROOT / "config/config.yaml"),
                 "--json", str(tmp_path / "pf.json")]) == 0
    out = capsys.readouterr().out
    assert "partition  patients  slides  rna  clinical  label  survival  events" in out
    assert json.loads((tmp_path / "pf.json").read_text())[0]["ok"]
    (cohort / "clinical" / "clinical.tsv").write_text(
        (cohort / "clinical" / "clinical.tsv").read_text().replace("\tDead\t", "\tPassed on\t"))
    with pytest.raises(SystemExit) as err:
        main(["preflight", "--configfile", str(path), "--base-config", str(ROOT / "config/config.yaml")])
    assert err.value.code == 1
    assert "problem: " in capsys.readouterr().out


def test_demo_cohort_preflight_uses_generated_files(pristine_cohort, capsys):
    # a demo cohort whose files exist (here: generated by the fixture under demo_dir/c) is checked as is
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["demo_dir"] = str(pristine_cohort.parent)
    cfg["cohorts"] = {"c": {"site": "BRCA", "demo": {"n_patients": 12, "seed": 0}}}
    cfg["run"] = {"cohorts": ["c"], "models": ["abmil"]}
    report = check(cfg, generate=False)
    assert report.problems == [] and report.composition.iloc[0]["patients"] == 12


def test_demo_cohort_not_generated_checks_config_only(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["demo_dir"] = str(tmp_path / "nowhere")
    cfg["run"]["models"] = ["abmil"]
    report = preflight_cohort(cfg, "demo", generate=False)
    assert report.problems == []
    assert any("not generated yet" in w for w in report.warnings)
    assert not (tmp_path / "nowhere").exists()


def test_load_config_merges_like_snakemake(tmp_path):
    over = tmp_path / "o.yaml"
    over.write_text("run: {models: [abmil]}\ntraining: {epochs: 2}\n")
    cfg = load_config([over], base=ROOT / "config/config.yaml", schema=ROOT / "config/schemas/config.schema.yaml")
    assert cfg["run"]["models"] == ["abmil"] and cfg["run"]["cohorts"] == ["demo"]
    assert cfg["training"]["epochs"] == 2 and cfg["training"]["lr"] == pytest.approx(1e-3)


def _results(tmp_path):
    base = tmp_path / "results" / "c"
    (base / "genomics").mkdir(parents=True)
    (base / "clinical").mkdir()
    (base / "splits").mkdir()
    run = base / "runs" / "abmil" / "seed_0" / "fold_1"
    run.mkdir(parents=True)
    pd.DataFrame({"slide_id": ["S1"], "file": ["f.h5"], "status": ["failed"],
                  "error": ["slide S1: no tissue found"]}).to_csv(base / "failures.tsv", sep="\t", index=False)
    (base / "genomics" / "report.json").write_text(json.dumps(
        {"patients_requested_without_rna": ["P1", "P2"], "matrix": {"n_inf_set_to_nan": 3}}))
    (base / "clinical" / "report.json").write_text(json.dumps({"unknown_diagnoses": {"mucinous": 2}}))
    pd.DataFrame({"fold": [1], "partition": ["test"], "notes": ["no events (all censored): c-index undefined"]}
                 ).to_csv(base / "splits" / "kfold_summary.tsv", sep="\t", index=False)
    (run / "metrics.json").write_text(json.dumps({"subtype_bacc": 0.7, "survival_cindex": None,
                                                  "notes": ["no events in test: c-index not computed"]}))
    return tmp_path / "results"


def test_run_summary_lists_everything_degraded(tmp_path):
    lines = run_summary(_results(tmp_path), ["c", "absent"], logs_dir=tmp_path / "logs")
    text = "\n".join(lines)
    assert "1 slide(s) failed" in text and "no tissue" in text
    assert "2 patient(s) without RNA" in text and "3 inf value(s)" in text
    assert "mucinous" in text
    assert "fold 1 test: no events" in text
    assert "1 run(s): no events in test: c-index not computed: abmil/seed_0/fold_1" in text


def test_run_summary_robust_to_missing_and_broken_files(tmp_path, capsys):
    results = _results(tmp_path)
    (results / "c" / "failures.tsv").write_text("")
    (results / "c" / "genomics" / "report.json").write_text("{truncated")
    logs = tmp_path / "logs" / "preflight"
    logs.mkdir(parents=True)
    (logs / "c.log").write_text("x INFO problem: config embedding.checkpoint: checkpoint a.bin not found\n")
    lines = run_summary(results, ["c"], logs_dir=tmp_path / "logs")
    assert any("preflight c: config embedding.checkpoint" in ln for ln in lines)
    assert not any("without RNA" in ln for ln in lines)
    from modaltune.preflight import print_run_summary

    print_run_summary(tmp_path / "none", ["c"], logs_dir=tmp_path / "none")
    assert "nothing skipped or degraded" in capsys.readouterr().err


def test_preflight_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import modaltune.preflight, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_onstart_recheck_after_an_edit(cohort, tmp_path):
    from modaltune.preflight import recheck_preflight

    cfg = cohort_config(cohort)
    results = Path(cfg["results_dir"])
    cache = tmp_path / "cache"
    assert recheck_preflight(cfg, results, ["c"], cache_dir=cache) == []  # not preflighted yet: the rule will
    preflight_rule(cfg, "c", results / "c" / "preflight.json")
    assert recheck_preflight(cfg, results, ["c"], cache_dir=cache) == []  # nothing changed
    clinical = cohort / "clinical" / "clinical.tsv"
    good = clinical.read_text()
    clinical.write_text(good.replace("\tDead\t", "\tPassed on\t", 1))
    with pytest.raises(InputError, match=r"problem: cohort c: .*clinical\.tsv: field vital_status"):
        recheck_preflight(cfg, results, ["c"], cache_dir=cache)
    clinical.write_text(good)
    cfg["training"]["epochs"] = 3  # a config edit is re-checked too
    assert recheck_preflight(cfg, results, ["c"], cache_dir=cache) == ["c"]
    assert recheck_preflight(cfg, results, ["c"], cache_dir=cache) == []  # cached
