"""TransMIL (Shao et al., NeurIPS 2021): transformer MIL with a pyramid position encoding generator.

Choice: the paper's Nystrom attention (256 landmarks) approximates softmax attention to save memory on
long bags; we use exact softmax attention (``nn.MultiheadAttention``), which is what Nystrom approximates
and what runs everywhere without an extra package. Patients are grouped by patch count because the
square-grid padding (repeating the first tokens) depends on each patient's own bag.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from modaltune.models.baselines.common import (
    BaselineModel,
    MissingSlot,
    check_keys,
    no_score_on_padding,
    objective_of,
    patch_inputs,
)
from modaltune.models.configs import arch_config
from modaltune.models.registry import ModelDims, register_model

_KEYS = {"hidden", "num_heads", "dropout", "attn_dropout", "head_hidden"}


class TransLayer(nn.Module):
    """x + MultiheadAttention(LN(x)) (TransMIL's layer has no feed-forward block)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


class PPEG(nn.Module):
    """Pyramid position encoding generator: identity + depthwise convs 7, 5, 3 on the square token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, side: int) -> Tensor:
        cls_tok, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls_tok, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(BaselineModel):
    """fc(D->hidden)+ReLU -> square padding -> [CLS] -> TransLayer -> PPEG -> TransLayer -> LN -> CLS.

    ``dropout`` after the fc is optional (0 in the paper); ``attn_dropout`` 0.1 as in the paper.
    """

    def __init__(self, feature_dim: int, objective: str, dims: ModelDims, hidden: int = 512,
                 num_heads: int = 8, dropout: float = 0.0, attn_dropout: float = 0.1,
                 head_hidden: int | None = None):
        super().__init__(objective)
        self.embed_dim = hidden
        self.fc = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.layer1 = TransLayer(hidden, num_heads, attn_dropout)
        self.ppeg = PPEG(hidden)
        self.layer2 = TransLayer(hidden, num_heads, attn_dropout)
        self.norm = nn.LayerNorm(hidden)
        self.no_patches = MissingSlot(hidden)
        self.add_head(dims, head_hidden)

    def _encode_bags(self, h: Tensor) -> Tensor:
        """h (k, n, hidden): k bags of the same size n -> CLS embeddings (k, hidden)."""
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        # Fill the square grid by repeating the bag from its start (the paper repeats the first tokens).
        idx = torch.arange(side * side, device=h.device) % n
        x = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h[:, idx]], dim=1)
        x = self.layer2(self.ppeg(self.layer1(x), side))
        return self.norm(x)[:, 0]

    def embed(self, batch: dict) -> Tensor:
        feats, mask = patch_inputs(batch)
        h = self.fc(feats)
        counts = mask.sum(dim=1)
        out = h.new_zeros(h.shape[0], self.embed_dim)
        # Patients with equal patch counts share the square grid size, so they run as one batch.
        for n in counts.unique().tolist():
            if n == 0:
                continue
            rows = (counts == n).nonzero().flatten()
            bags = torch.stack([h[b][mask[b]] for b in rows.tolist()])
            out = out.index_put((rows,), self._encode_bags(bags))
        return self.no_patches(out, counts > 0)

    def _bag_cls_attention(self, h: Tensor) -> Tensor:
        """h (k, n, hidden) -> (k, n): the last layer's CLS-to-token attention (mean over heads), the
        weights of the square-grid copies of a patch summed back onto that patch."""
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        idx = torch.arange(side * side, device=h.device) % n
        x = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h[:, idx]], dim=1)
        x = self.ppeg(self.layer1(x), side)
        z = self.layer2.norm(x)
        w = self.layer2.attn(z, z, z, need_weights=True, average_attn_weights=True)[1]  # (k, L, L)
        return h.new_zeros(h.shape[0], n).index_add_(1, idx, w[:, 0, 1:])

    @torch.no_grad()
    def tile_scores(self, batch: dict) -> dict[str, Tensor]:
        """Contract C5: {"attention": (B, N)}, attention of the CLS token onto each patch in the last
        transformer layer (the CLS output is the embedding), mean over heads; NaN on padded slots.

        The CLS token also attends to itself, so a patient's scores sum to 1 minus that share.
        """
        feats, mask = patch_inputs(batch)
        h = self.fc(feats)
        out = h.new_zeros(h.shape[:2])
        for b in range(h.shape[0]):  # bags differ in size (their square grids too): one at a time
            if mask[b].any():
                out[b, mask[b]] = self._bag_cls_attention(h[b][mask[b]].unsqueeze(0))[0]
        return {"attention": no_score_on_padding(out, mask)}


def transmil_from_cfg(cfg: dict, dims: ModelDims, objective: str) -> TransMIL:
    check_keys(cfg, _KEYS)
    c = arch_config("transmil", cfg)
    return TransMIL(dims.feature_dim, objective, dims, hidden=int(c["hidden"]), num_heads=int(c["num_heads"]),
                    dropout=float(c["dropout"]), attn_dropout=float(c["attn_dropout"]), head_hidden=c["head_hidden"])


@register_model("transmil")
def build_transmil(cfg: dict, dims: ModelDims) -> TransMIL:
    return transmil_from_cfg(cfg, dims, objective_of(cfg))
