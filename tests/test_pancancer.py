"""Pan-cancer cohorts: union of site cohorts (cases, pathway tables, splits), and its DAG targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from modaltune.errors import InputError, LeakageError
from modaltune.genomics import load_pathways
from modaltune.pancancer import merge_cohorts

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {"p1": ["g1", "g2"], "p2": ["g3"]}


def _site(tmp: Path, name: str, site: str, prefix: str, genes=("g1", "g2", "g3")):
    ids = [f"{prefix}{i}" for i in range(6)]
    cases = pd.DataFrame({"patient_id": ids, "site": site, "label": [0, 1] * 3,
                          "survival_months": range(1, 7), "event": [1, 0] * 3})
    cases.to_parquet(tmp / f"{name}_cases.parquet", index=False)
    genes_df = pd.DataFrame({g: [float(i) for i in range(6)] for g in genes}, index=pd.Index(ids, name="patient_id"))
    genes_df["sample_id"] = [f"{i}-01" for i in ids]
    table = pa.Table.from_pandas(genes_df, preserve_index=True)
    meta = {**(table.schema.metadata or {}), b"modaltune.groups": json.dumps(GROUPS).encode()}
    pq.write_table(table.replace_schema_metadata(meta), tmp / f"{name}_genes.parquet")
    parts = ["train", "train", "train", "train", "val", "test"]
    pd.DataFrame({"patient_id": ids, "fold": 0, "partition": parts}).to_parquet(tmp / f"{name}_splits.parquet")
    return {k: str(tmp / f"{name}_{k}.parquet") for k in ("cases", "genes", "splits")}


def _merge(tmp, a, b):
    out = {k: str(tmp / f"pan_{k}.parquet") for k in ("cases", "pathways", "splits")}
    merge_cohorts({"A": a["cases"], "B": b["cases"]}, {"A": a["genes"], "B": b["genes"]},
                  {"A": a["splits"], "B": b["splits"]}, out_cases=out["cases"], out_pathways=out["pathways"],
                  out_splits=out["splits"])
    return out


def test_union_keeps_each_site_and_its_splits(tmp_path):
    out = _merge(tmp_path, _site(tmp_path, "a", "BRCA", "A"), _site(tmp_path, "b", "NSCLC", "B"))
    cases = pd.read_parquet(out["cases"])
    assert len(cases) == 12 and set(cases["site"]) == {"BRCA", "NSCLC"}
    genes, groups = load_pathways(out["pathways"])
    assert groups == GROUPS and len(genes) == 12
    splits = pd.read_parquet(out["splits"]).set_index("patient_id")
    assert splits.loc["B5", "partition"] == "test" and splits.loc["B5", "site"] == "NSCLC"
    assert splits.loc["A0", "site"] == "BRCA"


def test_union_rejects_other_genes_and_shared_patients(tmp_path):
    a = _site(tmp_path, "a", "BRCA", "A")
    with pytest.raises(InputError, match="same gene-set file"):
        _merge(tmp_path, a, _site(tmp_path, "b", "NSCLC", "B", genes=("g1", "g2", "g3", "g5")))
    with pytest.raises((InputError, LeakageError), match="A0|several"):
        _merge(tmp_path, a, _site(tmp_path, "c", "NSCLC", "A"))


def test_union_needs_the_same_folds_and_consistent_sites(tmp_path):
    a, b = _site(tmp_path, "a", "BRCA", "A"), _site(tmp_path, "b", "NSCLC", "B")
    two_folds = pd.concat([pd.read_parquet(b["splits"]), pd.read_parquet(b["splits"]).assign(fold=1)])
    two_folds.to_parquet(b["splits"])
    with pytest.raises(InputError, match="different folds"):
        _merge(tmp_path, a, b)
    pd.read_parquet(b["splits"]).query("fold == 0").assign(site="BRCA").to_parquet(b["splits"])
    with pytest.raises(InputError, match="site column"):
        _merge(tmp_path, a, b)
    assert not (tmp_path / "pan_cases.parquet").exists()


def test_pancancer_and_ood_are_dag_targets(tmp_path):
    cfg = {
        "cohorts": {"demo": {"site": "BRCA", "demo": {"n_patients": 12, "seed": 0}},
                    "demo2": {"site": "BRCA", "demo": {"n_patients": 12, "seed": 1}}},
        "pancancer": {"PAN": ["demo", "demo2"]},
        "ood": [{"train": "demo", "eval": "demo2", "models": ["snn"]}],
        "run": {"cohorts": ["PAN"], "models": ["modaltune", "snn"]},
    }
    (tmp_path / "pan.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(tmp_path / "pan.yaml"),
                          "--directory", str(ROOT)], cwd=ROOT, capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "rule pancancer_merge:" in out and "results/PAN/clinical/cases.parquet" in out
    assert "rule evaluate_ood:" in out and "results/demo2/ood/demo/snn/seed_0/fold_0/metrics.json" in out
    assert "results/PAN/tables/summary.md" in out and "results/demo2/tables/summary.md" in out
