"""ModalTune model: shapes, frozen encoder, adapter identity at init, parameter counts, missing modalities,
batched == per-patient."""

from __future__ import annotations

import pytest
import torch

from modaltune.errors import InputError
from modaltune.models.registry import ModelDims, build_model

torch.set_num_threads(1)  # tiny tensors: thread hand-off costs more than it saves on a shared 2-core box

from modaltune.models.modaltune import ModalTune, demo_config, merge_config, paper_config  # noqa: E402

FEAT, N_GENES, CLIN = 24, 60, 5
GROUPS = [list(range(i * 6, i * 6 + 6)) for i in range(10)]


def _dims(clinical: int = CLIN) -> ModelDims:
    return ModelDims(feature_dim=FEAT, n_genes=N_GENES, pathway_groups=GROUPS, clinical_dim=clinical)


def _cfg(**over) -> dict:
    return merge_config(over, demo_config())


def _patient(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "features": torch.randn(1, n, FEAT, generator=g),
        "coords": torch.randint(0, 256 * 30, (1, n, 2), generator=g).float(),
        "patch_mask": torch.ones(1, n, dtype=torch.bool),
        "genes": torch.randn(1, N_GENES, generator=g),
        "has_genes": torch.tensor([True]),
        "clinical": torch.rand(1, CLIN, generator=g),
        "has_clinical": torch.tensor([True]),
    }


def _collate(patients: list[dict]) -> dict:
    n = max(p["features"].shape[1] for p in patients)
    out = {}
    for key in ("features", "coords", "patch_mask"):
        rows = []
        for p in patients:
            x = p[key][0]
            pad = torch.zeros((n - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype)
            rows.append(torch.cat([x, pad], 0))
        out[key] = torch.stack(rows)
    for key in ("genes", "has_genes", "clinical", "has_clinical"):
        out[key] = torch.cat([p[key] for p in patients])
    return out


def test_registry_build_and_shapes():
    torch.manual_seed(0)
    model = build_model("modaltune", _cfg(), _dims())
    assert isinstance(model, ModalTune) and model.objective == "text_kl"
    out = model(_patient(200, 0))["embedding"]
    assert out.shape == (1, 3, 256) and torch.isfinite(out).all()
    # the three task tokens give three different embeddings
    assert (out[0, 0] - out[0, 1]).abs().max() > 1e-4


def test_tiny_config_forward_backward_reaches_trainable_weights_only():
    torch.manual_seed(0)
    model = ModalTune(_cfg(use_clinical=True), _dims()).train()
    model(_patient(200, 1))["embedding"].sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(grads[n] is None for n in grads if n not in trainable)  # frozen encoder: no gradient
    reached = [n for n in trainable if grads[n] is not None]
    assert len(reached) > len(trainable) // 2
    assert all(torch.isfinite(grads[n]).all() for n in reached)


def test_frozen_encoder_untouched_by_a_training_step():
    torch.manual_seed(1)
    model = ModalTune(_cfg(use_clinical=True), _dims()).train()
    frozen = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=5e-4)
    model(_patient(80, 2))["embedding"].pow(2).sum().backward()
    opt.step()
    for name, p in model.backbone.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert "adapter.blocks.0.injector.gamma" in changed
    assert "final_project.weight" in changed and "gene_encoder.towers.weight1" in changed
    assert set(model.trainable_state_dict()) == set(trainable)


def test_zero_gamma_keeps_frozen_encoder_output():
    torch.manual_seed(2)
    model = ModalTune(_cfg(), _dims()).eval()
    batch = _patient(120, 3)
    feats, coords, mask = model.inputs(batch)
    with torch.no_grad():
        h, _, _ = model.forward_tokens(batch, 0, feats, coords, mask)
        plain = model.backbone.forward_features(feats, coords)
        torch.testing.assert_close(h, plain, atol=0, rtol=0)
        for blk in model.adapter.blocks:
            blk.injector.gamma.fill_(0.5)
        h2, _, _ = model.forward_tokens(batch, 0, feats, coords, mask)
    assert (h2[:, 0] - plain[:, 0]).abs().max() > 1e-3  # the CLS changes once the injectors act


def test_double_residual_switch():
    torch.manual_seed(3)
    assert paper_config()["adapter"]["double_residual"] is False  # bug 2 fixed by default
    a = ModalTune(_cfg(adapter={"double_residual": True}), _dims()).eval()  # the authors' code
    b = ModalTune(_cfg(), _dims()).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 7, 64)
    c = torch.randn(1, a.adapter.gene_pe.shape[1], 64)
    cross_a = a.adapter.blocks[0].extractor.cross
    cross_b = b.adapter.blocks[0].extractor.cross
    with torch.no_grad():
        torch.testing.assert_close(cross_a(c, x), c + cross_b(c, x))


