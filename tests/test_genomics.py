"""Tests for the RNA side: Xena reading and sample choice (xena), gene sets (genesets), the pathways
stage (genomics) and the fold-wise GeneScaler (gene_scaler)."""

from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pandas as pd
import pytest

from modaltune.errors import InputError, LeakageError
from modaltune.gene_scaler import GeneScaler, ids_hash
from modaltune.genesets import read_gene_sets
from modaltune.genomics import build_pathways, load_pathways, pathway_index_groups
from modaltune.xena import choose_samples, read_xena


def _write_xena(path, genes, samples, values, gz=False, header_name="sample"):
    lines = ["\t".join([header_name, *samples])]
    for g, row in zip(genes, values, strict=True):
        lines.append("\t".join([g, *(str(v) for v in row)]))
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


SAMPLES = [
    "TCGA-AA-0001-11",
    "TCGA-AA-0001-01",
    "TCGA-AA-0002-02",
    "TCGA-AA-0003-01A",
    "TCGA-AA-0003-01B",
    "TCGA-AA-0004-11",
]
GENES = ["TP53", "?|100130426", "IL8", "EGFR", "EGFR", "MYC", "KRAS"]


@pytest.fixture
def xena(tmp_path):
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(len(GENES), len(SAMPLES))).round(4)
    vals[4] *= 10  # second EGFR row has the larger variance -> kept
    vals[5, 2] = np.nan
    vals[6, 3] = np.inf
    rows = [[("NA" if np.isnan(v) else ("inf" if np.isinf(v) else v)) for v in r] for r in vals]
    return _write_xena(tmp_path / "HiSeqV2_PANCAN", GENES, SAMPLES, rows, gz=True), vals


@pytest.fixture
def gmt(tmp_path):
    p = tmp_path / "sets.gmt"
    p.write_text("HALLMARK_A\tdesc\tTP53\tCXCL8\tEGFR\nREACT_B\thttp://x\tMYC\tEGFR\tNOTAGENE\n")
    return p


def test_read_xena_gzip_sniffed_prefix_duplicates_inf(xena):
    path, vals = xena
    df = read_xena(path)  # no .gz suffix: sniffed
    assert list(df.columns) == SAMPLES
    assert "100130426" in df.index and "?|100130426" not in df.index
    assert df.index.is_unique and df.shape[0] == 6
    np.testing.assert_allclose(df.loc["EGFR"].to_numpy(), vals[4])  # highest-variance copy kept
    rep = df.attrs["read_report"]
    assert rep["n_duplicate_gene_ids"] == 1 and rep["duplicate_gene_ids"] == ["EGFR"]
    assert rep["n_inf_set_to_nan"] == 1
    assert np.isnan(df.loc["KRAS", "TCGA-AA-0003-01A"]) and np.isnan(df.loc["MYC", "TCGA-AA-0002-02"])
    assert rep["n_nan"] == 2


def test_read_xena_plain_equals_gzip(tmp_path):
    rows = [[1.0, 2.0], [3.0, 4.5]]
    a = read_xena(_write_xena(tmp_path / "a.gz", ["A", "B"], ["s1", "s2"], rows))
    b = read_xena(_write_xena(tmp_path / "b.tsv", ["A", "B"], ["s1", "s2"], rows, gz=True))
    pd.testing.assert_frame_equal(a, b)


def test_read_xena_bad_shapes(tmp_path):
    p = tmp_path / "noheader.tsv"
    p.write_text("TP53\t1.0\t2.0\nEGFR\t3.0\t4.0\n")
    with pytest.raises(InputError, match="header"):
        read_xena(p)
    t = _write_xena(
        tmp_path / "transposed.tsv",
        ["TCGA-AA-0001-01", "TCGA-AA-0002-01"],
        ["TP53", "EGFR"],
        [[1, 2], [3, 4]],
    )
    with pytest.raises(InputError, match="transpose"):
        read_xena(t)
    one = tmp_path / "one.tsv"
    one.write_text("sample\nTP53\n")
    with pytest.raises(InputError, match="one.tsv"):
        read_xena(one)
    txt = _write_xena(tmp_path / "txt.tsv", ["A"], ["s1", "s2"], [["1.0", "high"]])
    with pytest.raises(InputError, match="non-numeric"):
        read_xena(txt)


