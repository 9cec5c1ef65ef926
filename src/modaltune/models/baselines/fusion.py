"""Late fusion ("(cat)" rows): a slide-side and a gene-side embedding concatenated before one head.

The OOD rows "Prov-GigaPath Sup./Cls./Surv. (cat)" are configs of this model with
``slide_side: slide_encoder`` and objective classification or survival (see docs/BASELINES.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modaltune.errors import InputError
from modaltune.models.baselines.abmil import abmil_from_cfg
from modaltune.models.baselines.common import BaselineModel, check_keys, objective_of
from modaltune.models.baselines.genomic import GENE_SIDES
from modaltune.models.baselines.slide_encoder import slide_branch_from_cfg
from modaltune.models.baselines.transmil import transmil_from_cfg
from modaltune.models.configs import arch_config
from modaltune.models.registry import ModelDims, register_model

SLIDE_SIDES = {"abmil": abmil_from_cfg, "transmil": transmil_from_cfg, "slide_encoder": slide_branch_from_cfg}


class LateFusion(BaselineModel):
    """embedding = [slide_branch(batch); gene_branch(batch)] (optionally through Linear+ReLU) -> head.

    Each branch handles its own missing modality (learned missing embeddings), so a patient without RNA
    or without patches is kept.
    """

    def __init__(self, slide: BaselineModel, genes: BaselineModel, objective: str, dims: ModelDims,
                 fusion_hidden: int | None = None, dropout: float = 0.0):
        super().__init__(objective)
        self.slide_branch = slide
        self.gene_branch = genes
        cat_dim = slide.embed_dim + genes.embed_dim
        if fusion_hidden:
            self.fuse: nn.Module = nn.Sequential(nn.Linear(cat_dim, fusion_hidden), nn.ReLU(), nn.Dropout(dropout))
            self.embed_dim = fusion_hidden
        else:
            self.fuse = nn.Dropout(dropout)
            self.embed_dim = cat_dim
        self.add_head(dims)

    def embed(self, batch: dict) -> Tensor:
        return self.fuse(torch.cat([self.slide_branch.embed(batch), self.gene_branch.embed(batch)], dim=1))

    @torch.no_grad()
    def tile_scores(self, batch: dict) -> dict[str, Tensor]:
        """Contract C5: the slide branch's tile scores (ABMIL / TransMIL attention)."""
        if not hasattr(self.slide_branch, "tile_scores"):
            raise InputError(f"late_fusion with slide side {type(self.slide_branch).__name__} has no tile "
                             "scores; draw heatmaps for models with an attention slide side (abmil, transmil)")
        return self.slide_branch.tile_scores(batch)


@register_model("late_fusion")
def build_late_fusion(cfg: dict, dims: ModelDims) -> LateFusion:
    check_keys(cfg, {"slide_side", "gene_side", "slide", "genes", "fusion_hidden", "dropout"})
    objective = objective_of(cfg)
    c = arch_config("late_fusion", cfg)
    slide_side, gene_side = c["slide_side"], c["gene_side"]
    if slide_side not in SLIDE_SIDES:
        raise InputError(f"late_fusion: slide_side={slide_side!r}; choose one of {sorted(SLIDE_SIDES)}")
    if gene_side not in GENE_SIDES:
        raise InputError(f"late_fusion: gene_side={gene_side!r}; choose one of {sorted(GENE_SIDES)}")
    # Branches are built without heads (objective "none"): only the fused embedding gets one.
    slide = SLIDE_SIDES[slide_side](dict(c["slide"] or {}), dims, "none")
    genes = GENE_SIDES[gene_side](dict(c["genes"] or {}), dims, "none")
    return LateFusion(slide, genes, objective, dims, fusion_hidden=c["fusion_hidden"], dropout=float(c["dropout"]))