def test_frozen_dropout_switch():
    assert paper_config()["adapter"]["frozen_dropout"] is False  # bug 3 fixed by default
    on = ModalTune(_cfg(adapter={"frozen_dropout": True}), _dims()).train()  # the authors' code
    off = ModalTune(_cfg(), _dims()).train()
    assert on.backbone.training and on.backbone.encoder.layers[0].dropout_module.training
    assert not off.backbone.training and not off.backbone.encoder.layers[0].dropout_module.training
    assert off.adapter.training and off.gene_encoder.training
    batch = _patient(60, 4)
    torch.manual_seed(0)
    off.eval()
    with torch.no_grad():
        ref = off(batch)["embedding"]
        # train mode with only the trainable parts' dropout silenced: the frozen encoder is deterministic
        off.train()
        off.gene_encoder.eval()
        off.adapter.eval()
        torch.testing.assert_close(off(batch)["embedding"], ref)


def test_missing_modalities_use_learned_tokens():
    torch.manual_seed(4)
    model = ModalTune(_cfg(use_clinical=True), _dims()).eval()
    batch = _patient(70, 5)
    missing = dict(batch, has_genes=torch.tensor([False]), has_clinical=torch.tensor([False]))
    with torch.no_grad():
        full = model(batch)["embedding"]
        out = model(missing)["embedding"]
        scrambled = model(dict(missing, genes=torch.randn(1, N_GENES) * 5, clinical=torch.rand(1, CLIN)))["embedding"]
    assert torch.isfinite(out).all()
    assert (out - full).abs().max() > 1e-4
    torch.testing.assert_close(scrambled, out, atol=0, rtol=0)  # absent values are never read
    model.train()
    model(missing)["embedding"].sum().backward()
    assert model.missing_genes.grad is not None and model.missing_genes.grad.abs().sum() > 0
    assert model.missing_clinical.grad.abs().sum() > 0


def test_batched_padding_equals_per_patient():
    torch.manual_seed(5)
    model = ModalTune(_cfg(use_clinical=True), _dims()).eval()
    p1, p2 = _patient(150, 6), _patient(90, 7)
    p2 = dict(p2, has_genes=torch.tensor([False]))
    batch = _collate([p1, p2])
    # padding in the middle of a bag must be handled too
    perm = torch.cat([torch.arange(40), torch.arange(90, 150), torch.arange(40, 90)])
    for key in ("features", "coords", "patch_mask"):
        batch[key][1] = batch[key][1][perm]
    with torch.no_grad():
        both = model(batch)["embedding"]
        one = model(p1)["embedding"]
        two = model(p2)["embedding"]
    torch.testing.assert_close(both[0], one[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[1], two[0], atol=1e-5, rtol=1e-4)


def test_grad_checkpointing_gives_same_gradients():
    cfg = _cfg(backbone={"dropout": 0.0, "drop_path_rate": 0.0}, adapter={"drop_path": 0.0},
               genes={"dropout": 0.0})
    torch.manual_seed(6)
    a = ModalTune(cfg, _dims()).train()
    b = ModalTune(merge_config({"grad_checkpointing": True}, cfg), _dims()).train()
    b.load_state_dict(a.state_dict())
    batch = _patient(64, 8)
    for m in (a, b):
        for blk in m.adapter.blocks:
            blk.injector.gamma.data.fill_(0.1)
        m(batch)["embedding"].square().sum().backward()
    ga = dict(a.named_parameters())
    for n, p in b.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ga[n].grad, atol=1e-6, rtol=1e-4, msg=n)


def test_config_errors():
    with pytest.raises(InputError, match="interaction_indexes"):
        ModalTune(_cfg(backbone={"interaction_indexes": [[0, 1], [2, 2]]}), _dims())
    with pytest.raises(InputError, match="clinical_dim"):
        ModalTune(_cfg(use_clinical=True), _dims(clinical=0))
    with pytest.raises(InputError, match="backbone.type"):
        ModalTune(_cfg(backbone={"type": "nope"}), _dims())


def _paper_groups() -> list[list[int]]:
    # 331 pathways with 9,731 memberships, as in the authors' gene table (method 2.4).
    sizes = [29] * 331
    for i in range(9731 - sum(sizes)):
        sizes[i] += 1
    groups, off = [], 0
    for s in sizes:
        groups.append(list(range(off, off + s)))
        off += s
    return groups


