"""Per-patient dataset: slide layout, failed slides, subsampling, masks, batch contract, leakage checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from modaltune.data import PatientDataset, collate_patients, place_side_by_side
from modaltune.errors import InputError, LeakageError
from tests.training_helpers import GENES_PER_PW, N_PATHWAYS, D, make_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("data"))


def _fitted(c):
    from modaltune.clinical import encode_covariates
    from modaltune.data import load_gene_table, read_cases
    from modaltune.gene_scaler import GeneScaler

    split = pd.read_parquet(c["splits_path"])
    train = split.loc[split.partition == "train", "patient_id"].tolist()
    df, genes, _ = load_gene_table(c["pathways_path"])
    scaler = GeneScaler().fit(df.loc[[p for p in train if p in df.index], genes])
    _, _, cov = encode_covariates(read_cases(c["cases_path"]).reset_index(drop=True), train)
    return scaler, cov


def _ds(c, parts=("train", "val", "test"), **kw):
    scaler, cov = _fitted(c)
    return PatientDataset(c["cases_path"], c["splits_path"], 0, list(parts), feature_files=c["feature_files"],
                          sheet=c["sheet"], pathways_path=c["pathways_path"], text_h5=c["text_h5"],
                          gene_scaler=scaler, covariate_state=cov, **kw)


def test_slides_side_by_side_cumulative_offsets():
    tile, gap = 256, 1500
    s = [np.array([[0, 0], [512, 256]]), np.array([[100, 100], [356, 100]]), np.array([[0, 0], [256, 768]])]
    out = place_side_by_side(s, tile=tile, gap=gap, grid_extent=1000 * 256)
    np.testing.assert_array_equal(out[0], s[0])  # the first slide keeps its coordinates
    assert out[1][:, 0].min() == 512 + tile + gap  # right of slide 1's right edge
    assert out[2][:, 0].min() == out[1][:, 0].max() + tile + gap  # cumulative: right of slide 2, not slide 1
    boxes = [(o[:, 0].min(), o[:, 0].max() + tile) for o in out]
    assert all(b[0] >= a[1] for a, b in zip(boxes, boxes[1:], strict=False))  # no overlap (method bug 5)


def test_slide_layout_wraps_rows_and_checks_grid():
    big = [np.array([[0, 0], [60_000, 40_000]])] * 6  # six wide slides do not fit in one row of 256,000 px
    out = place_side_by_side(big, tile=256, gap=1500, grid_extent=1000 * 256)
    allc = np.concatenate(out)
    assert allc.max() < 256_000 and len({int(o[:, 1].min()) for o in out}) > 1
    with pytest.raises(InputError, match="grid"):
        place_side_by_side([np.array([[0, 0], [300_000, 0]])], tile=256, gap=1500, grid_extent=256_000)


def test_items_concatenate_slides_and_flag_missing(cohort):
    ds = _ds(cohort)
    i1, i2, ilast = (ds.patient_ids.index(p) for p in ("P001", "P002", cohort["ids"][-1]))
    two = ds[i1]  # patient 1 has two slides
    assert two["features"].shape[1] == D and two["features"].shape[0] > 40 + 40 - 1
    one = ds[ds.patient_ids.index("P000")]
    assert one["features"].shape[0] < two["features"].shape[0]
    none = ds[i2]  # patient 2's only slide failed: kept, with zero patches
    assert none["features"].shape == (0, D)
    last = ds[ilast]  # no RNA: zeros + flag
    assert not last["has_genes"] and torch.count_nonzero(last["genes"]) == 0
    assert one["has_genes"] and one["genes"].shape == (N_PATHWAYS * GENES_PER_PW,)
    assert one["text"].shape == (4, 12) and one["has_clinical"]
    assert one["label"] == 0 and two["label"] == 1


def test_collate_matches_the_batch_contract(cohort):
    ds = _ds(cohort)
    batch = collate_patients([ds[ds.patient_ids.index(p)] for p in ("P001", "P002", "P000")])
    b, n = 3, batch["features"].shape[1]
    assert batch["features"].shape == (b, n, D) and batch["features"].dtype == torch.float32
    assert batch["coords"].shape == (b, n, 2) and batch["patch_mask"].dtype == torch.bool
    assert batch["patch_mask"][1].sum() == 0 and batch["patch_mask"][0].all()
    assert torch.all(batch["features"][2][~batch["patch_mask"][2]] == 0)  # zero padding
    assert batch["genes"].shape[0] == b and batch["has_genes"].dtype == torch.bool
    assert batch["clinical"].shape[0] == b and batch["has_clinical"].dtype == torch.bool
    assert batch["text"].shape == (b, 4, 12)
    assert batch["label"].dtype == torch.long and batch["time"].dtype == torch.float32
    assert batch["patient_id"] == ["P001", "P002", "P000"] and len(batch["site"]) == b


def test_subsampling_deterministic_in_training_and_off_at_eval(cohort):
    tr = _ds(cohort, max_patches=10, train=True, seed=3)
    i = tr.patient_ids.index("P001")
    tr.set_epoch(0)
    a, b = tr[i], tr[i]
    assert a["features"].shape[0] == 10 and torch.equal(a["features"], b["features"])
    tr.set_epoch(1)
    assert not torch.equal(a["features"], tr[i]["features"])  # a new subset each epoch
    ev = _ds(cohort, max_patches=10, train=False)
    assert ev[i]["features"].shape[0] > 10  # evaluation sees every patch (method bug 6)


def test_coordinate_spaces(cohort):
    t = _ds(cohort, coords_space="target")[0]["coords"]
    lv0 = _ds(cohort, coords_space="level0")[0]["coords"]
    assert torch.allclose(lv0, t * 2 + 1000)  # the fixture's level-0 coords = 2 x target + 1000
    with pytest.raises(InputError, match="coords_space"):
        _ds(cohort, coords_space="micron")


def test_drop_without_slides_and_scaler_use(cohort):
    ds = _ds(cohort, drop_without_slides=True)
    assert "P002" not in ds.patient_ids and ds.dropped_without_slides == ["P002"]


def test_bad_inputs(cohort, tmp_path):
    split = pd.read_parquet(cohort["splits_path"])
    leak = pd.concat([split, split.iloc[[0]].assign(partition="test" if split.iloc[0].partition != "test"
                                                     else "train")])
    leak.to_parquet(tmp_path / "leak.parquet")
    with pytest.raises(LeakageError):
        _ds({**cohort, "splits_path": str(tmp_path / "leak.parquet")})
    with pytest.raises(InputError, match="fold 7"):
        PatientDataset(cohort["cases_path"], cohort["splits_path"], 7, ["train"], feature_files=cohort["feature_files"],
                       sheet=cohort["sheet"], pathways_path=cohort["pathways_path"])
    cases = pd.read_parquet(cohort["cases_path"]).drop(columns="event")
    with pytest.raises(InputError, match="event"):
        _ds({**cohort, "cases_path": cases})


def test_sheet_list_and_dataframe_equivalent(cohort):
    import pandas as pd

    a = _ds(cohort, parts=("val",))
    b = _ds({**cohort, "sheet": [cohort["sheet"]]}, parts=("val",))
    c = _ds({**cohort, "sheet": pd.read_csv(cohort["sheet"], sep="\t")}, parts=("val",))
    assert a.slides == b.slides == c.slides


def test_cohort_views_equal_direct_datasets(cohort):
    """A cohort read once (CohortData) gives partition views identical to separately built datasets."""
    from modaltune.data import CohortData

    scaler, cov = _fitted(cohort)
    data = CohortData(cohort["cases_path"], cohort["splits_path"], 0, feature_files=cohort["feature_files"],
                      sheet=cohort["sheet"], pathways_path=cohort["pathways_path"], text_h5=cohort["text_h5"],
                      drop_without_slides=True)
    for parts in (["train"], ["val"], ["test"], ["train", "val", "test"]):
        view = data.dataset(parts, gene_scaler=scaler, covariate_state=cov, max_patches=None, train=False)
        direct = _ds(cohort, parts=parts, drop_without_slides=True, max_patches=None, train=False)
        assert view.patient_ids == direct.patient_ids
        assert view.dropped_without_slides == direct.dropped_without_slides
        for i in range(len(view)):
            a, b = view[i], direct[i]
            for k in ("features", "coords", "genes", "clinical", "text"):
                assert torch.equal(a[k], b[k]), (parts, i, k)
    assert set(data.ids(["train"])) | set(data.ids(["val"])) | set(data.ids(["test"])) == set(data.patient_ids)
    no_text = data.dataset(["val"], gene_scaler=scaler, covariate_state=cov, use_text=False)
    assert no_text[0]["text"].shape == (4, 0)
