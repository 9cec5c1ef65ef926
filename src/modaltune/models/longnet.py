"""Prov-GigaPath slide encoder (``LongNetViT``) in plain PyTorch, key-compatible with ``slide_encoder.pth``.

Parameter names follow the published checkpoint (torchscale naming), e.g.
``encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``encoder.layers.{i}.self_attn.inner_attn_ln``,
``encoder.layers.{i}.self_attn_layer_norm``, ``encoder.layers.{i}.ffn.{fc1,fc2,ffn_layernorm}``,
``encoder.layers.{i}.final_layer_norm``, ``encoder.layer_norm``, ``patch_embed.proj``, ``cls_token``,
``norm``: 247 tensors, 86.3 M parameters for in 1536 / width 768 / depth 12. We write our own
(instead of importing torchscale) because the registry's torchscale has no LongNet and Prov-GigaPath's
vendored copy requires flash-attn and fairscale.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from modaltune.errors import InputError
from modaltune.models.dilated_attention import (
    GIGAPATH_DILATED_RATIOS,
    GIGAPATH_SEGMENT_LENGTHS,
    dilated_attention,
)

log = logging.getLogger(__name__)

ENCODER_LN_EPS = 1e-5  # torchscale EncoderConfig default
VIT_NORM_EPS = 1e-6  # LongNetViT's final norm (gigapath_slide_enc12l768d)


def sincos_pos_embed(pos_index: Tensor, embed_dim: int, ngrids: int) -> Tensor:
    """Rows ``pos_index`` of the published (1 + ngrids**2, D) 2-D sin-cos table, computed on the fly.

    Row 0 is the CLS slot (zeros); row ``1 + i*ngrids + j`` encodes ``j`` in the first half of the
    channels and ``i`` in the second (MAE's meshgrid order, where ``i = floor(x/tile)``).
    The full table for 1000x1000 grids would take ~3 GB in float32; only the tiles present are computed.
    """
    r = pos_index.long() - 1
    i = torch.div(r, ngrids, rounding_mode="floor").double()
    j = torch.remainder(r, ngrids).double()
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=pos_index.device) / quarter)

    def one_d(p: Tensor) -> Tensor:
        out = p.unsqueeze(-1) * omega
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)

    emb = torch.cat([one_d(j), one_d(i)], dim=-1)
    emb = torch.where((r < 0).unsqueeze(-1), torch.zeros_like(emb), emb)
    return emb.float()


class DilatedSelfAttention(nn.Module):
    """torchscale ``DilatedAttention`` with sub-LN (``inner_attn_ln``) before ``out_proj``."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilated_ratios: Sequence[int],
        backend: str = "auto",
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.segment_lengths = list(segment_lengths)
        self.dilated_ratios = list(dilated_ratios)
        self.backend = backend
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.inner_attn_ln = nn.LayerNorm(embed_dim, eps=ENCODER_LN_EPS)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """x (B, N, D); ``lengths`` (B,) true token counts when patients of unequal size share a batch.

        A patient's attention runs over its own ``lengths[b]`` tokens only, i.e. with the segment
        geometry and zero padding it would have alone (B=1), so batched == per-patient outputs.
        """
        bsz, n, dim = x.shape
        shape = (bsz, n, self.num_heads, self.head_dim)
        q, k, v = (p(x).view(shape) for p in (self.q_proj, self.k_proj, self.v_proj))
        if lengths is None or bool((lengths == n).all()):
            attn = dilated_attention(q, k, v, self.segment_lengths, self.dilated_ratios, self.backend)
        else:
            parts = []
            for b in range(bsz):
                m = int(lengths[b])
                a = dilated_attention(
                    q[b : b + 1, :m], k[b : b + 1, :m], v[b : b + 1, :m],
                    self.segment_lengths, self.dilated_ratios, self.backend,
                )
                parts.append(F.pad(a, (0, 0, 0, 0, 0, n - m)))
            attn = torch.cat(parts, dim=0)
        attn = self.inner_attn_ln(attn.reshape(bsz, n, dim))
        return self.out_proj(attn)


class FeedForward(nn.Module):
    """fc1 -> GELU -> sub-LN (``ffn_layernorm`` on the hidden width) -> fc2 -> dropout."""

    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=ENCODER_LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.fc1(x).float()).type_as(x)
        return self.dropout(self.fc2(self.ffn_layernorm(h)))


