"""Heatmaps: tile scores (C5), h5/GeoJSON/PNG outputs, DAG-time selection, pathway attribution, and a trained
ABMIL whose attention finds the demo's planted regions."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from modaltune import demo, heatmap_plan, heatmaps
from modaltune.attribution import head_output, occlusion_scores
from modaltune.errors import InputError
from modaltune.models import ModelDims, build_model
from modaltune.models.gene_encoder import PathwayTowers
from modaltune.models.modaltune import demo_config

ROOT = Path(__file__).resolve().parents[1]
GROUPS = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9]]
DIMS = ModelDims(feature_dim=16, n_genes=10, pathway_groups=GROUPS, clinical_dim=3, n_classes=2, n_bins=4)
ARCHS = {
    "abmil": ({"hidden": 16, "attn_dim": 8}, {"attention"}),
    "transmil": ({"hidden": 16, "num_heads": 2}, {"attention"}),
    "mcat": ({"dim": 16, "num_heads": 2, "n_layers": 1, "objective": "survival"}, {"coattention"}),
    "survpath": ({"dim": 16, "objective": "survival"}, {"attention"}),
    "late_fusion": ({"objective": "survival", "slide": {"hidden": 16}}, {"attention"}),
    "modaltune": ({**demo_config(), "use_clinical": True}, {"general", "diagnosis", "survival", "modal_tokens"}),
}


def _batch(n=12, pad_from=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = {"features": torch.randn(2, n, 16, generator=g), "coords": torch.randint(0, 3000, (2, n, 2), generator=g).float(),
         "patch_mask": torch.ones(2, n, dtype=torch.bool), "genes": torch.randn(2, 10, generator=g),
         "has_genes": torch.tensor([True, False]), "clinical": torch.randn(2, 3, generator=g),
         "has_clinical": torch.tensor([True, True])}
    b["patch_mask"][1, pad_from:] = False
    return b


def _model(arch):
    torch.manual_seed(0)
    return build_model(arch, dict(ARCHS[arch][0]), DIMS).eval()


# ------------------------------------------------------------------------------------------ tile scores
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tile_scores_shape_and_no_score_on_padding(arch):
    model, batch = _model(arch), _batch()
    scores = model.tile_scores(batch)
    assert set(scores) == ARCHS[arch][1]
    for name, s in scores.items():
        assert s.shape == (2, 12), name
        assert torch.isfinite(s[0]).all() and torch.isfinite(s[1, :7]).all(), name
        assert torch.isnan(s[1, 7:]).all(), f"{arch}/{name}: padded tiles must get no score"
        assert (s[1, :7] >= 0).all()
        if arch in ("abmil", "late_fusion", "mcat", "modaltune"):
            # softmax weights over the patient's real tiles (ABMIL, co-attention, extractor queries)
            assert s[1, :7].sum().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tile_scores_do_not_depend_on_padding(arch):
    # Patient 1 alone (no padding) vs inside a padded batch with its padding moved in between its tiles:
    # the real tiles keep their scores, in the batch's order.
    model, batch = _model(arch), _batch()
    alone = {k: (v[1:2, :7] if k in ("features", "coords", "patch_mask") else v[1:2]) for k, v in batch.items()}
    ref = model.tile_scores(alone)
    order = torch.tensor([0, 7, 1, 2, 8, 3, 4, 9, 10, 5, 11, 6])  # real tiles 0..6 at these new positions
    mixed = dict(batch)
    for k in ("features", "coords", "patch_mask"):
        mixed[k] = batch[k][:, order]
    got = model.tile_scores(mixed)
    real = mixed["patch_mask"][1]
    for name in ref:
        assert torch.isnan(got[name][1, ~real]).all()
        np.testing.assert_allclose(got[name][1, real].numpy(), ref[name][0].numpy(), rtol=1e-4, atol=1e-6)


def test_abmil_tile_scores_follow_the_tiles():
    model, batch = _model("abmil"), _batch()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    shuffled = {**batch, "features": batch["features"][:, perm], "patch_mask": torch.ones(2, 12, dtype=torch.bool)}
    full = {**batch, "patch_mask": torch.ones(2, 12, dtype=torch.bool)}
    np.testing.assert_allclose(model.tile_scores(shuffled)["attention"].numpy(),
                               model.tile_scores(full)["attention"][:, perm].numpy(), rtol=1e-5)


# ------------------------------------------------------------------------------------------ writers
def test_geojson_is_a_closed_polygon_per_tile_matching_coords():
    coords = np.array([[0, 0], [512, 0], [1024, 512]])
    scores = np.array([0.2, 0.5, np.nan])
    gj = json.loads(json.dumps(heatmaps.geojson_features(coords, 512.0, scores, "attention")))
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 3
    for f, (x, y), v in zip(gj["features"], coords, scores, strict=True):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        ring = f["geometry"]["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1], "polygon ring must be closed"
        assert ring[0] == [x, y] and ring[2] == [x + 512, y + 512]
        m = f["properties"]["measurements"]["attention"]
        assert (m is None) if np.isnan(v) else m == pytest.approx(v)
        assert f["properties"]["objectType"] == "tile"


def test_percentile_rank():
    p = heatmaps.percentile_rank(np.array([3.0, np.nan, 1.0, 2.0]))
    assert p[0] == 100 and p[2] == 0 and p[3] == 50 and np.isnan(p[1])


def test_rank_test_slides_picks_test_patients_by_risk(tmp_path):
    pred = pd.DataFrame({"patient_id": ["A", "B", "C", "D", "E"], "partition": ["test", "test", "train", "test", "test"],
                         "risk": [0.1, 2.0, 9.0, np.nan, 1.0]})
    sheet = pd.DataFrame({"slide_id": ["a1", "b1", "b2", "c1", "d1", "e1"], "patient_id": list("ABBCDE")})
    assert [r[0] for r in heatmaps.rank_test_slides(pred, sheet, 2, "high")] == ["b1", "e1"]
    assert [r[0] for r in heatmaps.rank_test_slides(pred, sheet, 1, "low")] == ["a1"]
    assert len(heatmaps.rank_test_slides(pred, sheet, 10, "high")) == 3  # C is train, D has no risk
    with pytest.raises(InputError):
        heatmaps.rank_test_slides(pred, sheet, 1, "middle")


# ------------------------------------------------------------------------------------------ attribution
class _OnePathwayModel(torch.nn.Module):
    """Risk depends on pathway token 2 only; pathways 1 and 2 share gene 4 in the groups below."""

    objective = "survival"

    def __init__(self, groups):
        super().__init__()
        self.towers = PathwayTowers(groups, latent_dim=8, dropout=0.0)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, batch):
        tok = self.towers(batch["genes"])
        return {"embedding": tok.mean(1), "hazards": self.head(tok[:, 2])}


def test_occlusion_finds_the_only_pathway_the_model_reads():
    torch.manual_seed(0)
    groups = [[0, 1, 2], [3, 4], [4, 5, 6, 7], [8, 9]]
    model = _OnePathwayModel(groups).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"genes": 2 * torch.randn(1, 10, generator=g), "patient_id": [f"P{i}"]} for i in range(6)]
    d = occlusion_scores(model, batches, head_output("survival"), chunk=3)
    assert d.shape == (6, 4)
    score = np.abs(d).mean(0)
    assert score[2] > 0
    # Token occlusion: pathway 1 shares gene 4 with pathway 2 but its token is not read -> exactly 0.
    np.testing.assert_array_equal(score[[0, 1, 3]], 0.0)


def test_occlusion_rejects_models_without_pathway_tokens():
    with pytest.raises(InputError, match="pathway"):
        occlusion_scores(_model("abmil"), [_batch()], head_output("classification"))


# ------------------------------------------------------------------------------------------ DAG selection
def _dry_run(tmp_path, heat: dict, *extra) -> subprocess.CompletedProcess:
    cfg = {"cohorts": {"demo": {"site": "BRCA", "demo": {"n_patients": 16, "seed": 0}}},
           "run": {"cohorts": ["demo"], "models": ["abmil", "modaltune", "mcat"]},
           "splits": {"scheme": "fixed"}, "heatmaps": heat}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
           "--configfile", str(ROOT / "config/config.yaml"), str(tmp_path / "c.yaml"), *extra]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_dag_draws_only_the_selected_slides_and_slots(tmp_path):
    # A pretend predictions table (C2) so that the risk-ranked slots can be planned without a run.
    pred = tmp_path / "results/demo/runs/abmil/seed_0/fold_0/predictions.parquet"
    pred.parent.mkdir(parents=True)
    pd.DataFrame({"patient_id": ["x"], "partition": ["test"], "risk": [0.0]}).to_parquet(pred)
    res = _dry_run(tmp_path, {"models": ["abmil"], "slides": ["TCGA-D0-A005-01Z-00-DX1"], "risk_high": 2,
                              "attribution": {"models": ["mcat"]}})
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert out.count("rule heatmap:") == 1 and "slide=TCGA-D0-A005-01Z-00-DX1" in out
    assert out.count("rule heatmap_risk_high:") == 1 and "heatmap_risk_low" not in out
    for i in (1, 2):
        assert f"heatmaps/abmil/ranked/high_{i}.png" in out
    assert "heatmaps/abmil/ranked/high_3" not in out
    assert out.count("rule pathway_attribution:") == 1 and "attribution/mcat/pathways.tsv" in out
    assert "heatmaps/modaltune" not in out and "attribution/modaltune" not in out


def test_dag_rejects_unknown_slide_and_model_without_tile_scores(tmp_path):
    res = _dry_run(tmp_path, {"models": ["abmil"], "slides": ["NOPE-1"]})
    msg = res.stdout + res.stderr
    assert res.returncode != 0 and "heatmaps.slides" in msg and "NOPE-1" in msg
    plan = {"models": {"snn": {"arch": "snn"}}}
    with pytest.raises(InputError, match="tile scores"):
        heatmap_plan.heatmap_plan({**plan, "heatmaps": {"models": ["snn"]}}, {}, ["snn"], [0], [0])
    with pytest.raises(InputError, match="heatmaps.fold"):
        heatmap_plan.heatmap_plan({"models": {"abmil": {"arch": "abmil"}}, "heatmaps": {"models": ["abmil"], "fold": 3}},
                              {}, ["abmil"], [0], [0, 1])


# ------------------------------------------------------------------------------------------ planted demo
SLIDE = (3072, 2304)
N_PLANTED_COHORT = 24


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A demo cohort where every class-1 patient's first slide has a planted region, tiled at 128 px
    (0.5 mpp, 256 level-0 px) and embedded with the tiny encoder."""
    from modaltune.embedding import embed_slide
    from modaltune.tiling import tile_slide

    out = tmp_path_factory.mktemp("planted")
    paths = demo.make_demo_cohort(out, n_patients=N_PLANTED_COHORT, seed=0, slide_size=SLIDE, workers=1,
                                  planted_fraction=1.0)
    sheet = pd.read_csv(paths["sheet"], sep="\t")
    feats = {}
    for r in sheet.itertuples():
        th, fh = out / "tiles" / f"{r.slide_id}.h5", out / "features" / f"{r.slide_id}.h5"
        tile_slide(str(out / r.path), str(th), patch_size=128, min_tissue=0.9)
        embed_slide(th, fh, encoder="tiny", num_workers=0, device="cpu", progress=False)
        feats[r.slide_id] = str(fh)
    return {"paths": paths, "out": out, "sheet": sheet, "features": feats,
            "truth": pd.read_csv(paths["truth"], sep="\t").set_index("patient_id"),
            "regions": pd.read_csv(paths["truth_regions"], sep="\t").set_index("slide_id")}


