"""ABMIL: gated attention-based multiple-instance learning (Ilse, Tomczak & Welling, ICML 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modaltune.models.baselines.common import (
    BaselineModel,
    GatedAttentionPool,
    MissingSlot,
    check_keys,
    no_score_on_padding,
    objective_of,
    patch_inputs,
)
from modaltune.models.configs import arch_config
from modaltune.models.registry import ModelDims, register_model

_KEYS = {"hidden", "attn_dim", "dropout", "head_hidden"}


class ABMIL(BaselineModel):
    """Linear(D->hidden)+ReLU+Dropout -> gated attention over the patient's real patches -> weighted sum.

    A patient without any real patch gets a learned missing embedding.
    """

    def __init__(self, feature_dim: int, objective: str, dims: ModelDims, hidden: int = 512,
                 attn_dim: int = 256, dropout: float = 0.25, head_hidden: int | None = None):
        super().__init__(objective)
        self.embed_dim = hidden
        self.fc = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.pool = GatedAttentionPool(hidden, attn_dim, dropout)
        self.no_patches = MissingSlot(hidden)
        self.add_head(dims, head_hidden)

    def embed(self, batch: dict) -> Tensor:
        feats, mask = patch_inputs(batch)
        pooled, _ = self.pool(self.fc(feats), mask)
        return self.no_patches(pooled, mask.any(dim=1))

    def attention(self, batch: dict) -> Tensor:
        """Attention weights (B, N) over patches (zeros on padding), e.g. for heatmaps."""
        feats, mask = patch_inputs(batch)
        return self.pool(self.fc(feats), mask)[1]

    @torch.no_grad()
    def tile_scores(self, batch: dict) -> dict[str, Tensor]:
        """Contract C5: {"attention": (B, N)}, the gated-attention weight of every patch (they sum to 1
        over the patient's real patches, all of its slides together); NaN on padded slots."""
        _, mask = patch_inputs(batch)
        return {"attention": no_score_on_padding(self.attention(batch), mask)}


def abmil_from_cfg(cfg: dict, dims: ModelDims, objective: str) -> ABMIL:
    check_keys(cfg, _KEYS)
    c = arch_config("abmil", cfg)
    return ABMIL(dims.feature_dim, objective, dims, hidden=int(c["hidden"]), attn_dim=int(c["attn_dim"]),
                 dropout=float(c["dropout"]), head_hidden=c["head_hidden"])


@register_model("abmil")
def build_abmil(cfg: dict, dims: ModelDims) -> ABMIL:
    return abmil_from_cfg(cfg, dims, objective_of(cfg))
