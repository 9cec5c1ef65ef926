"""The one trainer: learning a planted signal, exact resume, determinism, train-only preprocessing.

The cohort builder, the tiny registered model and the run helpers live in tests/training_helpers.py
(shared with test_evaluation.py and test_data.py); everything is built in a temp dir in the documented
file formats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.training_helpers import (
    E_DIM,
    GENES_PER_PW,
    N_PATHWAYS,
    T_DIM,
    D,
    make_cohort,
    prepare_env,
    run_args,
)


def _has_real_model_modules() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("modaltune.models.modaltune",
                                                                  "modaltune.models.baselines"))


@pytest.fixture(autouse=True)
def _registry_without_missing_modules(monkeypatch):
    prepare_env(monkeypatch)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"))


# ----------------------------------------------------------------------------------------------- tests
def test_lr_schedule_valid_for_any_epoch_count():
    from modaltune.training import lr_factor

    for epochs in (1, 2, 5, 10, 15, 40):
        f = [lr_factor(e, epochs, 10) for e in range(epochs)]
        assert all(0 <= v <= 1 for v in f) and np.isfinite(f).all()
    f15 = [lr_factor(e, 15, 10) for e in range(15)]
    assert f15[0] == pytest.approx(1 / 20) and f15[10] == pytest.approx(1.0)
    assert f15[5] == pytest.approx((1 + 1.9 * 5) / 20)  # paper: 5e-6 (1 + 1.9 e) for lr 1e-4
    assert all(a > b for a, b in zip(f15[10:], f15[11:], strict=False))  # cosine decay after warmup


@pytest.fixture(scope="module")
def tiny_run(cohort, tmp_path_factory):
    from modaltune.training import train_run

    out = tmp_path_factory.mktemp("tiny_run")
    with pytest.MonkeyPatch.context() as mp:
        prepare_env(mp)
        res = train_run(**run_args(cohort, out, train_cfg={"epochs": 3}))
    return res, out


def test_tiny_run_learns_and_writes_outputs(tiny_run):
    res, tmp_path = tiny_run
    hist = pd.read_parquet(tmp_path / "history.parquet")
    assert list(hist["epoch"]) == [0, 1, 2]  # all epochs run (no debug break)
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert hist["val_bacc"].max() > 0.7  # planted signal, 2 balanced classes: chance is 0.5
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert not any(k.startswith("frozen") for k in state["trainable"])  # frozen encoder never saved
    assert "norm.running_mean" in state["trainable"]  # buffers of trainable modules are
    assert state["best_epoch"] == res["best_epoch"] == int(hist["val_bacc"][::-1].idxmax())  # ties -> later
    assert set(state["fingerprints"]) >= {"cases", "splits", "pathways", "text", "feature_files"}
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert not (tmp_path / ".resume.pt").exists()


def test_gene_scaler_fitted_on_train_only(cohort, tiny_run):
    from modaltune.gene_scaler import GeneScaler, ids_hash

    tmp_path = tiny_run[1]
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    split = pd.read_parquet(cohort["splits_path"])
    train_ids = split.loc[(split.fold == 0) & (split.partition == "train"), "patient_id"].tolist()
    genes = pd.read_parquet(cohort["pathways_path"])
    with_rna = [p for p in train_ids if p in genes.index]
    sc = GeneScaler.from_state_dict(state["gene_scaler"])
    assert sc.fitted_ids_sha256 == ids_hash(with_rna)
    g = [c for c in genes.columns if c != "sample_id"]
    np.testing.assert_allclose(sc.mean, genes.loc[with_rna, g].mean().to_numpy(), rtol=1e-5)
    assert not np.allclose(sc.mean, genes[g].mean().to_numpy(), rtol=1e-5)  # all-patient mean differs
    assert state["covariates"]["n_train"] == len(train_ids)


def test_resume_after_interrupt_matches_uninterrupted(cohort, tmp_path, monkeypatch):
    from modaltune import training

    args = {"train_cfg": {"epochs": 2}}
    full = tmp_path / "full"
    training.train_run(**run_args(cohort, full, **args))
    part = tmp_path / "part"
    monkeypatch.setattr(training, "_STOP_AFTER_EPOCH", 1)
    with pytest.raises(training._Interrupted):
        training.train_run(**run_args(cohort, part, **args))
    assert (part / ".resume.pt").exists() and not (part / "state.pt").exists()
    torch.manual_seed(999)  # a restarted process has other RNG states: resume must restore them
    np.random.seed(999)
    monkeypatch.setattr(training, "_STOP_AFTER_EPOCH", None)
    training.train_run(**run_args(cohort, part, **args))
    a = torch.load(full / "state.pt", weights_only=False)
    b = torch.load(part / "state.pt", weights_only=False)
    assert a["best_epoch"] == b["best_epoch"]
    assert a["trainable"].keys() == b["trainable"].keys()
    for k in a["trainable"]:
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k
    ha, hb = pd.read_parquet(full / "history.parquet"), pd.read_parquet(part / "history.parquet")
    pd.testing.assert_frame_equal(ha.drop(columns="seconds"), hb.drop(columns="seconds"))
    assert not (part / ".resume.pt").exists()


def test_same_seed_same_result_other_seed_differs(cohort, tmp_path):
    from modaltune.training import train_run

    args = {"train_cfg": {"epochs": 1}}
    train_run(**run_args(cohort, tmp_path / "a", **args))
    train_run(**run_args(cohort, tmp_path / "b", **args))
    train_run(**run_args(cohort, tmp_path / "c", seed=1, **args))
    a, b, c = (torch.load(tmp_path / x / "state.pt", weights_only=False)["trainable"] for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    ha, hb = (pd.read_parquet(tmp_path / x / "history.parquet").drop(columns="seconds") for x in "ab")
    pd.testing.assert_frame_equal(ha, hb)


@pytest.mark.parametrize("objective", ["classification", "survival"])
def test_supervised_objectives_train(cohort, tmp_path, objective):
    from modaltune.training import train_run

    res = train_run(**run_args(cohort, tmp_path, model_cfg={"arch": "tiny_test", "objective": objective},
                               train_cfg={"epochs": 1, "selection": "bacc+cindex"}))
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["objective"] == objective and "head.weight" in state["trainable"]
    assert len(res["history"]) == 1 and np.isfinite(res["history"][-1]["train_loss"])
    edges = np.array(state["survival_edges"])
    assert edges[0] == 0 and np.isinf(edges[-1]) and len(edges) == 5


def test_objective_none_saves_zero_epochs(cohort, tmp_path):
    from modaltune.training import train_run

    res = train_run(**run_args(cohort, tmp_path, model_cfg={"arch": "tiny_test", "objective": "none"}))
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert res["epochs"] == 0 and state["best_epoch"] is None and state["trainable"] == {}
    assert len(pd.read_parquet(tmp_path / "history.parquet")) == 0


@pytest.mark.skipif(not _has_real_model_modules(), reason="colleagues' model modules not there yet")
def test_real_abmil_trains_one_epoch(cohort, tmp_path):
    from modaltune.training import train_run

    res = train_run(**run_args(cohort, tmp_path, model_cfg={"arch": "abmil", "objective": "classification",
                                                            "hidden": 16, "attn_dim": 8},
                               train_cfg={"epochs": 1}))
    assert res["objective"] == "classification" and len(res["history"]) == 1


@pytest.mark.skipif(not _has_real_model_modules(), reason="colleagues' model modules not there yet")
def test_real_modaltune_trainable_state_excludes_frozen_backbone():
    from modaltune.models import ModelDims, build_model
    from modaltune.models.modaltune import demo_config
    from modaltune.training import load_trainable, trainable_state

    dims = ModelDims(feature_dim=D, n_genes=N_PATHWAYS * GENES_PER_PW,
                     pathway_groups=[list(range(k * GENES_PER_PW, (k + 1) * GENES_PER_PW)) for k in range(N_PATHWAYS)],
                     text_dim=T_DIM)
    torch.manual_seed(0)
    model = build_model("modaltune", demo_config(), dims)
    st = trainable_state(model)
    assert st and not any(k.startswith("backbone.") for k in st)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(v.numel() for k, v in st.items() if k in dict(model.named_parameters())) == n_trainable
    torch.manual_seed(0)
    again = build_model("modaltune", demo_config(), dims)
    for p in again.parameters():
        if p.requires_grad:
            p.data.add_(1.0)
    load_trainable(again, st)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


@pytest.mark.slow
@pytest.mark.skipif(not _has_real_model_modules(), reason="colleagues' model modules not there yet")
def test_real_modaltune_train_and_evaluate(tmp_path):
    from modaltune.evaluation import evaluate_run
    from modaltune.models.modaltune import demo_config
    from modaltune.training import train_run

    c = make_cohort(tmp_path, n_patients=14)
    cfg = {"arch": "modaltune", **demo_config(), "output_dim": E_DIM}
    train_run(**run_args(c, tmp_path / "run", model_cfg=cfg, train_cfg={"epochs": 1}))
    m = evaluate_run(run_dir=tmp_path / "run", cases_path=c["cases_path"], splits_path=c["splits_path"], fold=0,
                     pathways_path=c["pathways_path"], feature_files=c["feature_files"], sheet=c["sheet"],
                     out_metrics=tmp_path / "m.json", out_embeddings=tmp_path / "e.npz")
    assert set(m["tokens"]) == {"general", "diagnosis", "survival"} and m["arch"] == "modaltune"


# --------------------------------------------------------------------------- switches, selection, defaults
def _schema():
    import yaml

    return yaml.safe_load((Path(__file__).parents[1] / "config" / "schemas" / "config.schema.yaml").read_text())


def test_train_defaults_equal_schema_defaults():
    from modaltune.training import TRAIN_DEFAULTS

    props = _schema()["properties"]["training"]["properties"]
    assert set(props) == set(TRAIN_DEFAULTS)  # every key the code reads is in the schema, and back
    for key, spec in props.items():
        assert "default" in spec, key
        assert spec["default"] == pytest.approx(TRAIN_DEFAULTS[key]) if isinstance(spec["default"], float) \
            else spec["default"] == TRAIN_DEFAULTS[key], key


def test_schema_accepts_every_selection_the_code_accepts():
    from modaltune.training import SELECTIONS

    enum = set(_schema()["properties"]["training"]["properties"]["selection"]["enum"])
    assert enum == set(SELECTIONS) | {"auto"}


def test_reference_schedule_is_the_authors():
    from modaltune.training import lr_factor

    ref = [lr_factor(e, 15, 10, schedule="reference") for e in range(15)]
    # method 3.3: e0..e10 = 5e-6 (1 + 1.9 e) for lr 1e-4; e11 = 1e-4; e12 9.05e-5; e13 6.55e-5; e14 3.45e-5
    np.testing.assert_allclose(ref[:11], [(1 + 1.9 * e) / 20 for e in range(11)])
    np.testing.assert_allclose(ref[11:], [1.0, 0.9045085, 0.6545085, 0.3454915], rtol=1e-6)
    ours = [lr_factor(e, 15, 10) for e in range(15)]
    assert ours[11] < 1.0 and ours[10] == pytest.approx(1.0)  # ours does not repeat the peak
    from modaltune.errors import InputError

    with pytest.raises(InputError, match="reference"):
        lr_factor(0, 8, 10, schedule="reference")  # the authors' scheduler is invalid for epochs <= warmup


def test_fp16_preset_uses_grad_scaler_without_cuda():
    from modaltune.runs import amp_settings

    cuda = torch.device("cuda")  # a device object only; nothing runs on it
    assert amp_settings("fp16", cuda) == (torch.float16, True)
    assert amp_settings("bf16", cuda) == (torch.bfloat16, False)
    assert amp_settings("fp32", cuda) == (None, False)
    assert amp_settings("fp16", torch.device("cpu")) == (None, False)  # CPU stays fp32
    from modaltune.errors import InputError

    with pytest.raises(InputError, match="precision"):
        amp_settings("half", cuda)


def test_selection_auto_uses_the_models_own_task(cohort, tmp_path):
    from modaltune.training import HISTORY_COLUMNS, train_run

    cols, crit = {}, {}
    for objective, want in (("survival", "val_head_cindex"), ("classification", "val_head_bacc"),
                            ("text_kl", "val_bacc")):
        res = train_run(**run_args(cohort, tmp_path / objective,
                                   model_cfg={"arch": "tiny_test", "objective": objective},
                                   train_cfg={"epochs": 3, "val_cindex": False}))
        hist = pd.read_parquet(tmp_path / objective / "history.parquet")
        cols[objective] = list(hist.columns)
        crit[objective] = res["selection"]["criterion"]
        assert crit[objective] == want and set(hist["criterion"]) == {want}
        scores = hist[want].to_numpy()
        np.testing.assert_allclose(hist["selection_score"], scores)
        if np.isfinite(scores).any():  # best = last maximum (ties -> later epoch)
            assert res["best_epoch"] == int(len(scores) - 1 - np.nanargmax(scores[::-1]))
        if objective == "survival":
            assert hist["val_head_cindex"].notna().all() and hist["val_head_bacc"].isna().all()
        if objective == "classification":
            assert hist["val_head_bacc"].notna().all() and hist["val_head_cindex"].isna().all()
    assert all(c == HISTORY_COLUMNS + ["criterion"] for c in cols.values())  # one column set for all models


def test_model_block_training_overrides_the_global_selection(cohort, tmp_path):
    """models.<name>.training applies to that model only: here selection loss over the global auto (bacc)."""
    from modaltune.training import train_run

    res = train_run(**run_args(cohort, tmp_path / "r", train_cfg={"epochs": 3, "val_cindex": False,
                                                                   "selection": "auto"},
                               model_cfg={"arch": "tiny_test", "objective": "text_kl",
                                          "training": {"selection": "loss"}}))
    hist = pd.read_parquet(tmp_path / "r" / "history.parquet")
    assert res["selection"]["criterion"] == "val_loss" and set(hist["criterion"]) == {"val_loss"}
    np.testing.assert_allclose(hist["selection_score"], -hist["val_loss"])
    assert res["best_epoch"] == int(len(hist) - 1 - np.argmin(hist["val_loss"].to_numpy()[::-1]))


def test_explicit_selection_checked_against_objective():
    from modaltune.errors import InputError
    from modaltune.training import resolve_selection

    assert resolve_selection("loss", "survival") == "val_loss"
    assert resolve_selection("bacc", "survival") == "val_bacc"
    assert resolve_selection("auto", "none") is None
    with pytest.raises(InputError, match="head_bacc"):
        resolve_selection("head_bacc", "survival")
    with pytest.raises(InputError, match="selection"):
        resolve_selection("auroc", "text_kl")


def test_head_counts_classes_of_the_task(tmp_path):
    """Two classes + unlabelled (-1) patients -> 2 outputs; labels with a gap are refused."""
    from modaltune.errors import InputError
    from modaltune.runs import task_classes
    from modaltune.training import train_run

    cases = pd.DataFrame({"label": [0, 1, 1, -1, np.nan, 0]})
    assert task_classes(cases) == 2
    assert task_classes(pd.DataFrame({"label": [0, 1, 2, -1]})) == 3
    with pytest.raises(InputError, match="0..K-1"):
        task_classes(pd.DataFrame({"label": [1, 2, -1]}))
    c = make_cohort(tmp_path, n_patients=20)
    train_run(**run_args(c, tmp_path / "run", model_cfg={"arch": "tiny_test", "objective": "classification"},
                         train_cfg={"epochs": 1}))
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert state["dims"]["n_classes"] == 2 and state["trainable"]["head.weight"].shape[0] == 2


def test_require_rna_drops_patients_without_rna_everywhere(cohort):
    from modaltune.data import CohortData

    no_rna = cohort["ids"][-1]  # make_cohort: the last patient has no RNA
    kw = dict(feature_files=cohort["feature_files"], sheet=cohort["sheet"], pathways_path=cohort["pathways_path"])
    kept = CohortData(cohort["cases_path"], cohort["splits_path"], 0, **kw)
    paper = CohortData(cohort["cases_path"], cohort["splits_path"], 0, require_rna=True, **kw)
    assert no_rna in kept.patient_ids and no_rna not in paper.patient_ids
    assert paper.dropped_without_rna == [no_rna]
    assert set(kept.patient_ids) - set(paper.patient_ids) == {no_rna}
    for parts in (["train"], ["val"], ["test"]):
        assert no_rna not in paper.dataset(parts).patient_ids
    if kept.partition[no_rna] == "train":
        assert no_rna not in paper.fit_ids() and no_rna in kept.fit_ids()


def test_cohort_loaded_once_per_run(cohort, tmp_path, monkeypatch):
    """Every features file is opened once to find usable slides (not once per partition dataset)."""
    from modaltune import data
    from modaltune.training import train_run

    opened = []
    real = data.usable_slide

    def spy(path):
        opened.append(path)
        return real(path)

    monkeypatch.setattr(data, "usable_slide", spy)
    train_run(**run_args(cohort, tmp_path, train_cfg={"epochs": 1}))
    assert opened and len(opened) == len(set(opened))  # three partition datasets, one read of each file
    first_slides = {f for f in cohort["feature_files"] if f.endswith("-DX1.h5")}
    assert first_slides <= set(opened)  # every patient's slides were checked


def test_positional_grid_is_a_model_fact():
    from modaltune.models import positional_grid

    assert positional_grid("modaltune", {}) == (1000, 256)  # Prov-GigaPath default
    assert positional_grid("slide_encoder_lp", {"backbone": {"slide_ngrids": 500, "tile_size": 512}}) == (500, 512)
    assert positional_grid("abmil", {}) == (None, 256)  # ignores positions
    assert positional_grid("late_fusion", {"slide_side": "slide_encoder", "slide": {"backbone": {"slide_ngrids": 200}}}) == (200, 256)
    assert positional_grid("late_fusion", {"slide": {"backbone": {"slide_ngrids": 200}}})[0] is None  # ABMIL side


@pytest.mark.skipif(not _has_real_model_modules(), reason="colleagues' model modules not there yet")
def test_model_facts_on_real_models():
    from modaltune.models import ModelDims, build_model
    from modaltune.models.modaltune import demo_config

    dims = ModelDims(feature_dim=D, n_genes=N_PATHWAYS * GENES_PER_PW,
                     pathway_groups=[list(range(k * GENES_PER_PW, (k + 1) * GENES_PER_PW)) for k in range(N_PATHWAYS)],
                     text_dim=T_DIM)
    mt = build_model("modaltune", demo_config(), dims)
    assert mt.token_names == ("general", "diagnosis", "survival") and mt.text_prompt_index == (0, 1, 3)
    assert mt.headline_tokens == {"subtype": "diagnosis", "survival": "survival"}
    ab = build_model("abmil", {"objective": "classification", "hidden": 8, "attn_dim": 4}, dims)
    assert ab.token_names == ("embedding",) and ab.headline_tokens["subtype"] == "embedding"