def _inside(coords, size, box):
    x0, y0, x1, y1 = box
    cx, cy = coords[:, 0] + size / 2, coords[:, 1] + size / 2
    return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)


def _auroc_inside(scores, inside):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(inside, scores)


def test_planted_attention_cross_fitted_abmil(planted):
    """Two ABMILs, each trained on half of the patients (slide bags, subtype label), must put more attention
    inside the planted boxes of the other half's slides than outside; random scores do not."""
    sheet, truth, reg = planted["sheet"], planted["truth"], planted["regions"]
    patient = sheet.set_index("slide_id")["patient_id"]
    bags = {}
    for s, f in planted["features"].items():
        with h5py.File(f) as h5:
            size = float(h5.attrs["patch_size"]) * float(h5.attrs["target_mpp"]) / float(h5.attrs["level0_mpp"])
            bags[s] = (h5["features"][()], h5["coords"][()], size)
    pids = sorted(truth.index)
    halves = [set(pids[0::2]), set(pids[1::2])]
    aucs, random_aucs = [], []
    rng = np.random.default_rng(0)
    for half in halves:
        train = [s for s in sheet["slide_id"] if patient[s] in half]
        held = [s for s in reg.index if patient[s] not in half]
        x = np.concatenate([bags[s][0] for s in train])
        mu, sd = x.mean(0), x.std(0) + 1e-6  # feature scaling fitted on the training slides only
        torch.manual_seed(0)
        model = build_model("abmil", {"hidden": 32, "attn_dim": 16, "dropout": 0.0},
                            ModelDims(feature_dim=x.shape[1], n_genes=0, n_classes=2))
        opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
        order = np.random.default_rng(0)
        for _ in range(25):
            for s in order.permutation(train):
                feats = torch.from_numpy((bags[s][0] - mu) / sd).float()[None]
                y = torch.tensor([int(truth.at[patient[s], "class"])])
                loss = torch.nn.functional.cross_entropy(model({"features": feats})["logits"], y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        for s in held:
            f, c, size = bags[s]
            with torch.no_grad():
                a = model.tile_scores({"features": torch.from_numpy((f - mu) / sd).float()[None]})["attention"][0]
            inside = _inside(c, size, reg.loc[s, ["x0", "y0", "x1", "y1"]].to_numpy())
            assert 0 < inside.sum() < len(inside)
            aucs.append(_auroc_inside(a.numpy(), inside))
            random_aucs.append(_auroc_inside(rng.random(len(inside)), inside))
    assert len(aucs) == len(reg) >= 8
    # Measured 0.96-0.97 (seeds 0, 1); a model that ignores the texture sits near 0.5.
    assert np.mean(aucs) > 0.8, np.round(aucs, 2)
    assert np.mean(np.array(aucs) > 0.5) >= 0.75
    assert np.mean(random_aucs) < 0.7  # the statistic itself does not pass for random scores


# ------------------------------------------------------------------------------------------ the stage
@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    """The pipeline's own stages on the planted cohort: clinical table, pathways, splits, a trained ABMIL."""
    from modaltune.clinical import build_clinical_table
    from modaltune.genomics import build_pathways
    from modaltune.splits import make_splits
    from modaltune.training import train_run

    root = tmp_path_factory.mktemp("planted_run")
    p = planted["paths"]
    build_pathways(p["rna"], p["gene_sets"], root / "pathways.parquet", root / "report.json")
    build_clinical_table(p["clinical"], p["biospecimen"], root / "cases.parquet", cohort="BRCA", sheet=p["sheet"],
                         rna_parquet=root / "pathways.parquet")
    make_splits(root / "cases.parquet", root / "splits.parquet", scheme="fixed", val_fraction=0.25, test_fraction=0.25,
                seed=0)
    args = dict(cases=root / "cases.parquet", splits=root / "splits.parquet", fold=0,
                pathways_path=root / "pathways.parquet", feature_files=list(planted["features"].values()),
                sheet=p["sheet"])
    train_run(model_name="abmil", model_cfg={"arch": "abmil", "objective": "classification", "hidden": 32,
                                             "attn_dim": 16},
              train_cfg={"epochs": 3, "warmup_epochs": 1, "device": "cpu", "precision": "fp32"},
              cases_path=args["cases"], splits_path=args["splits"], fold=0, seed=0,
              pathways_path=args["pathways_path"], feature_files=args["feature_files"], sheet=args["sheet"],
              out_dir=root / "run")
    return root, args


def test_make_heatmaps_writes_h5_geojson_and_pngs(planted, planted_run, tmp_path):
    root, args = planted_run
    slide = planted["regions"].index[0]
    outs = {k: tmp_path / f"{slide}.{e}" for k, e in (("h5", "h5"), ("png", "png"), ("geojson", "geojson"))}
    outs["tiles"] = tmp_path / "tiles" / f"{slide}.png"
    summary = heatmaps.make_heatmaps(run_dir=root / "run", slides=[slide], outputs=[outs], top_tiles=4, **args)
    assert summary[0]["status"] == "ok"

    with h5py.File(planted["features"][slide]) as f:
        feat_coords = f["coords"][()]
    with h5py.File(outs["h5"]) as h5:
        coords, scores, attrs = h5["coords"][()], h5["scores"][()], dict(h5.attrs)
        assert sorted(h5["all_scores"]) == ["attention"]
    np.testing.assert_array_equal(coords, feat_coords)
    assert scores.shape == (len(coords),) and np.isfinite(scores).all() and (scores > 0).all()
    assert attrs["model"] == "abmil" and attrs["score"] == "attention" and attrs["seed"] == 0 and attrs["fold"] == 0
    assert attrs["run_dir"] == str(root / "run") and attrs["slide_id"] == slide
    assert attrs["state_sha256"] == hashlib.sha256((root / "run" / "state.pt").read_bytes()).hexdigest()
    assert attrs["checkpoint_sha256"] == "none" and attrs["modaltune_version"]
    assert attrs["tile_size_level0"] == pytest.approx(256.0)

    gj = json.loads(outs["geojson"].read_text())
    assert len(gj["features"]) == len(coords)
    for f, (x, y), v in zip(gj["features"], coords, scores, strict=True):
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] == [x, y] and ring[2] == [x + 256, y + 256]
        assert f["properties"]["measurements"]["attention"] == pytest.approx(float(v), rel=1e-6)

    img = np.asarray(Image.open(outs["png"]).convert("RGB")).astype(int)
    assert img.std() > 20, "heatmap PNG is blank"
    # The overlay and its colour bar carry saturated jet colours (the thumbnail alone is pink/purple/grey).
    sat = img.max(-1) - img.min(-1)
    right = sat[:, int(img.shape[1] * 0.85):]
    assert (right > 150).mean() > 0.01, "no colour bar on the right"
    blue = (img[..., 2] > 150) & (img[..., 0] < 80) & (img[..., 1] < 120)
    assert blue.sum() > 200, "no low-score (blue) colours"
    tiles = np.asarray(Image.open(outs["tiles"]).convert("RGB")).astype(int)
    assert tiles.std() > 20


