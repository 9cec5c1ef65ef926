"""LongNet slide encoder and dilated attention: published key names, numerics vs a float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modaltune.errors import InputError
from modaltune.models.dilated_attention import (
    GIGAPATH_SEGMENT_LENGTHS,
    dilated_attention,
    naive_dilated_attention,
)
from modaltune.models.longnet import LongNetViT, load_slide_encoder_checkpoint, sincos_pos_embed

torch.set_num_threads(1)  # tiny tensors: thread hand-off costs more than it saves on a shared 2-core box

# Published slide_encoder.pth["model"] keys (prov-gigapath gigapath/slide_encoder.py + vendored torchscale
# Encoder/EncoderLayer/DilatedAttention/FeedForwardNetwork with subln=True, normalize_output=True).
_LAYER_KEYS = [
    "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "self_attn.inner_attn_ln.weight", "self_attn.inner_attn_ln.bias",
    "self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
    "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias",
    "ffn.ffn_layernorm.weight", "ffn.ffn_layernorm.bias",
    "final_layer_norm.weight", "final_layer_norm.bias",
]
EXPECTED_KEYS = {
    "cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "encoder.layer_norm.weight",
    "encoder.layer_norm.bias", "norm.weight", "norm.bias",
} | {f"encoder.layers.{i}.{k}" for i in range(12) for k in _LAYER_KEYS}

TINY = dict(in_chans=24, embed_dim=32, depth=2, num_heads=4, segment_lengths=[8, 32, 128],
            dilated_ratios=[1, 2, 4], dropout=0.0, drop_path_rate=0.0)


def test_full_size_keys_and_parameter_count():
    with torch.device("meta"):
        model = LongNetViT()
    sd = model.state_dict()
    assert len(EXPECTED_KEYS) == 247
    assert set(sd) == EXPECTED_KEYS
    assert sum(p.numel() for p in model.parameters()) == 86_330_880
    assert tuple(sd["encoder.layers.0.ffn.ffn_layernorm.weight"].shape) == (3072,)  # sub-LN on the FFN width
    assert model.encoder.layers[0].self_attn.num_heads == 16
    assert list(model.encoder.layers[0].self_attn.segment_lengths) == [1024, 5792, 32768, 185363, 1048576]
    # drop path grows linearly 0 -> 0.1 over the layers
    assert model.encoder.layers[0].drop_path.__class__.__name__ == "Identity"
    assert model.encoder.layers[11].drop_path.drop_prob == pytest.approx(0.1)


def test_published_segment_lengths_formula():
    seg = np.power(2, np.linspace(np.log2(1024), int(np.log2((262144 // 256) ** 2)), 5)).astype(int)
    assert tuple(seg.tolist()) == GIGAPATH_SEGMENT_LENGTHS


def _mae_table(embed_dim: int, ngrids: int) -> np.ndarray:
    # The published MAE construction, written out for a small grid (meshgrid with w first, cls row of zeros).
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(ngrids, dtype=np.float32), np.arange(ngrids, dtype=np.float32))
    emb = np.concatenate([one_d(embed_dim // 2, gw), one_d(embed_dim // 2, gh)], axis=1)
    return np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)


def test_sincos_rows_match_published_table():
    table = _mae_table(16, 7)
    idx = torch.arange(table.shape[0])
    np.testing.assert_allclose(sincos_pos_embed(idx, 16, 7).numpy(), table, atol=1e-6)
    model = LongNetViT(**{**TINY, "embed_dim": 16}, slide_ngrids=7, tile_size=256)
    coords = torch.tensor([[[0.0, 0.0], [300.0, 10.0], [10.0, 600.0], [1791.0, 1791.0]]])
    pos = model.coords_to_pos(coords)
    assert pos.tolist() == [[1, 1 + 7, 1 + 2, 1 + 6 * 7 + 6]]


def test_coords_outside_grid_raise_input_error():
    model = LongNetViT(**TINY, slide_ngrids=4)
    with pytest.raises(InputError, match="coords"):
        model.coords_to_pos(torch.tensor([[[256.0 * 4, 0.0]]]))


@pytest.mark.parametrize(
    "n,heads,segs,ratios",
    [(37, 4, [8, 32], [1, 2]), (150, 6, [16, 64, 256], [1, 2, 4]), (300, 4, [8, 32, 128, 512], [1, 2, 4, 8]),
     (97, 3, [10, 40], [2, 4])],
)
def test_fast_and_reference_kernels_match_naive_float64(n, heads, segs, ratios):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, n, heads, 8, generator=g, dtype=torch.float64) for _ in range(3))
    naive = naive_dilated_attention(q, k, v, segs, ratios)
    ref = dilated_attention(q, k, v, segs, ratios, backend="reference")
    torch.testing.assert_close(ref, naive, atol=1e-10, rtol=1e-10)
    fast = dilated_attention(q.float(), k.float(), v.float(), segs, ratios, backend="cpu_flash")
    torch.testing.assert_close(fast.double(), naive, atol=1e-5, rtol=1e-5)


def test_zero_padding_is_unmasked_as_published():
    # 10 tokens, one segment of 8 -> the second segment holds 2 real tokens + 6 zero keys, which
    # dilute the softmax: for q = k = 0 rows a token attends uniformly over 8 keys, not 2.
    q = torch.zeros(1, 10, 1, 4, dtype=torch.float64)
    v = torch.arange(10, dtype=torch.float64).view(1, 10, 1, 1).expand(1, 10, 1, 4).contiguous()
    out = dilated_attention(q, q, v, [8], [1], backend="reference")
    assert out[0, 9, 0, 0].item() == pytest.approx((8 + 9) / 8)
    assert out[0, 0, 0, 0].item() == pytest.approx(sum(range(8)) / 8)


def test_dilation_is_per_head_group():
    # ratio 2, 2 heads: head 0 reads even positions, head 1 odd ones; uncovered outputs come only from
    # the other (ratio 1) branch -> with a single ratio-2 branch they are exactly zero.
    n = 8
    q = torch.zeros(1, n, 2, 1, dtype=torch.float64)
    v = torch.arange(n, dtype=torch.float64).view(1, n, 1, 1).expand(1, n, 2, 1).contiguous()
    out = dilated_attention(q, q, v, [8], [2], backend="reference")[0, :, :, 0]
    assert out[0, 0].item() == pytest.approx((0 + 2 + 4 + 6) / 4)
    assert out[1, 1].item() == pytest.approx((1 + 3 + 5 + 7) / 4)
    assert out[1, 0].item() == 0.0 and out[0, 1].item() == 0.0


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, n, TINY["in_chans"], generator=g)
    coords = torch.randint(0, 256 * 40, (1, n, 2), generator=g).float()
    return feats, coords


@pytest.mark.parametrize("depth,n", [(1, 120), (2, 299)])
def test_longnet_fast_float32_matches_float64_reference(depth, n):
    torch.manual_seed(1)
    model = LongNetViT(**{**TINY, "depth": depth}).eval()
    feats, coords = _inputs(n)
    with torch.no_grad():
        fast = model.forward_features(feats, coords)
        model64 = model.double()
        for layer in model64.encoder.layers:
            layer.self_attn.backend = "reference"
        ref = model64.forward_features(feats.double(), coords.double())
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-5)


def test_batched_padding_equals_per_patient():
    torch.manual_seed(2)
    model = LongNetViT(**TINY).eval()
    f1, c1 = _inputs(50, 1)
    f2, c2 = _inputs(90, 2)
    feats = torch.zeros(2, 90, TINY["in_chans"])
    coords = torch.zeros(2, 90, 2)
    feats[0, :50], coords[0, :50], feats[1], coords[1] = f1[0], c1[0], f2[0], c2[0]
    mask = torch.zeros(2, 90, dtype=torch.bool)
    mask[0, :50] = True
    mask[1] = True
    with torch.no_grad():
        both = model(feats, coords, mask)
        one = model(f1, c1)
        two = model(f2, c2)
    torch.testing.assert_close(both[0], one[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], two[0], atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip_and_errors(tmp_path, caplog):
    torch.manual_seed(3)
    src = LongNetViT(**TINY).eval()
    path = tmp_path / "slide_encoder.pth"
    torch.save({"model": {**src.state_dict(), "decoder.extra": torch.zeros(1)}}, path)
    dst = LongNetViT(**TINY).eval()
    unexpected = load_slide_encoder_checkpoint(dst, path)
    assert unexpected == ["decoder.extra"]
    feats, coords = _inputs(40)
    with torch.no_grad():
        torch.testing.assert_close(dst(feats, coords), src(feats, coords), atol=0, rtol=0)
    bare = tmp_path / "bare.pth"
    sd = src.state_dict()
    del sd["encoder.layers.1.ffn.fc2.bias"]
    torch.save(sd, bare)
    with pytest.raises(InputError, match="encoder.layers.1.ffn.fc2.bias"):
        load_slide_encoder_checkpoint(LongNetViT(**TINY), bare)
    with pytest.raises(InputError, match="not found"):
        load_slide_encoder_checkpoint(dst, tmp_path / "missing.pth")


def test_subln_init_scale():
    model = LongNetViT(**{**TINY, "depth": 3})
    # torchscale sub-LN init multiplies fc1/fc2/out_proj/v_proj by sqrt(log(2*depth)) after xavier
    w = model.encoder.layers[0].self_attn.v_proj.weight
    bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1])) * math.sqrt(math.log(6))
    assert w.abs().max().item() <= bound + 1e-6
    assert w.abs().max().item() > math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