def test_ensembl_ids_against_symbol_sets(tmp_path, gmt):
    ens = _write_xena(
        tmp_path / "ens.tsv",
        [f"ENSG0000014{i:04d}.5" for i in range(5)] + ["TP53"],
        ["TCGA-AA-0001-01"],
        [[1.0]] * 6,
    )
    with pytest.raises(InputError, match="Ensembl"):
        build_pathways(ens, gmt, tmp_path / "p.parquet", tmp_path / "r.json")


def test_choose_samples_rules():
    ids = [
        "TCGA-AA-0001-11",
        "TCGA-AA-0001-01",
        "TCGA-AA-0002-02",
        "TCGA-AA-0003-01B",
        "TCGA-AA-0003-01A",
        "TCGA-AA-0004-11",
        "TCGA-AA-0005-06",
        "TCGA-AA-0005-03",
    ]
    ch = choose_samples(ids).set_index("patient_id")
    assert ch.loc["TCGA-AA-0001", "sample_id"] == "TCGA-AA-0001-01"  # tumour over the earlier normal
    assert ch.loc["TCGA-AA-0002", "sample_id"] == "TCGA-AA-0002-02"  # recurrent when nothing else
    assert ch.loc["TCGA-AA-0003", "sample_id"] == "TCGA-AA-0003-01A"
    assert "tie" in ch.loc["TCGA-AA-0003", "reason"]
    assert pd.isna(ch.loc["TCGA-AA-0004", "sample_id"])  # normal only -> none
    assert ch.loc["TCGA-AA-0005", "sample_id"] == "TCGA-AA-0005-03"  # 03 ranks before 06
    assert pd.isna(choose_samples(["TCGA-AA-0006-50"]).loc[0, "sample_id"])  # cell line: not a tumour sample
    assert ch.loc["TCGA-AA-0001", "n_candidates"] == 2
    with_normal = choose_samples(ids, allow_normal=True).set_index("patient_id")
    assert with_normal.loc["TCGA-AA-0004", "sample_id"] == "TCGA-AA-0004-11"
    assert with_normal.loc["TCGA-AA-0001", "sample_id"] == "TCGA-AA-0001-01"
    custom = choose_samples(ids, preference=("06", "03")).set_index("patient_id")
    assert custom.loc["TCGA-AA-0005", "sample_id"] == "TCGA-AA-0005-06"


def test_choose_samples_non_tcga_and_map():
    ch = choose_samples(["P1_rna", "P2_rna", "P2_rna_rep"])
    assert list(ch["patient_id"]) == ["P1_rna", "P2_rna", "P2_rna_rep"]
    mapped = choose_samples(
        ["P1_rna", "P2_rna", "P2_rna_rep"], sample_map={"P1_rna": "P1", "P2_rna": "P2", "P2_rna_rep": "P2"}
    )
    m = mapped.set_index("patient_id")
    assert list(m.index) == ["P1", "P2"] and m.loc["P2", "sample_id"] == "P2_rna"
    assert m.loc["P2", "n_candidates"] == 2


def test_read_gene_sets_gmt_and_csv(tmp_path, gmt):
    sets = read_gene_sets(gmt)
    assert sets == {"HALLMARK_A": ["TP53", "CXCL8", "EGFR"], "REACT_B": ["MYC", "EGFR", "NOTAGENE"]}
    csvp = tmp_path / "combine_comps.csv"
    csvp.write_text("gene,P1,HALLMARK_X\nTP53,1,0\nEGFR,1,1\nMYC,0,1\n")
    assert read_gene_sets(csvp) == {"P1": ["TP53", "EGFR"], "HALLMARK_X": ["EGFR", "MYC"]}
    bad = tmp_path / "bad.csv"
    bad.write_text("gene,P1\nTP53,2\n")
    with pytest.raises(InputError, match="0/1"):
        read_gene_sets(bad)
    badgmt = tmp_path / "bad.gmt"
    badgmt.write_text("ONLYNAME\n")
    with pytest.raises(InputError, match="line 1"):
        read_gene_sets(badgmt)


