"""Label prompts (prompts), prompt survival bins (survival_bins), text encoders (encoders.text),
per-fold HDF5 targets and the frozen projector (text)."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from modaltune.encoders.text import build_text_encoder
from modaltune.errors import InputError, LeakageError
from modaltune.prompts import PROMPT_NAMES, label_prompts
from modaltune.survival_bins import hazard_bin_edges, hazard_bin_index, prompt_bin_edges, prompt_bin_index
from modaltune.text import build_text_targets, make_text_projector, read_text_targets

BRCA_EDGES = [0.0, 15.0, 27.0, 55.0, 283.0]
BRCA_GENERAL = (
    "Cancer location: breast; Cancer diagnosis: infiltrating duct carcinoma; Overall stage: stage two; "
    "Tumor stage status: tumor stage two; Lymph node status: cancer has not spread to lymph nodes; "
    "Distant metastasis status: no metastasis detected; Survival status: The patient was censored "
    "between 15 and 27 months"
)


def _brca_row(**kw):
    row = {
        "primary_diagnosis": "infiltrating duct carcinoma",
        "stage": "Stage IIA",
        "t": "T2",
        "n": "N0 (i-)",
        "m": "M0",
        "survival_months": 25.5,
        "event": 0,
    }
    row.update(kw)
    return row


def test_method_example_verbatim():
    general, diagnosis, stage, survival = label_prompts(_brca_row(), BRCA_EDGES, "BRCA")
    assert general == BRCA_GENERAL
    assert diagnosis == "Cancer location: breast; Cancer diagnosis: infiltrating duct carcinoma;"
    assert stage == (
        "Cancer location: breast; Overall stage: stage two; Tumor stage status: tumor stage two; "
        "Lymph node status: cancer has not spread to lymph nodes; "
        "Distant metastasis status: no metastasis detected;"
    )
    assert survival == stage + " Survival status: The patient was censored between 15 and 27 months"
    # normalised cases.parquet values give the same text as raw GDC strings
    assert label_prompts(_brca_row(stage="II", n="N0"), BRCA_EDGES, "BRCA")[0] == BRCA_GENERAL


def test_missing_fields_leave_runs_of_spaces():
    row = {
        "primary_diagnosis": "glioblastoma",
        "stage": None,
        "t": np.nan,
        "n": None,
        "m": None,
        "survival_months": 3.0,
        "event": 1,
    }
    general, _, stage, survival = label_prompts(row, [0.0, 8.0, 17.0, 31.0, 211.0], "GBMLGG")
    assert general == (
        "Cancer location: brain; Cancer diagnosis: glioblastoma;     "
        "Survival status: The patient died before 8 months"
    )
    assert stage == "Cancer location: brain;    "
    assert survival == "Cancer location: brain;     Survival status: The patient died before 8 months"
    no_surv = label_prompts({**row, "survival_months": np.nan}, [0.0, 8.0, 17.0, 31.0, 211.0], "GBMLGG")
    assert no_surv[0].endswith("glioblastoma;     ")


@pytest.mark.parametrize(
    "field, value, phrase",
    [
        ("stage", "X", "Overall stage: stage cannot be determined;"),
        ("stage", "IV", "Overall stage: stage four;"),
        ("t", "Tis", "Tumor stage status: no tumor detected;"),
        ("t", "TX", "Tumor stage status: tumor stage cannot be assessed;"),
        ("n", "N3", "Lymph node status: node stage three;"),
        ("n", "NX", "Lymph node status: node spread cannot be assessed;"),
        ("m", "M1", "Distant metastasis status: cancer has spread to distant organs;"),
        ("m", "MX", "Distant metastasis status: metastasis status cannot be assessed;"),
    ],
)
def test_staging_phrases(field, value, phrase):
    assert phrase in label_prompts(_brca_row(**{field: value}), BRCA_EDGES, "BRCA")[0]


@pytest.mark.parametrize(
    "months, event, wording",
    [
        (3.0, 1, "The patient died before 15 months"),
        (15.0, 0, "The patient was censored between 15 and 27 months"),
        (30.0, 1, "The patient died between 27 and 55 months"),
        (100.0, 0, "The patient was censored between 55 and 283 months"),
        (400.0, 0, "The patient was censored between 55 and 283 months"),  # beyond training range: last bin
        (-1.0, 0, "The patient was censored before 15 months"),
    ],
)
def test_survival_wording(months, event, wording):
    general = label_prompts(_brca_row(survival_months=months, event=event), BRCA_EDGES, "BRCA")[0]
    assert general.endswith("Survival status: " + wording)


def test_site_names():
    for cohort, name in [
        ("BLCA", "bladder urothelial"),
        ("COADREAD", "colorectal"),
        ("NSCLC", "lung"),
        ("RCC", "kidney"),
        ("UCEC", "uterus"),
        ("STAD", "stomach"),
    ]:
        assert label_prompts(_brca_row(), BRCA_EDGES, cohort)[1].startswith(f"Cancer location: {name};")


def test_bin_edges_quantiles_and_index():
    months = np.arange(0.0, 101.0)  # quartiles 25, 50, 75
    assert prompt_bin_edges(months) == [0.0, 25.0, 50.0, 75.0, 100.0]
    np.testing.assert_array_equal(
        prompt_bin_index([0.0, 24.9, 25.0, 60.0, 100.0, 500.0, np.nan], [0.0, 25.0, 50.0, 75.0, 100.0]),
        [0, 0, 1, 2, 3, 3, -1],
    )
    assert prompt_bin_edges([0.4, np.nan, 3.6, 7.2, 10.0, 12.6]) == [0.0, 4.0, 7.0, 10.0, 13.0]
    with pytest.raises(InputError):
        prompt_bin_edges([np.nan, np.nan])


def test_prompt_and_hazard_bins_close_on_opposite_sides():
    """A time exactly on an inner edge: the prompt bin is left-closed (goes up), the hazard bin
    right-closed (stays down); the names say which rule a caller gets."""
    edges = [0.0, 25.0, 50.0, 75.0, 100.0]
    assert prompt_bin_index([25.0, 50.0], edges).tolist() == [1, 2]
    assert hazard_bin_index([25.0, 50.0], np.asarray(edges)).tolist() == [0, 1]
    hz = hazard_bin_edges([10.0, 20.0, 30.0, 40.0, 50.0], [1, 1, 1, 1, 0], n_bins=2)
    assert hz[0] == 0.0 and np.isinf(hz[-1]) and len(hz) == 3
    assert hazard_bin_index([1e9, np.nan], hz).tolist() == [1, -1]


def _cohort(tmp_path, n_train=12, n_test=6, site="BRCA"):
    ids = [f"TCGA-XX-{i:04d}" for i in range(n_train + n_test)]
    months = list(np.linspace(1.0, 60.0, n_train)) + [
        500.0 + i for i in range(n_test)
    ]  # test: long survivors
    cases = pd.DataFrame(
        {
            "patient_id": ids,
            "case_id": [f"u{i}" for i in range(len(ids))],
            "project_id": "TCGA-BRCA",
            "site": site,
            "primary_diagnosis": ["infiltrating duct carcinoma", "lobular carcinoma", None] * (len(ids) // 3),
            "label": [0, 1, -1] * (len(ids) // 3),
            "survival_months": months,
            "event": [0, 1] * (len(ids) // 2),
            "stage": ["II", None, "X"] * (len(ids) // 3),
            "t": "T2",
            "n": "N0",
            "m": None,
            "age": 50.0,
            "has_rna": True,
            "n_slides": 1,
        }
    )
    part = ["train"] * (n_train - 2) + ["val"] * 2 + ["test"] * n_test
    splits = pd.DataFrame({"patient_id": ids, "fold": 0, "partition": part})
    other = splits.assign(fold=1, partition=["test"] * 4 + ["train"] * (len(ids) - 4))
    cases.to_parquet(tmp_path / "cases.parquet", index=False)
    pd.concat([splits, other]).to_parquet(tmp_path / "splits.parquet", index=False)
    return cases, splits


def test_targets_hdf5_round_trip_and_train_only_bins(tmp_path):
    cases, splits = _cohort(tmp_path)
    out = tmp_path / "text" / "fold_0.h5"
    summary = build_text_targets(
        tmp_path / "cases.parquet", tmp_path / "splits.parquet", 0, out, encoder="hash"
    )
    data = read_text_targets(out)
    P = len(cases)
    assert data["embeddings"].shape == (P, 4, 256) and data["embeddings"].dtype == np.float32
    assert data["prompts"].shape == (P, 4)
    assert list(data["patient_id"]) == cases["patient_id"].tolist()
    np.testing.assert_allclose(np.linalg.norm(data["embeddings"], axis=2), 1.0, rtol=1e-5)
    # embeddings are exactly the encoder's vectors of the stored prompts
    enc = build_text_encoder("hash", device="cpu")
    np.testing.assert_allclose(data["embeddings"][3], enc.encode(list(data["prompts"][3])), rtol=1e-6)
    # bins from the 10 training patients only: the test patients' 500+ months would move the edges
    train_months = cases["survival_months"][:10]
    expected = prompt_bin_edges(train_months)
    np.testing.assert_allclose(data["attrs"]["bin_edges"], expected)
    assert expected[-1] == 49.0 and summary["bin_edges"] == {"BRCA": expected}
    assert prompt_bin_edges(cases["survival_months"])[-1] > 500  # what leakage would have given
    assert data["attrs"]["fold"] == 0 and data["attrs"]["encoder"] == "hash"
    assert data["prompts"][0][0] == label_prompts(cases.iloc[0].to_dict(), expected, "BRCA")[0]
    # test patients (beyond the training range) land in the last bin
    assert set(data["survival_bin"][12:]) == {3}
    assert list(data["partition"][:10]) == ["train"] * 10 and data["partition"][-1] == "test"
    # another fold has other training patients and so other edges
    build_text_targets(
        tmp_path / "cases.parquet", tmp_path / "splits.parquet", 1, tmp_path / "f1.h5", encoder="hash"
    )
    assert read_text_targets(tmp_path / "f1.h5")["attrs"]["bin_edges"][-1] > 500


def test_pancancer_sites_get_own_bins_and_names(tmp_path):
    cases, splits = _cohort(tmp_path)
    nsclc = cases.assign(
        patient_id=cases["patient_id"].str.replace("XX", "YY"),
        site="NSCLC",
        survival_months=cases["survival_months"] * 3,
    )
    both = pd.concat([cases, nsclc], ignore_index=True)
    both_splits = pd.concat([splits, splits.assign(patient_id=splits["patient_id"].str.replace("XX", "YY"))])
    both.to_parquet(tmp_path / "pan.parquet", index=False)
    both_splits.to_parquet(tmp_path / "pan_splits.parquet", index=False)
    summary = build_text_targets(
        tmp_path / "pan.parquet", tmp_path / "pan_splits.parquet", 0, tmp_path / "pan.h5", encoder="hash"
    )
    data = read_text_targets(tmp_path / "pan.h5")
    assert summary["bin_edges"]["NSCLC"][-1] == pytest.approx(3 * summary["bin_edges"]["BRCA"][-1], abs=1)
    assert data["attrs"]["bin_edges"].shape == (2, 5)
    site = np.asarray(data["site"])
    assert all(p.startswith("Cancer location: lung;") for p in data["prompts"][site == "NSCLC", 0])
    assert all(p.startswith("Cancer location: breast;") for p in data["prompts"][site == "BRCA", 0])


def test_targets_bad_inputs(tmp_path):
    cases, splits = _cohort(tmp_path)
    with pytest.raises(InputError, match="fold 7"):
        build_text_targets(
            tmp_path / "cases.parquet", tmp_path / "splits.parquet", 7, tmp_path / "x.h5", encoder="hash"
        )
    leaky = pd.concat([splits, splits.iloc[:1].assign(partition="test")])
    leaky.to_parquet(tmp_path / "leaky.parquet", index=False)
    with pytest.raises(LeakageError):
        build_text_targets(
            tmp_path / "cases.parquet", tmp_path / "leaky.parquet", 0, tmp_path / "x.h5", encoder="hash"
        )
    with pytest.raises(InputError, match="unknown text encoder"):
        build_text_targets(
            tmp_path / "cases.parquet",
            tmp_path / "splits.parquet",
            0,
            tmp_path / "x.h5",
            encoder="bert-large",
        )
    assert not (tmp_path / "x.h5").exists()


def test_hash_encoder_deterministic():
    a = build_text_encoder("hash", device="cpu").encode(["tumor stage two", "node stage one"])
    b = build_text_encoder("hash", device="cpu").encode(["tumor stage two", "node stage one"])
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 256) and not np.allclose(a[0], a[1])


@pytest.mark.slow  # ~10-40 s on 2 cores: importing transformers + sentence-transformers dominates
def test_minilm_offline_similarity(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the minilm encoder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    enc = build_text_encoder("minilm", device="cpu")
    vecs = enc.encode(
        [
            BRCA_GENERAL,
            BRCA_GENERAL.replace("was censored", "died"),
            "The quarterly revenue of the company grew by four percent.",
        ]
    )
    assert enc.dim == 384 and vecs.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    sims = vecs @ vecs.T
    assert sims[0, 1] > 0.9 and sims[0, 2] < 0.3


def _tiny_conch_cfg():
    return {
        "embed_dim": 24,
        "embed_dim_caption": 16,
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 16,
            "layers": 1,
            "width": 16,
            "num_heads": 2,
            "attentional_pool_caption": True,
            "attentional_pool_contrast": True,
            "attn_pooler_heads": 2,
            "n_queries_contrast": 1,
            "n_queries_caption": 4,
            "output_tokens": True,
        },
        "text_cfg": {
            "context_length": 128,
            "vocab_size": 32007,
            "width": 16,
            "heads": 2,
            "layers": 1,
            "embed_cls": True,
            "output_tokens": True,
        },
        "multimodal_cfg": {"context_length": 128, "vocab_size": 32007, "width": 16, "heads": 2, "layers": 1},
        "custom_text": True,
    }


def test_conch_text_tower_loads_local_checkpoint(tmp_path):
    pytest.importorskip("conch.open_clip_custom")
    import torch
    from conch.open_clip_custom import CoCa

    cfg = _tiny_conch_cfg()
    torch.manual_seed(0)
    ref = CoCa(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "conch.pt")
    enc = build_text_encoder("conch_v1", checkpoint=tmp_path / "conch.pt", device="cpu", model_cfg=cfg)
    tokens = enc.tokenize(["Cancer location: breast;", "Cancer location: lung;"])
    assert tokens.shape == (2, 128) and int(tokens[0, -1]) == enc.tokenizer.pad_token_id
    vecs = enc.encode(["Cancer location: breast;", "Cancer location: lung;"])
    with torch.no_grad():
        expected = ref.encode_text(tokens).numpy()
    np.testing.assert_allclose(vecs, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    # a checkpoint without the text tower is refused with a clear message
    torch.save({k: v for k, v in ref.state_dict().items() if not k.startswith("text.")}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="text-tower weights missing"):
        build_text_encoder("conch_v1", checkpoint=tmp_path / "bad.pt", device="cpu", model_cfg=cfg)


def test_conch_missing_package_message(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "conch", None)
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", None)
    with pytest.raises(InputError, match=r"pip install 'modaltune\[conch\]'"):
        build_text_encoder("conch_v1", checkpoint=tmp_path / "conch.pt", device="cpu")


def test_projector_deterministic_frozen_and_rng_untouched():
    import torch

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = make_text_projector(512, 256, seed=0)
    after = torch.rand(3)
    torch.testing.assert_close(before, after)  # global RNG stream not consumed
    b = make_text_projector(512, 256, seed=0)
    c = make_text_projector(512, 256, seed=1)
    x = torch.randn(5, 3, 512)
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(a(x), c(x))
    assert a(x).shape == (5, 3, 256)
    assert not a.training and all(not p.requires_grad for p in a.parameters())
    assert [type(m).__name__ for m in a] == ["Linear", "LayerNorm", "ReLU", "Linear"]


def test_projector_equals_authors_conv1x1_form():
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        conv = nn.Sequential(nn.Conv2d(64, 32, 1), nn.LayerNorm([32, 1, 1]), nn.ReLU(), nn.Conv2d(32, 32, 1))
    lin = make_text_projector(64, 32, seed=7)
    x = torch.randn(6, 64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), conv(x[:, :, None, None])[:, :, 0, 0])


def test_hdf5_strings_are_utf8(tmp_path):
    _cohort(tmp_path)
    build_text_targets(
        tmp_path / "cases.parquet",
        tmp_path / "splits.parquet",
        0,
        tmp_path / "t.h5",
        encoder="hash",
        cohort="BRCA",
    )
    with h5py.File(tmp_path / "t.h5") as h5:
        assert h5["patient_id"].dtype.kind == "O" and h5["prompts"].shape[1] == len(PROMPT_NAMES)
        assert h5["patient_id"].asstr()[0] == "TCGA-XX-0000"
