"""Tests for modaltune.splits: schemes, stratification, leakage checks, imports (the pan-cancer union
is tested in test_pancancer.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from modaltune.errors import InputError, LeakageError
from modaltune.splits import check_no_leakage, make_splits, partition_summary


def _cases(n=120, seed=0, site="BRCA", prefix="TCGA-AA"):
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}-{i:04d}" for i in range(n)]
    label = rng.choice([0, 1], size=n, p=[0.7, 0.3])
    label[:10] = -1  # diagnoses outside the subtype task
    has_rna = np.ones(n, bool)
    has_rna[10:22] = False
    n_slides = rng.integers(1, 4, size=n)
    n_slides[22:25] = 0
    return pd.DataFrame(
        {
            "patient_id": ids,
            "site": site,
            "label": label,
            "survival_months": rng.uniform(1, 100, n),
            "event": rng.integers(0, 2, n),
            "has_rna": has_rna,
            "n_slides": n_slides,
        }
    )


@pytest.fixture
def cases_path(tmp_path):
    p = tmp_path / "cases.parquet"
    _cases().to_parquet(p, index=False)
    return p


def test_kfold_folds_stratification_nonrelevant_train(tmp_path, cases_path):
    cases = _cases()
    df = make_splits(
        cases_path,
        tmp_path / "s.parquet",
        scheme="kfold",
        n_folds=5,
        seed=3,
        summary_path=tmp_path / "summary.tsv",
    )
    assert list(df.columns) == ["patient_id", "fold", "partition", "site", "flags"]
    assert sorted(df["fold"].unique()) == [0, 1, 2, 3, 4]
    assert (df.groupby("fold").size() == len(cases)).all()  # one row per patient per fold
    relevant = set(cases.loc[cases["has_rna"] & (cases["label"] >= 0), "patient_id"])
    tests = df[df["partition"] == "test"]
    assert set(tests["patient_id"]) == relevant and not tests["patient_id"].duplicated().any()
    nonrel = df[~df["patient_id"].isin(relevant)]
    assert (nonrel["partition"] == "train").all()
    # stratified: each test fold's class-1 fraction near the overall one
    lab = cases.set_index("patient_id")["label"]
    overall = (lab[list(relevant)] == 1).mean()
    for _, g in tests.groupby("fold"):
        assert abs((lab[g["patient_id"]] == 1).mean() - overall) < 0.1
    vals = df[df["partition"] == "val"]
    assert set(vals["patient_id"]) <= relevant and len(vals) > 0
    flags = df[df["fold"] == 0].set_index("patient_id")["flags"]
    assert flags["TCGA-AA-0010"] == "no_rna" and flags["TCGA-AA-0022"] == "no_slides"
    assert "no_label" in flags["TCGA-AA-0000"]
    summary = pd.read_csv(tmp_path / "summary.tsv", sep="\t")
    assert len(summary) == 15
    s0 = summary[(summary["fold"] == 0) & (summary["partition"] == "train")].iloc[0]
    assert (
        s0["n_missing_rna"] == 12
        and s0["n_patients"] == (df[(df.fold == 0) & (df.partition == "train")]).shape[0]
    )


def test_deterministic_and_seed_dependent(tmp_path, cases_path):
    a = make_splits(cases_path, tmp_path / "a.parquet", seed=1)
    b = make_splits(cases_path, tmp_path / "b.parquet", seed=1)
    c = make_splits(cases_path, tmp_path / "c.parquet", seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a.parquet"), a)


def test_fixed_scheme_matches_paper_rule(tmp_path, cases_path):
    from sklearn.model_selection import train_test_split

    cases = _cases()
    df = make_splits(cases_path, tmp_path / "f.parquet", scheme="fixed", seed=0)
    assert set(df["fold"]) == {0} and len(df) == len(cases)
    rel = cases[cases["has_rna"] & (cases["label"] >= 0)].sort_values("patient_id")
    _, test = train_test_split(
        rel["patient_id"].to_numpy(), test_size=0.2, random_state=0, stratify=rel["label"]
    )
    assert set(df.loc[df["partition"] == "test", "patient_id"]) == set(test)
    n_rest = len(rel) - len(test)
    assert (df["partition"] == "val").sum() == int(np.ceil(0.15 * n_rest))


def test_patient_level_slides_together(tmp_path, cases_path):
    """Imported slide-level splits are resolved to patients: two slides of one patient in different
    partitions of a fold are a leak, not two samples."""
    folder = tmp_path / "clam"
    folder.mkdir()
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("slide_id\tpatient_id\tpath\nslideA\tTCGA-AA-0005\ta.svs\nslideB\tTCGA-AA-0005\tb.svs\n")
    split = pd.DataFrame({"train": ["slideA", "TCGA-AA-0007"], "val": ["TCGA-AA-0008", None],
                          "test": ["slideB", None]})
    split.to_csv(folder / "splits_0.csv")
    with pytest.raises(LeakageError, match="TCGA-AA-0005"):
        make_splits(cases_path, tmp_path / "imp.parquet", scheme="import", import_path=folder, sheet=sheet)
    assert not (tmp_path / "imp.parquet").exists()
    split.assign(train=["slideA", "slideB"], test=[None, None]).to_csv(folder / "splits_0.csv")
    df = make_splits(cases_path, tmp_path / "imp.parquet", scheme="import", import_path=folder, sheet=sheet)
    assert (df.loc[df["patient_id"] == "TCGA-AA-0005", "partition"] == "train").all()
    assert df.duplicated(["fold", "patient_id"]).sum() == 0


def test_leakage_error_on_crafted_split():
    df = pd.DataFrame(
        {"patient_id": ["P1", "P2", "P1"], "fold": [0, 0, 0], "partition": ["train", "test", "test"]}
    )
    with pytest.raises(LeakageError, match="P1.*fold 0"):
        check_no_leakage(df)
    ok = pd.DataFrame({"patient_id": ["P1", "P1"], "fold": [0, 1], "partition": ["train", "test"]})
    check_no_leakage(ok)


def _modaltune_json(folder, part, records):
    folder.mkdir(exist_ok=True)
    (folder / f"{part}_brca_cls_feat.json").write_text(json.dumps({"data": records}).replace('"NaNX"', "NaN"))


def test_import_modaltune_json(tmp_path, cases_path):
    folder = tmp_path / "json_splits"
    rec = lambda c, s: {"case_submitter_id": c, "slide_submitter_id": s, "durations": "NaNX"}  # noqa: E731
    _modaltune_json(
        folder,
        "train",
        [
            rec("TCGA-AA-0001", "TCGA-AA-0001-01Z-00-DX1"),
            rec("TCGA-AA-0001", "TCGA-AA-0001-01Z-00-DX2"),
            rec("TCGA-AA-0002", "x"),
        ],
    )
    _modaltune_json(folder, "val", [rec("TCGA-AA-0003", "y")])
    _modaltune_json(folder, "test", [rec("TCGA-AA-0004", "z"), rec("TCGA-ZZ-9999", "w")])
    out = tmp_path / "splits" / "import.parquet"
    df = make_splits(cases_path, out, scheme="import", import_path=folder)
    part = df.set_index("patient_id")["partition"]
    assert part.to_dict() == {
        "TCGA-AA-0001": "train",
        "TCGA-AA-0002": "train",
        "TCGA-AA-0003": "val",
        "TCGA-AA-0004": "test",
    }
    rep = json.loads((tmp_path / "splits" / "import.import.json").read_text())
    assert rep["unknown_ids"] == ["TCGA-ZZ-9999"]
    assert len(rep["patients_not_in_split"]) == 120 - 4
    # two slides of one patient in train and test -> stop before writing
    _modaltune_json(folder, "test", [rec("TCGA-AA-0001", "TCGA-AA-0001-01Z-00-DX2")])
    bad = tmp_path / "bad.parquet"
    with pytest.raises(LeakageError, match="TCGA-AA-0001"):
        make_splits(cases_path, bad, scheme="import", import_path=folder)
    assert not bad.exists()


def test_import_clam_csv_slides_and_patients(tmp_path, cases_path):
    folder = tmp_path / "clam"
    folder.mkdir()
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("slide_id\tpatient_id\tpath\nslideA\tTCGA-AA-0005\ta.svs\nslideB\tTCGA-AA-0006\tb.svs\n")
    for k in range(2):
        pd.DataFrame(
            {
                "train": ["slideA", "TCGA-AA-0007-01Z-00-DX1", "TCGA-AA-0008"],
                "val": ["slideB" if k == 0 else "TCGA-AA-0009", None, None],
                "test": ["TCGA-AA-0010" if k == 0 else "slideB", "mystery", None],
            }
        ).to_csv(folder / f"splits_{k}.csv")
    df = make_splits(cases_path, tmp_path / "imp.parquet", scheme="import", import_path=folder, sheet=sheet)
    assert sorted(df["fold"].unique()) == [0, 1]
    f0 = df[df.fold == 0].set_index("patient_id")["partition"]
    assert f0.to_dict() == {
        "TCGA-AA-0005": "train",
        "TCGA-AA-0007": "train",
        "TCGA-AA-0008": "train",
        "TCGA-AA-0006": "val",
        "TCGA-AA-0010": "test",
    }
    f1 = df[df.fold == 1].set_index("patient_id")["partition"]
    assert f1["TCGA-AA-0006"] == "test" and f1["TCGA-AA-0009"] == "val"
    rep = json.loads((tmp_path / "imp.import.json").read_text())
    assert rep["unknown_ids"] == ["mystery"] and rep["matched_via"]["slide_sheet"] == 4


def test_bad_inputs(tmp_path, cases_path):
    with pytest.raises(InputError, match="scheme"):
        make_splits(cases_path, tmp_path / "x.parquet", scheme="random")
    with pytest.raises(InputError, match="not found"):
        make_splits(tmp_path / "none.parquet", tmp_path / "x.parquet")
    broken = tmp_path / "broken.parquet"
    _cases().drop(columns=["label"]).to_parquet(broken)
    with pytest.raises(InputError, match="label"):
        make_splits(broken, tmp_path / "x.parquet")
    with pytest.raises(InputError, match="import_path"):
        make_splits(cases_path, tmp_path / "x.parquet", scheme="import")


def test_partition_summary_counts():
    cases = _cases()
    splits = pd.DataFrame(
        {
            "patient_id": cases["patient_id"],
            "fold": 0,
            "partition": np.where(np.arange(len(cases)) % 4 == 0, "test", "train"),
        }
    )
    s = partition_summary(cases, splits).set_index("partition")
    test_ids = cases[np.arange(len(cases)) % 4 == 0]
    assert s.loc["test", "n_patients"] == len(test_ids)
    assert s.loc["test", "n_class_1"] == (test_ids["label"] == 1).sum()
    assert s.loc["test", "n_events"] == test_ids["event"].sum()


def test_survival_only_cohort_kfold(tmp_path):
    cases = _cases(n=80)
    cases["label"] = -1
    p = tmp_path / "surv.parquet"
    cases.to_parquet(p, index=False)
    df = make_splits(p, tmp_path / "s.parquet", n_folds=4)
    tests = df[df.partition == "test"]
    assert set(tests["patient_id"]) == set(cases.loc[cases.has_rna, "patient_id"])
    ev = cases.set_index("patient_id")["event"]
    overall = ev[cases.loc[cases.has_rna, "patient_id"]].mean()
    for _, g in tests.groupby("fold"):
        assert abs(ev[g["patient_id"]].mean() - overall) < 0.1


# --------------------------------------------------------------------------- small cohorts (issue 15)


def _demo_cases(n_patients, seed=0):
    from modaltune.demo import _layout

    lay = _layout(n_patients, seed)
    return lay.assign(site="BRCA")[["patient_id", "label", "event", "has_rna", "n_slides", "site"]]


@pytest.mark.parametrize("n_patients", [16, 24, 28, 32, 36])
def test_kfold_small_demo_cohorts_split(tmp_path, n_patients):
    # these sizes stopped in the val carve-out with scikit-learn's "test_size = 3 should be greater or
    # equal to the number of classes = 4" (label x event strata)
    cases = _demo_cases(n_patients)
    df = make_splits(cases, tmp_path / "s.parquet", scheme="kfold", n_folds=3, val_fraction=0.15, seed=0)
    relevant = set(cases.loc[cases["has_rna"] & (cases["label"] >= 0), "patient_id"])
    for _, g in df.groupby("fold"):
        assert len(g) == len(cases)
        val = g[g["partition"] == "val"]
        assert len(val) >= 1 and set(val["patient_id"]) <= relevant
        train = g[g["partition"] == "train"]
        assert set(cases.set_index("patient_id").loc[train["patient_id"], "label"]) >= {0, 1}
    tests = df[df["partition"] == "test"]
    assert set(tests["patient_id"]) == relevant and not tests["patient_id"].duplicated().any()


def test_fixed_split_tiny_cohort_falls_back(tmp_path):
    df = make_splits(_demo_cases(16), tmp_path / "s.parquet", scheme="fixed", seed=0)
    assert set(df["partition"]) == {"train", "val", "test"}


def test_too_few_patients_for_val_is_clear(tmp_path):
    cases = _demo_cases(12).assign(has_rna=False)
    cases.loc[:1, "has_rna"] = True  # two patients: one per test fold leaves one to train, none for val
    with pytest.raises(InputError, match="val_fraction"):
        make_splits(cases, tmp_path / "s.parquet", scheme="kfold", n_folds=2, val_fraction=0.15, seed=0)


def test_summary_notes_say_why_metrics_are_empty(tmp_path, caplog):
    cases = _cases(n=60)
    cases["event"] = 0  # all censored: every c-index undefined
    with caplog.at_level("WARNING", logger="modaltune.splits"):
        make_splits(cases, tmp_path / "s.parquet", scheme="kfold", n_folds=3, seed=0,
                    summary_path=tmp_path / "summary.tsv")
    summary = pd.read_csv(tmp_path / "summary.tsv", sep="\t", keep_default_na=False)
    test_rows = summary[summary["partition"] == "test"]
    assert test_rows["notes"].str.contains("no events").all()
    assert "fold 0 test: no events (all censored): c-index undefined" in caplog.text
