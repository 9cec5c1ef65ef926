"""CONCH v1.5 vision tower, the patch encoder of TITAN (``titan.return_conch()``), built from timm.

Published facts (TITAN's ``conch_v1_5`` module, also vendored by TRIDENT): ``trunk`` is a timm-layout
ViT-L/16 (embed 1024, depth 24, 16 heads, mlp_ratio 4, qkv bias, layer scale init 1.0, class token,
LayerNorm eps 1e-6, final norm, no head); ``attn_pool_contrast`` is an attentional pooler with one
768-d query over the 1024-d tokens (8 heads, bias-free projections, LayerNorms on keys and query);
``ln_contrast`` is LayerNorm(768). Output 768-d. Checkpoint ``pytorch_model_vision.bin`` holds exactly
these keys. Input 448 px: resize 448 (bilinear) + centre crop 448, ImageNet mean/std. The published
trunk's positional table is for 224 px (14x14) and is interpolated DINO-style (bicubic, scale factor
(28 + 0.1) / 14) for 448 px inputs; we do that once at load time, which gives the same table.
"""

from __future__ import annotations

import math
import os

import timm
import torch
import torch.nn.functional as F
from torch import nn

from modaltune.encoders import register_encoder
from modaltune.encoders.base import PatchEncoder, build_module


class AttentionalPooler(nn.Module):
    """Learned queries attend over the token sequence (keys and values from the same tokens)."""

    def __init__(self, d_model: int = 768, context_dim: int = 1024, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.ln_k(x)
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(x).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[-1]))


class ConchV15Tower(nn.Module):
    def __init__(self, depth: int = 24, img_size: int = 448):
        super().__init__()
        self.trunk = timm.models.vision_transformer.VisionTransformer(
            img_size=img_size, patch_size=16, embed_dim=1024, depth=depth, num_heads=16, mlp_ratio=4.0,
            qkv_bias=True, init_values=1.0, num_classes=0, global_pool="token")
        self.attn_pool_contrast = AttentionalPooler(d_model=768, context_dim=1024, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def dino_interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D) the way DINO/iBOT interpolate at run time.

    Hand-written instead of timm's ``resample_abs_pos_embed`` because that resamples to an exact size,
    while the published model uses a scale factor with a +0.1 offset, which samples other points.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    n = patch_pos.shape[1]
    g = int(math.isqrt(n))
    if g * g != n:
        raise ValueError(f"positional table of {n} patch tokens is not a square grid")
    if g == grid:
        return pos_embed
    dim = patch_pos.shape[-1]
    scale = (grid + 0.1) / g
    patch_pos = F.interpolate(patch_pos.float().reshape(1, g, g, dim).permute(0, 3, 1, 2),
                              scale_factor=(scale, scale), mode="bicubic")
    if patch_pos.shape[-2:] != (grid, grid):
        raise ValueError(f"interpolated positional grid {tuple(patch_pos.shape[-2:])} != {grid}x{grid}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


@register_encoder("conch_v1_5")
class ConchV15Encoder(PatchEncoder):
    feature_dim_hint = 768

    def __init__(self, checkpoint: str | os.PathLike | None = None, *, depth: int = 24, img_size: int = 448,
                 seed: int = 0):
        model = build_module(lambda: ConchV15Tower(depth=depth, img_size=img_size), checkpoint, seed)
        super().__init__(model, checkpoint=checkpoint, feature_dim=768, input_size=img_size, resize=img_size,
                         interpolation="bilinear",
                         config=self.resolve_config(depth=depth, img_size=img_size, seed=seed))

    def adapt_state_dict(self, sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        key = "trunk.pos_embed"
        if key in sd:
            grid = model.trunk.patch_embed.grid_size[0]
            sd = dict(sd)
            sd[key] = dino_interpolate_pos_embed(sd[key], grid)
        return sd