class LongNetLayer(nn.Module):
    """Pre-LN encoder layer: x + DropPath(Dropout(Attn(LN(x)))), then x + DropPath(FFN(LN(x)))."""

    def __init__(self, embed_dim, num_heads, ffn_dim, segment_lengths, dilated_ratios, dropout, drop_path,
                 backend="auto"):
        super().__init__()
        self.self_attn = DilatedSelfAttention(embed_dim, num_heads, segment_lengths, dilated_ratios, backend)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim, eps=ENCODER_LN_EPS)
        self.dropout_module = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout)
        self.final_layer_norm = nn.LayerNorm(embed_dim, eps=ENCODER_LN_EPS)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        h = self.self_attn(self.self_attn_layer_norm(x), lengths)
        x = x + self.drop_path(self.dropout_module(h))
        return x + self.drop_path(self.ffn(self.final_layer_norm(x)))


class LongNetEncoder(nn.Module):
    """Stack of ``LongNetLayer`` + output LayerNorm (torchscale ``normalize_output``)."""

    def __init__(self, embed_dim, depth, num_heads, ffn_dim, segment_lengths, dilated_ratios, dropout,
                 drop_path_rate, backend="auto"):
        super().__init__()
        rates = np.linspace(0, drop_path_rate, depth) if depth > 1 else [0.0]
        self.dropout_module = nn.Dropout(dropout)  # embedding dropout
        self.layers = nn.ModuleList(
            LongNetLayer(embed_dim, num_heads, ffn_dim, segment_lengths, dilated_ratios, dropout,
                         float(rates[i]), backend)
            for i in range(depth)
        )
        self.layer_norm = nn.LayerNorm(embed_dim, eps=ENCODER_LN_EPS)