def test_paper_configuration_trainable_parameters_match_hand_count():
    groups = _paper_groups()
    dims = ModelDims(feature_dim=1536, n_genes=9731, pathway_groups=groups)
    model = ModalTune(paper_config(), dims)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    missing_tokens = 64 * 768  # our learned "missing genes" token set (not in the authors' model)
    assert n_train - missing_tokens == 33_524_890
    assert n_frozen == 86_330_880
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.adapter.blocks[0].injector) == 669_120
    assert count(model.adapter.blocks[0].extractor) == 965_760
    assert count(model.adapter.blocks) == 6_836_160
    assert count(model.adapter.prompt_sa) == 1_333_632
    assert count(model.gene_encoder) == 25_102_170


# ----------------------------------------------------------------------------- TITAN backbone
def _titan_cfg() -> dict:
    from modaltune.models.configs import titan_config

    return merge_config({"backbone": {"embed_dim": 64, "num_heads": 4, "tile_size": 256},
                         "adapter": {"num_heads": 4}, "genes": {"latent_dim": 16, "final_groups": 8}},
                        titan_config())


def test_titan_alibi_slopes_and_cell_aggregation():
    from modaltune.models.titan import TitanEncoder, alibi_slopes

    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    assert alibi_slopes(12)[8:] == pytest.approx([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])
    enc = TitanEncoder(in_chans=4, embed_dim=16, depth=1, num_heads=4, tile_size=100)
    feats = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 3.0, 0]])
    coords = torch.tensor([[1000.0, 500.0], [1050.0, 560.0], [1210.0, 500.0]])  # first two share a cell
    grid, pos = enc._cells(feats, coords)
    assert pos.tolist() == [[0, 0], [2, 0]]
    assert grid.tolist() == [[1.0, 2.0, 0, 0], [0, 0, 3.0, 0]]
    _, ctx = enc.prepare(feats[None], coords[None])
    assert ctx["bias"][0, 0, 1, 2].item() == pytest.approx(-2.0 * alibi_slopes(4)[0])
    assert ctx["bias"][0, :, 0].abs().sum() == 0  # CLS row unbiased


def test_titan_checkpoint_round_trip(tmp_path):
    from modaltune.models.titan import TitanEncoder, load_titan_checkpoint

    torch.manual_seed(7)
    src = TitanEncoder(in_chans=8, embed_dim=16, depth=2, num_heads=4).eval()
    state = {f"vision_encoder.{k}": v for k, v in src.state_dict().items()}
    state["text_encoder.token_embedding.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "titan.pt")
    dst = TitanEncoder(in_chans=8, embed_dim=16, depth=2, num_heads=4).eval()
    assert load_titan_checkpoint(dst, tmp_path / "titan.pt") == ["text_encoder.token_embedding.weight"]
    feats, coords = torch.randn(1, 30, 8), torch.randint(0, 9000, (1, 30, 2)).float()
    with torch.no_grad():
        torch.testing.assert_close(dst(feats, coords), src(feats, coords), atol=0, rtol=0)
    del state["vision_encoder.norm.bias"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(InputError, match="vision_encoder.norm.bias"):
        load_titan_checkpoint(dst, tmp_path / "broken.pt")


def test_titan_modaltune_batched_equals_per_patient():
    torch.manual_seed(8)
    dims = ModelDims(feature_dim=FEAT, n_genes=N_GENES, pathway_groups=GROUPS)
    model = ModalTune(_titan_cfg(), dims).eval()
    assert model.backbone.n_layers == 6 and model.final_norm.normalized_shape == (64 * 3,)
    p1, p2 = _patient(120, 9), _patient(70, 10)
    with torch.no_grad():
        both = model(_collate([p1, p2]))["embedding"]
        one, two = model(p1)["embedding"], model(p2)["embedding"]
    assert both.shape == (2, 3, 256) and torch.isfinite(both).all()
    torch.testing.assert_close(both[0], one[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[1], two[0], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_titan_paper_configuration_trainable_parameters():
    from modaltune.models.configs import titan_config

    dims = ModelDims(feature_dim=768, n_genes=9731, pathway_groups=_paper_groups())
    model = ModalTune(titan_config(), dims)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # method 2.4: TITAN gene-only with the 'cat' head ~33.92 M (= 33,524,890 + LN/Linear over 3x768 inputs)
    assert n_train - 64 * 768 == 33_921_178
