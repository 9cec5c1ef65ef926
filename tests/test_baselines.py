"""Tests for the baseline models: shapes, gradients, masking, missing modalities, a planted-signal fit."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modaltune.models.baselines as baselines
from modaltune.errors import InputError
from modaltune.models.baselines import slide_encoder as se
from modaltune.models.baselines.coattn import InteractionAttention
from modaltune.models.registry import _REGISTRY, ModelDims

FEAT, GENES, N_PATH = 16, 60, 6
DIMS = ModelDims(
    feature_dim=FEAT, n_genes=GENES,
    pathway_groups=[list(range(i * 10, i * 10 + 10)) for i in range(N_PATH)],
    n_classes=3, n_bins=4,
)

TINY_LONGNET = {"type": "longnet", "embed_dim": 16, "depth": 2, "num_heads": 2, "segment_lengths": [4, 8],
                "dilated_ratios": [1, 2], "dropout": 0.1, "drop_path_rate": 0.1}
# Demo-size configs (the same blocks as docs/BASELINES.md, scaled to the test's 16-d features).
CONFIGS: dict[str, dict] = {
    "abmil": {"hidden": 32, "attn_dim": 16, "dropout": 0.1},
    "transmil": {"hidden": 32, "num_heads": 4},
    "mlp": {"hidden": [32, 32]},
    "snn": {"hidden": [32, 32]},
    "gene_mixer": {"latent_dim": 16, "depth": 2, "out_dim": 32},
    "mcat": {"dim": 32, "num_heads": 4, "n_layers": 1},
    "survpath": {"dim": 32},
    "survpath_ours": {"dim": 32, "variant": "ours", "attn_dropout": 0.1},
    "late_fusion": {"slide_side": "abmil", "slide": {"hidden": 32, "attn_dim": 16}, "gene_side": "snn",
                    "genes": {"hidden": [32, 32]}},
    "late_fusion_transmil": {"slide_side": "transmil", "slide": {"hidden": 32, "num_heads": 4},
                             "gene_side": "gene_mixer", "genes": {"latent_dim": 16, "depth": 1, "out_dim": 16},
                             "fusion_hidden": 32},
    "late_fusion_slide_encoder": {"slide_side": "slide_encoder", "slide": {"backbone": TINY_LONGNET},
                                  "gene_side": "mlp", "genes": {"hidden": [32]}},
    "slide_encoder_tuned": {"backbone": TINY_LONGNET, "activation_checkpointing": True},
}
SUPERVISED = list(CONFIGS)
USES_PATCHES = ["abmil", "transmil", "mcat", "survpath", "survpath_ours", "late_fusion", "late_fusion_transmil",
                "late_fusion_slide_encoder", "slide_encoder_tuned"]
USES_GENES = ["mlp", "snn", "gene_mixer", "mcat", "survpath", "survpath_ours", "late_fusion", "late_fusion_transmil",
              "late_fusion_slide_encoder"]


class TinySlideEncoder(nn.Module):
    """A non-LongNet backbone with the generic interface: CLS + 2 transformer layers over patches."""

    embed_dim = 16

    def __init__(self, feature_dim: int = FEAT, dropout: float = 0.1):
        super().__init__()
        self.proj = nn.Linear(feature_dim, self.embed_dim)
        self.pos = nn.Linear(2, self.embed_dim)
        self.cls = nn.Parameter(torch.randn(1, 1, self.embed_dim) * 0.02)
        self.layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(self.embed_dim, 2, 32, dropout=dropout, batch_first=True)
             for _ in range(2)]
        )

    def forward(self, features, coords, patch_mask):
        x = self.proj(features) + self.pos(coords / 1000.0)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        keep = torch.cat([torch.ones_like(patch_mask[:, :1]), patch_mask], dim=1)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~keep)
        return x[:, 0]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: extra intra-op threads only add contention (and slow down badly on a busy 2-core box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _arch(name: str) -> str:
    if name.startswith("survpath"):
        return "survpath"
    return "late_fusion" if name.startswith("late_fusion") else name


def build(name: str, objective: str = "classification", dims: ModelDims = DIMS) -> nn.Module:
    torch.manual_seed(0)
    return _REGISTRY[_arch(name)]({"arch": _arch(name), "objective": objective, **CONFIGS[name]}, dims)


def make_batch(n_real=(12, 7, 0, 3), n_total: int = 12, seed: int = 0, has_genes=(True, False, True, True)):
    g = torch.Generator().manual_seed(seed)
    b = len(n_real)
    mask = torch.zeros(b, n_total, dtype=torch.bool)
    for i, n in enumerate(n_real):
        mask[i, :n] = True
    feats = torch.randn(b, n_total, FEAT, generator=g) * mask.unsqueeze(-1)
    coords = torch.randint(0, 4000, (b, n_total, 2), generator=g).float() * mask.unsqueeze(-1)
    has = torch.tensor(has_genes)
    genes = torch.randn(b, GENES, generator=g) * has.unsqueeze(1)
    return {
        "features": feats, "coords": coords, "patch_mask": mask, "genes": genes, "has_genes": has,
        "clinical": torch.zeros(b, 0), "has_clinical": torch.zeros(b, dtype=torch.bool),
        "label": torch.zeros(b, dtype=torch.long), "time": torch.ones(b), "event": torch.ones(b),
        "patient_id": [f"P{i}" for i in range(b)], "site": ["BRCA"] * b,
    }


def test_registry_has_every_baseline():
    assert set(baselines.BASELINE_NAMES) <= set(_REGISTRY)
    if importlib.util.find_spec("modaltune.models.modaltune") is not None:
        from modaltune.models.registry import available_models

        assert set(baselines.BASELINE_NAMES) <= set(available_models())


@pytest.mark.parametrize("objective", ["classification", "survival"])
@pytest.mark.parametrize("name", SUPERVISED)
def test_output_shapes_and_objective(name, objective):
    model = build(name, objective).eval()
    out = model(make_batch())
    assert model.objective == objective
    assert out["embedding"].shape == (4, model.embed_dim)
    key, n = ("logits", DIMS.n_classes) if objective == "classification" else ("hazards", DIMS.n_bins)
    assert out[key].shape == (4, n)
    assert set(out) == {"embedding", key}
    for v in out.values():
        assert torch.isfinite(v).all()


@pytest.mark.parametrize("name", SUPERVISED)
def test_every_trainable_parameter_gets_a_gradient(name):
    # The batch has a patient without patches and one without RNA, so the missing slots are used too.
    model = build(name, "survival").train()
    out = model(make_batch())
    (out["embedding"].sum() + out["hazards"].sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p.grad).all(), n
            if not n.endswith("attn_c.bias"):  # a constant added to scores before a softmax: gradient 0
                assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", USES_PATCHES)
def test_padded_patches_do_not_change_the_output(name):
    model = build(name).eval()
    batch = make_batch(n_real=(9, 5, 0, 3), n_total=9)
    padded = make_batch(n_real=(9, 5, 0, 3), n_total=9)
    extra = 7  # append padding slots holding garbage: they must be ignored
    for key, fill in (("features", 50.0), ("coords", 9999.0)):
        t = padded[key]
        padded[key] = torch.cat([t, torch.full((4, extra, t.shape[2]), fill)], dim=1)
    padded["patch_mask"] = torch.cat([batch["patch_mask"], torch.zeros(4, extra, dtype=torch.bool)], dim=1)
    padded["features"][1, 5:] = -30.0  # padding inside the bag of a shorter patient too
    with torch.no_grad():
        a, b = model(batch), model(padded)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", USES_GENES)
def test_missing_genes_use_the_learned_slot(name):
    model = build(name).eval()
    batch = make_batch()
    other = make_batch()
    other["genes"][1] = torch.randn(GENES) * 100  # patient 1 has has_genes False: values must be ignored
    with torch.no_grad():
        a, b = model(batch), model(other)
    assert torch.isfinite(a["embedding"]).all() and torch.isfinite(a["logits"]).all()
    torch.testing.assert_close(a["embedding"], b["embedding"])
    all_missing = make_batch(has_genes=(False, False, False, False))
    with torch.no_grad():
        assert torch.isfinite(model(all_missing)["logits"]).all()


def test_abmil_attention_is_a_distribution_over_real_patches():
    model = build("abmil").eval()
    batch = make_batch()
    with torch.no_grad():
        w = model.attention(batch)
    mask = batch["patch_mask"]
    assert torch.all(w[~mask] == 0)
    torch.testing.assert_close(w.sum(1), mask.any(1).float())


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17])
def test_transmil_square_padding_any_bag_size(n):
    model = build("transmil").eval()
    batch = make_batch(n_real=(n,), n_total=n, has_genes=(True,))
    with torch.no_grad():
        out = model(batch)
    assert out["logits"].shape == (1, 3) and torch.isfinite(out["logits"]).all()


def test_interaction_attention_equals_full_masked_attention():
    torch.manual_seed(0)
    attn = InteractionAttention(8, heads=2, dim_head=4, dropout=0.0).eval()
    path, patches = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    p_out, x_out = attn(path, patches, mask)
    # Naive reference: one attention over all 8 tokens with SurvPath's allowed-pairs matrix.
    x = torch.cat([path, patches], 1)
    q, k, v = attn.qkv(x).view(2, 8, 3, 2, 4).permute(2, 0, 3, 1, 4)
    allowed = torch.zeros(2, 8, 8, dtype=torch.bool)
    allowed[:, :3, :3] = True  # pathway -> pathway
    allowed[:, :3, 3:] = mask[:, None, :]  # pathway -> real patches
    allowed[:, 3:, :3] = True  # patch -> pathway; no patch -> patch
    scores = (q @ k.transpose(-1, -2)) / 2.0
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    ref = attn.out((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(p_out, ref[:, :3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_out, ref[:, 3:], rtol=1e-5, atol=1e-6)


def _full_masked_attention(qkv: nn.Linear, x: Tensor, n_path: int, mask: Tensor, heads: int) -> Tensor:
    """SurvPath's attention written as one softmax over all tokens with the allowed-pairs matrix."""
    b, n, _ = x.shape
    dh = qkv.out_features // (3 * heads)
    q, k, v = qkv(x).view(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4)
    allowed = torch.zeros(b, n, n, dtype=torch.bool)
    allowed[:, :n_path, :n_path] = True
    allowed[:, :n_path, n_path:] = mask[:, None, :]
    allowed[:, n_path:, :n_path] = True
    scores = (q @ k.transpose(-1, -2)) / dh**0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def test_survpath_published_layer_matches_the_published_formula():
    dim = 16
    model = _REGISTRY["survpath"]({"arch": "survpath", "objective": "survival", "dim": dim}, DIMS).eval()
    assert model.variant == "published"
    # no output projection, attention width dim/2 (1 head of dim/2), FF mult 1, LayerNorm(dim/2), head dim -> dim/4
    assert isinstance(model.attn.out, nn.Identity) and model.attn.qkv.out_features == 3 * dim // 2
    lin = [m for m in model.ff if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(dim // 2, dim // 2)] * 2
    assert model.norm_out.normalized_shape == (dim // 2,) and model.embed_dim == dim
    head = [m for m in model.head.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in head] == [(dim, dim // 4), (dim // 4, DIMS.n_bins)]
    batch = make_batch(n_real=(12, 7, 3), has_genes=(True, False, True))
    with torch.no_grad():
        got = model.embed(batch)
        feats, mask = batch["features"], batch["patch_mask"]
        path = model.no_genes(model.towers(batch["genes"]), batch["has_genes"])
        x = torch.cat([path, model.wsi_projection(feats)], 1)
        attn = _full_masked_attention(model.attn.qkv, model.norm_attn(x), N_PATH, mask, heads=1)
        ln, fc1, _, _, fc2 = model.ff
        y = F.layer_norm(fc2(F.gelu(fc1(ln(attn)))), (dim // 2,), model.norm_out.weight, model.norm_out.bias)
        m = mask.float().unsqueeze(-1)
        want = torch.cat([y[:, :N_PATH].mean(1), (y[:, N_PATH:] * m).sum(1) / m.sum(1)], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # an embedding with residuals (today's variant) would differ
    ours = _REGISTRY["survpath"]({"objective": "survival", "dim": dim, "variant": "ours"}, DIMS)
    assert ours.embed_dim == 2 * dim and isinstance(ours.attn.out, nn.Sequential)
    assert [m.out_features for m in ours.ff if isinstance(m, nn.Linear)] == [4 * dim, dim]
    with pytest.raises(InputError, match="variant"):
        _REGISTRY["survpath"]({"objective": "survival", "variant": "fancy"}, DIMS)


def test_coattention_has_no_attention_dropout_unless_configured():
    mcat = _REGISTRY["mcat"]({"objective": "survival", "dim": 16, "num_heads": 2, "n_layers": 1}, DIMS)
    survpath = _REGISTRY["survpath"]({"objective": "survival", "dim": 16}, DIMS)
    assert mcat.coattn.dropout == 0.0 and survpath.attn.attn_dropout == 0.0
    q, kv = torch.randn(2, 6, 16), torch.randn(2, 40, 16)
    mask = torch.ones(2, 40, dtype=torch.bool)
    for attn_dropout, same in ((0.0, True), (0.5, False)):
        m = _REGISTRY["mcat"]({"objective": "survival", "dim": 16, "num_heads": 2, "n_layers": 1,
                               "attn_dropout": attn_dropout}, DIMS).train()
        s = _REGISTRY["survpath"]({"objective": "survival", "dim": 16, "attn_dropout": attn_dropout}, DIMS).train()
        torch.manual_seed(1)
        a1 = m.coattn(q, kv, kv, need_weights=False)[0], s.attn(q, kv, mask)[0]
        a2 = m.coattn(q, kv, kv, need_weights=False)[0], s.attn(q, kv, mask)[0]
        for x, y in zip(a1, a2, strict=True):
            assert torch.equal(x, y) is same, attn_dropout


def test_bad_configs_raise_input_error():
    with pytest.raises(InputError, match="objective"):
        _REGISTRY["abmil"]({"arch": "abmil", "objective": "text_kl"}, DIMS)
    with pytest.raises(InputError, match="slide_side"):
        _REGISTRY["late_fusion"]({"objective": "survival", "slide_side": "vit"}, DIMS)
    with pytest.raises(InputError, match="n_genes"):
        _REGISTRY["snn"]({"objective": "survival"}, ModelDims(feature_dim=FEAT, n_genes=0))
    with pytest.raises(InputError, match="pathway_groups"):
        _REGISTRY["mcat"]({}, ModelDims(feature_dim=FEAT, n_genes=GENES))
    with pytest.raises(InputError, match="genes"):
        build("snn")({"genes": torch.zeros(2, 5), "has_genes": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(InputError, match=r"unknown key\(s\) \['hiden'\]; valid keys: .*'hidden'"):
        _REGISTRY["snn"]({"objective": "survival", "hiden": [8]}, DIMS)


def test_slide_encoder_lp_is_frozen_and_deterministic():
    model = _REGISTRY["slide_encoder_lp"]({"backbone": TINY_LONGNET}, DIMS)
    assert model.objective == "none"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
    model.train()  # the trainer may call train(); the frozen encoder must stay in eval mode
    assert not model.backbone.training
    batch = make_batch()
    out1, out2 = model(batch), model(batch)
    assert set(out1) == {"embedding"} and out1["embedding"].shape == (4, 16)
    torch.testing.assert_close(out1["embedding"], out2["embedding"])
    # The LP vector is the backbone's own output (LongNet: CLS after the final norms) for each patient.
    with torch.no_grad():
        ref = model.backbone(batch["features"][:1], batch["coords"][:1], batch["patch_mask"][:1])
    torch.testing.assert_close(out1["embedding"][:1], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="objective"):
        _REGISTRY["slide_encoder_lp"]({"objective": "classification"}, DIMS)


def test_slide_encoder_uses_a_given_checkpoint(tmp_path):
    torch.manual_seed(3)
    source = se.build_slide_backbone(TINY_LONGNET, DIMS)
    path = tmp_path / "slide_encoder.pth"
    torch.save({"model": source.state_dict()}, path)
    model = _REGISTRY["slide_encoder_lp"]({"backbone": {**TINY_LONGNET, "checkpoint": str(path)}}, DIMS)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v)


@pytest.mark.parametrize("name", ["slide_encoder_lp", "abmil", "transmil", "survpath"])
def test_padding_between_real_patches_is_ignored(name):
    cfg = {"backbone": TINY_LONGNET} if name == "slide_encoder_lp" else {"objective": "classification",
                                                                          **CONFIGS[name]}
    torch.manual_seed(0)
    model = _REGISTRY[name](cfg, DIMS).eval()
    prefix = make_batch(n_real=(5, 3), n_total=5, has_genes=(True, True))
    slots = torch.tensor([[0, 2, 4, 6, 8], [1, 4, 7, 7, 7]])  # where each real patch goes (row 1: 3 real)
    spread = make_batch(n_real=(0, 0), n_total=9, has_genes=(True, True))
    spread["genes"] = prefix["genes"]
    spread["features"] = torch.full((2, 9, FEAT), 77.0)  # garbage in the padding slots
    for b in range(2):
        n = int(prefix["patch_mask"][b].sum())
        for key in ("features", "coords"):
            spread[key][b, slots[b, :n]] = prefix[key][b, :n]
        spread["patch_mask"][b, slots[b, :n]] = True
    with torch.no_grad():
        a, c = model(prefix)["embedding"], model(spread)["embedding"]
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone", ["longnet", "generic"])
def test_activation_checkpointing_gives_the_same_gradients(backbone):
    def make(ckpt: bool):
        torch.manual_seed(0)
        bb = se.build_slide_backbone(TINY_LONGNET, DIMS) if backbone == "longnet" else TinySlideEncoder()
        return se.SlideEncoderBranch(bb, "classification", DIMS, freeze=False, activation_checkpointing=ckpt)

    plain, ckpt = make(False), make(True)
    assert list(plain.state_dict()) == list(ckpt.state_dict())  # checkpointing keeps the published keys
    batch = make_batch()
    outs = []
    for m in (plain, ckpt):
        m.train()
        torch.manual_seed(1)
        out = m(batch)["logits"]
        out.sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1])
    grads_plain = dict(plain.named_parameters())
    for n, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads_plain[n].grad, rtol=1e-4, atol=1e-6)


def _planted_data(n: int = 40, seed: int = 0):
    """Two classes; class 1 has a shifted patch subset and up-regulated genes of pathway 0."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    batch = make_batch(n_real=tuple([10] * n), n_total=10, seed=seed, has_genes=tuple([True] * n))
    batch["features"][:, :4, :4] += 2.0 * y.view(-1, 1, 1)
    batch["genes"][:, :10] += 3.0 * y.view(-1, 1)
    batch["genes"] += 0.1 * torch.randn(batch["genes"].shape, generator=g)
    batch["label"] = y
    return batch, y


@pytest.mark.parametrize("name", SUPERVISED)
def test_tiny_fit_beats_chance(name):
    dims = ModelDims(feature_dim=FEAT, n_genes=GENES, pathway_groups=DIMS.pathway_groups, n_classes=2)
    model = build(name, "classification", dims)
    batch, y = _planted_data(seed=0)
    held_out, y_held_out = _planted_data(seed=1)  # same planted signal, new noise: scored, never fitted
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(batch)["logits"], y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(held_out)["logits"].argmax(1) == y_held_out).float().mean().item()
    assert acc > 0.8, acc


def test_demo_configs_in_docs_build_and_run():
    """Every yaml block of docs/BASELINES.md builds (no unknown-key warning) and runs on demo-size inputs."""
    import re
    import warnings
    from pathlib import Path

    yaml = pytest.importorskip("yaml")
    text = (Path(__file__).resolve().parents[1] / "docs" / "BASELINES.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) >= 11
    dims = ModelDims(feature_dim=64, n_genes=600, n_classes=2, n_bins=4,
                     pathway_groups=[list(range(i * 25, i * 25 + 25)) for i in range(24)])
    batch = {"features": torch.randn(2, 20, 64), "coords": torch.randint(0, 20000, (2, 20, 2)).float(),
             "patch_mask": torch.ones(2, 20, dtype=torch.bool), "genes": torch.randn(2, 600),
             "has_genes": torch.tensor([True, False])}
    seen = set()
    for block in blocks:
        for name, cfg in yaml.safe_load(block).items():
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                model = _REGISTRY[cfg["arch"]](cfg, dims).eval()
            with torch.no_grad():
                out = model(batch)
            assert out["embedding"].shape == (2, model.embed_dim), name
            seen.add(cfg["arch"])
    assert seen == set(baselines.BASELINE_NAMES)