def test_build_pathways_alias_report_and_parquet(tmp_path, xena, gmt):
    path, vals = xena
    out, rep_path = tmp_path / "g" / "pathways.parquet", tmp_path / "g" / "report.json"
    report = build_pathways(
        path, gmt, out, rep_path, patients=["TCGA-AA-0001", "TCGA-AA-0003", "TCGA-ZZ-9999"]
    )
    df, groups = load_pathways(out)
    # CXCL8 in the set, IL8 in the matrix: matched through the alias; EGFR shared -> one column
    assert groups == {"HALLMARK_A": ["TP53", "IL8", "EGFR"], "REACT_B": ["MYC", "EGFR"]}
    assert [c for c in df.columns if c != "sample_id"] == ["TP53", "IL8", "EGFR", "MYC"]
    assert all(df[c].dtype == np.float32 for c in ["TP53", "IL8", "EGFR", "MYC"])
    assert list(df.index) == ["TCGA-AA-0001", "TCGA-AA-0003"] and df.index.name == "patient_id"
    assert df.loc["TCGA-AA-0001", "sample_id"] == "TCGA-AA-0001-01"
    np.testing.assert_allclose(df.loc["TCGA-AA-0001", "IL8"], vals[2, 1], rtol=1e-6)
    saved = json.loads(rep_path.read_text())
    assert saved["pathways"]["HALLMARK_A"]["aliased"] == {"CXCL8": "IL8"}
    assert saved["pathways"]["REACT_B"]["missing"] == ["NOTAGENE"]
    assert saved["patients_requested_without_rna"] == ["TCGA-ZZ-9999"]
    assert saved["matrix"]["n_duplicate_gene_ids"] == 1
    assert {r["patient_id"] for r in saved["patients_without_usable_sample"]} == {"TCGA-AA-0004"}
    assert report["n_genes"] == 4
    assert pathway_index_groups(list(df.columns), groups) == [[0, 1, 2], [3, 2]]


def test_user_alias_table(tmp_path, gmt):
    x = _write_xena(tmp_path / "x.tsv", ["TP53", "IL8", "EGFR", "OLDMYC"], ["s1", "s2"], [[1, 2]] * 4)
    plain = build_pathways(x, gmt, tmp_path / "p.parquet", tmp_path / "r.json")
    assert plain["pathways"]["REACT_B"]["missing"] == ["MYC", "NOTAGENE"]
    al = tmp_path / "alias.tsv"
    al.write_text("old\tnew\nOLDMYC\tMYC\n")
    rep = build_pathways(x, gmt, tmp_path / "p.parquet", tmp_path / "r.json", alias_table=al)
    assert rep["pathways"]["REACT_B"]["aliased"] == {"MYC": "OLDMYC"}
    assert rep["groups"]["REACT_B"] == ["OLDMYC", "EGFR"]


def test_pathway_without_genes(tmp_path, xena):
    path, _ = xena
    sets = tmp_path / "s.gmt"
    sets.write_text("GOOD\td\tTP53\nEMPTY_ONE\td\tFOO\tBAR\n")
    with pytest.raises(InputError) as err:
        build_pathways(path, sets, tmp_path / "p.parquet", tmp_path / "r.json")
    assert "EMPTY_ONE" in str(err.value) and "s.gmt" in str(err.value)
    assert not (tmp_path / "p.parquet").exists()
    rep = build_pathways(path, sets, tmp_path / "p.parquet", tmp_path / "r.json", min_genes_per_pathway=0)
    assert rep["dropped_pathways_without_genes"] == ["EMPTY_ONE"] and list(rep["groups"]) == ["GOOD"]


def test_scaler_fit_on_train_only_and_state_roundtrip():
    rng = np.random.default_rng(1)
    genes = ["g1", "g2", "g3"]
    train = pd.DataFrame(rng.normal(5, 2, size=(50, 3)), columns=genes, index=[f"T{i}" for i in range(50)])
    train["g3"] = 7.0  # constant gene -> std 1
    val = pd.DataFrame(rng.normal(9, 2, size=(20, 3)), columns=genes, index=[f"V{i}" for i in range(20)])
    train["sample_id"] = "x"
    sc = GeneScaler().fit(train)
    zt, zv = sc.transform(train), sc.transform(val)
    assert zt.dtype == np.float32
    np.testing.assert_allclose(zt.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(zt[:, :2].std(axis=0), 1, atol=1e-5)
    assert np.all(zv[:, 0].mean() > 1.0)  # val is shifted: not centred by a train-only fit
    assert sc.fitted_on(train.index) and not sc.fitted_on(list(train.index) + list(val.index))
    assert sc.fitted_ids_sha256 == ids_hash(reversed(train.index))
    with pytest.raises(LeakageError):
        sc.check_fitted_on(list(train.index) + ["V0"])
    state = json.loads(json.dumps(sc.state_dict()))  # plain lists survive JSON
    sc2 = GeneScaler.from_state_dict(state)
    np.testing.assert_array_equal(sc2.transform(val), zv)
    both = pd.concat([train, val])
    assert not np.allclose(GeneScaler().fit(both).transform(val), zv)


def test_scaler_nan_inf():
    df = pd.DataFrame({"a": [1.0, 3.0, np.nan, np.inf], "b": [np.nan] * 4}, index=list("wxyz"))
    sc = GeneScaler().fit(df)
    assert sc.mean[0] == pytest.approx(2.0) and sc.std[0] == pytest.approx(1.0)
    assert sc.counts["fit_n_inf"] == 1 and sc.counts["fit_all_nan_genes"] == 1
    z = sc.transform(df)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, 0], [-1, 1, 0, 0])
    np.testing.assert_allclose(z[:, 1], 0)
    assert sc.counts["transform_n_inf"] == 1 and sc.counts["transform_n_nan"] == 5