class LongNetViT(nn.Module):
    """Prov-GigaPath slide encoder. forward(features (B,N,C), coords (B,N,2)) -> CLS after final norms (B,D).

    ``tile_size``/``slide_ngrids`` define the positional grid: patch at pixel (x, y) takes table row
    ``1 + floor(x/tile)*ngrids + floor(y/tile)``; the CLS token takes row 0.
    """

    def __init__(
        self,
        in_chans: int = 1536,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        slide_ngrids: int = 1000,
        tile_size: int = 256,
        segment_lengths: Sequence[int] = GIGAPATH_SEGMENT_LENGTHS,
        dilated_ratios: Sequence[int] = GIGAPATH_DILATED_RATIOS,
        dropout: float = 0.25,
        drop_path_rate: float = 0.1,
        attention_backend: str = "auto",
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.slide_ngrids = slide_ngrids
        self.tile_size = tile_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.encoder = LongNetEncoder(
            embed_dim, depth, num_heads, int(embed_dim * mlp_ratio), segment_lengths, dilated_ratios,
            dropout, drop_path_rate, attention_backend,
        )
        self.norm = nn.LayerNorm(embed_dim, eps=VIT_NORM_EPS)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # As published: xavier Linear / zero bias, LN (1, 0), cls normal(0.02); then sub-LN scaling
        # of fc1/fc2/out_proj/v_proj by sqrt(log(2*depth)) (torchscale ``subln`` init).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        scale = math.sqrt(math.log(self.depth * 2))
        for name, p in self.encoder.named_parameters():
            if any(t in name for t in ("fc1", "fc2", "out_proj", "v_proj")):
                p.mul_(scale)

    def coords_to_pos(self, coords: Tensor) -> Tensor:
        cells = torch.floor(coords / float(self.tile_size)).long()
        pos = cells[..., 0] * self.slide_ngrids + cells[..., 1] + 1
        if bool((cells < 0).any()) or bool((pos > self.slide_ngrids**2).any()):
            raise InputError(
                f"batch['coords']: a patch lies outside the slide encoder's {self.slide_ngrids}x"
                f"{self.slide_ngrids} grid of {self.tile_size}-px cells (max cell {tuple(cells.amax((0, 1)).tolist())});"
                " use coordinates in 0.5-mpp pixels (config coords space) or a larger slide_ngrids"
            )
        return pos

    def embed(self, features: Tensor, coords: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """Patch embedding + positions, CLS prepended, embedding dropout, padded rows zeroed -> (B, 1+N, D)."""
        x = self.patch_embed.proj(features)
        x = x + sincos_pos_embed(self.coords_to_pos(coords), self.embed_dim, self.slide_ngrids).to(x.dtype)
        cls = (self.cls_token + 0.0).expand(x.shape[0], -1, -1)  # table row 0 is zeros
        x = self.encoder.dropout_module(torch.cat([cls, x], dim=1))
        if patch_mask is not None:
            x = x * F.pad(patch_mask, (1, 0), value=True).unsqueeze(-1).to(x.dtype)
        return x

    @staticmethod
    def lengths_from_mask(patch_mask: Tensor | None) -> Tensor | None:
        """(B, N) bool mask with real patches first -> (B,) token counts including CLS."""
        if patch_mask is None:
            return None
        return patch_mask.sum(1) + 1

    def forward_features(self, features: Tensor, coords: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """Residual stream after the last layer, before any norm: (B, 1+N, D)."""
        x = self.embed(features, coords, patch_mask)
        lengths = self.lengths_from_mask(patch_mask)
        for layer in self.encoder.layers:
            x = layer(x, lengths)
        return x

    # Backbone protocol used by the Modal Adapter (same methods on the TITAN encoder).
    @property
    def n_layers(self) -> int:
        return len(self.encoder.layers)

    def prepare(self, features: Tensor, coords: Tensor, patch_mask: Tensor | None = None) -> tuple[Tensor, dict]:
        """-> tokens (B, 1+N, D) with CLS first, and a context for ``run_layer`` / ``image_vector``.

        ``patch_mask`` must hold the real patches first (``ModalTune`` compacts it)."""
        ctx = {"lengths": self.lengths_from_mask(patch_mask), "token_mask": patch_mask}
        return self.embed(features, coords, patch_mask), ctx

    def run_layer(self, i: int, h: Tensor, ctx: dict) -> Tensor:
        return self.encoder.layers[i](h, ctx["lengths"])

    def image_vector(self, h: Tensor, ctx: dict) -> Tensor:
        # ModalTune reads the raw CLS residual stream: neither encoder.layer_norm nor norm is applied.
        return h[:, 0]

    def forward(self, features: Tensor, coords: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        x = self.forward_features(features, coords, patch_mask)
        return self.norm(self.encoder.layer_norm(x))[:, 0]


def load_slide_encoder_checkpoint(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a Prov-GigaPath ``slide_encoder.pth`` ({"model": state_dict} or a bare state dict).

    Raises InputError naming every missing key; returns (and logs) the unexpected keys.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(
            f"slide encoder checkpoint {path} not found: download slide_encoder.pth from the "
            "prov-gigapath/prov-gigapath Hugging Face repo and set backbone.checkpoint to its local path"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code objects, ...
        raise InputError(f"slide encoder checkpoint {path} cannot be read with torch.load: {exc}") from exc
    state = obj["model"] if isinstance(obj, dict) and "model" in obj else obj
    if not isinstance(state, dict):
        raise InputError(f"slide encoder checkpoint {path}: expected a state dict or {{'model': state_dict}}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(
            f"slide encoder checkpoint {path} lacks {len(missing)} keys the model needs, e.g. "
            f"{missing[:10]}; is it a Prov-GigaPath slide encoder with the configured width/depth?"
        )
    bad_shape = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad_shape:
        k = bad_shape[0]
        raise InputError(
            f"slide encoder checkpoint {path}: {len(bad_shape)} tensors have the wrong shape, e.g. {k} "
            f"{tuple(state[k].shape)} vs model {tuple(expected[k].shape)}; check backbone embed_dim/depth/in_chans"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        log.warning("slide encoder checkpoint %s: %d unexpected keys ignored: %s", path, len(unexpected),
                    unexpected[:10])
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    return unexpected