def test_make_heatmaps_empty_slot_and_bad_score(planted, planted_run, tmp_path):
    root, args = planted_run
    outs = {"h5": tmp_path / "e.h5", "png": tmp_path / "e.png", "geojson": tmp_path / "e.geojson",
            "tiles": tmp_path / "e_tiles.png"}
    heatmaps.make_heatmaps(run_dir=root / "run", slides=[None], outputs=[outs], labels=["highest risk #3"], **args)
    with h5py.File(outs["h5"]) as h5:
        assert h5.attrs["status"] == "empty" and h5["coords"].shape == (0, 2)
    assert json.loads(outs["geojson"].read_text())["features"] == []
    slide = planted["regions"].index[0]
    with pytest.raises(InputError, match="heatmaps.score"):
        heatmaps.make_heatmaps(run_dir=root / "run", slides=[slide], outputs=[outs], score="diagnosis", **args)


def test_make_ranked_heatmaps_fills_slots_by_risk(planted, planted_run, tmp_path):
    root, args = planted_run
    split = pd.read_parquet(args["splits"])
    split = split[split["fold"] == 0]
    test_ids = sorted(split.loc[split["partition"] == "test", "patient_id"])[:3]
    pred = pd.DataFrame({"patient_id": test_ids + ["NOT-TEST"], "partition": ["test"] * 3 + ["train"],
                         "risk": [0.5, 3.0, 1.0, 99.0]})
    pred.to_parquet(tmp_path / "predictions.parquet")
    outs = [{k: tmp_path / f"high_{i}.{e}" for k, e in (("h5", "h5"), ("png", "png"), ("geojson", "geojson"))}
            | {"tiles": tmp_path / f"high_{i}_tiles.png"} for i in (1, 2)]
    heatmaps.make_ranked_heatmaps(predictions=tmp_path / "predictions.parquet", k=2, which="high", outputs=outs,
                                  run_dir=root / "run", **args)
    sheet = planted["sheet"]
    first = sheet.drop_duplicates("patient_id").set_index("patient_id")["slide_id"]
    for out, pid in zip(outs, [test_ids[1], test_ids[2]], strict=True):
        with h5py.File(out["h5"]) as h5:
            assert h5.attrs["patient_id"] == pid and h5.attrs["slide_id"] == first[pid]
            assert h5.attrs["selection"].startswith("highest risk #") and h5.attrs["partition"] == "test"