def test_no_torch_import():
    import subprocess

    code = "import sys, modaltune.genomics, modaltune.splits; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_gse7390_end_to_end_cox(tmp_path):
    """Real expression data (GSE7390 via scikit-survival): pathways -> train-only scaling -> Cox C-index."""
    sksurv_datasets = pytest.importorskip("sksurv.datasets")
    from lifelines import CoxPHFitter
    from lifelines.utils import concordance_index
    from sklearn.model_selection import train_test_split

    x, y = sksurv_datasets.load_breast_cancer()
    probes = [c for c in x.columns if c.startswith("X")]
    samples = [f"GSE7390_{i:03d}" for i in range(len(x))]
    rna = tmp_path / "gse7390.tsv"
    expr = x[probes].to_numpy(dtype=float).T
    _write_xena(rna, probes, samples, expr.round(5).tolist(), header_name="probe")
    gmt = tmp_path / "groups.gmt"
    gmt.write_text("".join(f"GROUP_{k}\tprobe chunk\t" + "\t".join(probes[k::8]) + "\n" for k in range(8)))
    build_pathways(rna, gmt, tmp_path / "p.parquet", tmp_path / "r.json")
    df, groups = load_pathways(tmp_path / "p.parquet")
    assert len(df) == len(x) and len(groups) == 8
    time = pd.Series(y["t.tdm"], index=samples)
    event = pd.Series(y["e.tdm"].astype(int), index=samples)
    train_ids, test_ids = train_test_split(samples, test_size=0.3, random_state=0, stratify=event)
    scaler = GeneScaler().fit(df.loc[train_ids])
    assert scaler.fitted_on(train_ids) and not scaler.fitted_on(samples)
    idx = pathway_index_groups(list(df.columns), groups)

    def scores(ids):
        z = scaler.transform(df.loc[ids])
        return pd.DataFrame({f"pw{k}": z[:, cols].mean(axis=1) for k, cols in enumerate(idx)}, index=ids)

    tr = scores(train_ids).assign(T=time[train_ids], E=event[train_ids])
    cph = CoxPHFitter(penalizer=0.1).fit(tr, duration_col="T", event_col="E")
    te = scores(test_ids)
    risk = cph.predict_partial_hazard(te).to_numpy()
    cidx = concordance_index(time[test_ids], -risk, event[test_ids])
    assert np.isfinite(cidx) and cidx > 0.5


def test_universe_excludes_constant_genes(tmp_path, gmt):
    x = _write_xena(tmp_path / "x.tsv", ["TP53", "IL8", "EGFR", "MYC"], ["s1", "s2"], [[1, 2]] * 4)
    uni = _write_xena(
        tmp_path / "ebpp.xena",
        ["?|7157", "TP53", "IL8", "EGFR", "MYC"],
        ["a", "b", "c"],
        [[1, 2, 3], [1, 2, 3], [4, 5, 6], [0.5, 0.5, 0.5], [1, 1, 2]],
    )
    rep = build_pathways(x, gmt, tmp_path / "p.parquet", tmp_path / "r.json", universe_path=uni)
    assert rep["groups"] == {"HALLMARK_A": ["TP53", "IL8"], "REACT_B": ["MYC"]}  # EGFR constant pan-cancer
    assert rep["universe"]["n_constant_or_empty"] == 1


def test_membership_csv_with_saved_index(tmp_path):
    p = tmp_path / "gene_pathway_processed_v2.csv"
    p.write_text(",gene,P1,P2\n0,TP53,1,0\n1,IL8,1,1\n")
    assert read_gene_sets(p) == {"P1": ["TP53", "IL8"], "P2": ["IL8"]}