def test_pathway_attribution_of_a_trained_mcat(planted, planted_run, tmp_path):
    from modaltune.attribution import pathway_attribution
    from modaltune.genomics import load_pathways
    from modaltune.training import train_run

    root, args = planted_run
    run = tmp_path / "mcat"
    train_run(model_name="mcat", model_cfg={"arch": "mcat", "objective": "survival", "dim": 16, "num_heads": 2,
                                            "n_layers": 1},
              train_cfg={"epochs": 2, "warmup_epochs": 1, "device": "cpu", "precision": "fp32"},
              cases_path=args["cases"], splits_path=args["splits"], fold=0, seed=0,
              pathways_path=args["pathways_path"], feature_files=args["feature_files"], sheet=args["sheet"],
              out_dir=run)
    table = pathway_attribution(run_dir=run, out_tsv=tmp_path / "p.tsv", out_png=tmp_path / "p.png", top=5, **args)
    names = list(load_pathways(args["pathways_path"])[1])
    written = pd.read_csv(tmp_path / "p.tsv", sep="\t")
    assert sorted(written["pathway"]) == sorted(names) and list(written["rank"]) == list(range(1, len(names) + 1))
    assert (np.diff(written["mean_abs_delta"]) <= 0).all() and (written["mean_abs_delta"] > 0).any()
    assert written["share"].sum() == pytest.approx(1.0)
    assert set(written["output_source"]) == {"head"} and set(written["task"]) == {"survival"}
    assert table["n_patients"].iloc[0] >= 3
    assert np.asarray(Image.open(tmp_path / "p.png").convert("L")).std() > 10

