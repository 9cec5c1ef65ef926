"""Pathway x patch co-attention baselines: MCAT (Chen et al., ICCV 2021) and SurvPath (Jaume et al., CVPR 2024).

Both build one token per pathway with the per-pathway S-MLP towers (``PathwayTowers``) and one token per
patch with a linear projection of the patch features. A patient without RNA gets a learned set of
pathway tokens; a patient without patches gets a learned slide-side embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modaltune.errors import InputError
from modaltune.models.baselines.common import (
    BaselineModel,
    GatedAttentionPool,
    MissingSlot,
    check_keys,
    gene_inputs,
    masked_mean,
    no_score_on_padding,
    objective_of,
    patch_inputs,
    safe_key_padding,
)
from modaltune.models.configs import ARCH_DEFAULTS, SURVPATH_VARIANTS, arch_config
from modaltune.models.gene_encoder import PathwayTowers
from modaltune.models.registry import ModelDims, register_model


def _encoder(dim: int, heads: int, dropout: float, n_layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout,
                                       activation="relu", batch_first=True)
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


class MCAT(BaselineModel):
    """Genomic-guided co-attention: pathway tokens query the patch tokens (1 head), then a transformer and
    gated attention pooling on each side, concatenation and a two-layer fusion MLP. ``attn_dropout`` drops
    co-attention weights (0 as in MCATPathways)."""

    def __init__(self, dims: ModelDims, objective: str, dim: int = 256, num_heads: int = 8,
                 dropout: float = 0.25, n_layers: int = 2, head_hidden: int | None = None,
                 attn_dropout: float = 0.0):
        super().__init__(objective)
        self.embed_dim = dim
        self.wsi_net = nn.Sequential(nn.Linear(dims.feature_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.towers = PathwayTowers(dims.pathway_groups, latent_dim=dim, dropout=dropout)
        self.no_genes = MissingSlot(self.towers.n_pathways, dim)
        self.coattn = nn.MultiheadAttention(dim, 1, dropout=attn_dropout, batch_first=True)
        self.path_transformer = _encoder(dim, num_heads, dropout, n_layers)
        self.path_pool = GatedAttentionPool(dim, dim, dropout)
        self.path_rho = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.omic_transformer = _encoder(dim, num_heads, dropout, n_layers)
        self.omic_pool = GatedAttentionPool(dim, dim, dropout)
        self.omic_rho = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.no_patches = MissingSlot(dim)
        self.fusion = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.add_head(dims, head_hidden)

    def embed(self, batch: dict) -> Tensor:
        feats, mask = patch_inputs(batch)
        genes, has_genes = gene_inputs(batch)
        patches = self.wsi_net(feats)
        omic = self.no_genes(self.towers(genes), has_genes)  # (B, P, dim)
        coattn = self.coattn(omic, patches, patches, key_padding_mask=safe_key_padding(mask),
                             need_weights=False)[0]
        h_path = self.path_rho(self.path_pool(self.path_transformer(coattn))[0])
        h_path = self.no_patches(h_path, mask.any(dim=1))
        h_omic = self.omic_rho(self.omic_pool(self.omic_transformer(omic))[0])
        return self.fusion(torch.cat([h_path, h_omic], dim=1))

    @torch.no_grad()
    def tile_scores(self, batch: dict) -> dict[str, Tensor]:
        """Contract C5: {"coattention": (B, N)}, the genomic-guided co-attention weight of each patch
        (pathway tokens query the patches), mean over the pathway tokens; NaN on padded slots."""
        feats, mask = patch_inputs(batch)
        genes, has_genes = gene_inputs(batch)
        patches = self.wsi_net(feats)
        omic = self.no_genes(self.towers(genes), has_genes)
        w = self.coattn(omic, patches, patches, key_padding_mask=safe_key_padding(mask), need_weights=True,
                        average_attn_weights=True)[1]  # (B, P, N)
        return {"coattention": no_score_on_padding(w.mean(dim=1), mask)}


def _merge_heads(t: Tensor) -> Tensor:
    return t.transpose(1, 2).flatten(2)  # (B, heads, n, dh) -> (B, n, heads * dh)


class InteractionAttention(nn.Module):
    """SurvPath's masked attention over [pathway tokens; patch tokens].

    Pathway queries see all pathway and real patch keys; patch queries see only pathway keys (no
    patch<->patch attention). Computed as two attention calls, which equals the full masked attention
    while keeping memory linear in the number of patches.

    ``attn_dropout`` drops attention weights (0 = SurvPath's ``MMAttention``, which has none);
    ``out_proj`` False returns the attended values (width ``heads * dim_head``) without the output
    projection and its dropout, as published.
    """

    def __init__(self, dim: int, heads: int = 1, dim_head: int | None = None, dropout: float = 0.1,
                 attn_dropout: float = 0.0, out_proj: bool = True):
        super().__init__()
        dim_head = dim_head or dim // heads
        self.heads, self.dim_head, self.attn_dropout = heads, dim_head, attn_dropout
        self.out_dim = dim if out_proj else heads * dim_head
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout)) if out_proj else nn.Identity()

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (B, heads, n, dim_head)

    def forward(self, path: Tensor, patches: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        qp, kp, vp = self._split(path)
        qx, kx, vx = self._split(patches)
        p = self.attn_dropout if self.training else 0.0
        path_keys = torch.ones(mask.shape[0], path.shape[1], dtype=torch.bool, device=mask.device)
        allowed = torch.cat([path_keys, mask], dim=1)[:, None, None, :]
        path_out = F.scaled_dot_product_attention(
            qp, torch.cat([kp, kx], dim=2), torch.cat([vp, vx], dim=2), attn_mask=allowed, dropout_p=p
        )
        patch_out = F.scaled_dot_product_attention(qx, kp, vp, dropout_p=p)
        return self.out(_merge_heads(path_out)), self.out(_merge_heads(patch_out))

    def pathway_to_patch_weights(self, path: Tensor, patches: Tensor, mask: Tensor) -> Tensor:
        """(B, P, N): softmax weights of the pathway queries on the patch keys (the share of the
        masked attention over [pathways; patches] that lands on each patch), mean over heads."""
        qp, kp, _ = self._split(path)
        _, kx, _ = self._split(patches)
        logits = torch.einsum("bhpd,bhkd->bhpk", qp, torch.cat([kp, kx], dim=2)) / self.dim_head**0.5
        allowed = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, path.shape[1]), mask], dim=1)
        logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1)[..., path.shape[1]:].mean(dim=1)


class SurvPath(BaselineModel):
    """Pathway and patch tokens -> one transformer layer with the interaction mask -> mean pooling of each
    side -> concatenation (the embedding) -> MLP head (embedding -> dim/4 -> out).

    ``variant="published"`` (SurvPath repository): LN -> masked attention without output projection
    (width dim/2 with 1 head of dim/2) -> feed-forward (LN, Linear dim/2 -> dim/2, GELU, Dropout, Linear),
    no residual connections -> LayerNorm; embedding 2 x dim/2 = dim; head dim -> dim/4 (256 -> 64).
    ``variant="ours"``: a pre-LN layer with residuals (attention with output projection, then FF x4 with
    GELU, then LayerNorm); embedding 2 x dim; head 2*dim -> dim/4.
    """

    def __init__(self, dims: ModelDims, objective: str, dim: int = 256, attn_heads: int = 1,
                 dim_head: int | None = None, dropout: float = 0.1, ff_mult: int | None = None,
                 head_hidden: int | None = None, variant: str = "published", attn_dropout: float = 0.0):
        super().__init__(objective)
        if variant not in SURVPATH_VARIANTS:
            raise InputError(f"survpath: variant={variant!r}; set models.<name>.variant to one of "
                             f"{list(SURVPATH_VARIANTS)}")
        self.variant = variant
        published = variant == "published"
        if published and dim % 2:
            raise InputError(f"survpath: dim={dim} must be even for variant 'published' (attention width dim/2)")
        self.wsi_projection = nn.Linear(dims.feature_dim, dim)
        self.towers = PathwayTowers(dims.pathway_groups, latent_dim=dim, dropout=0.25)
        self.no_genes = MissingSlot(self.towers.n_pathways, dim)
        self.norm_attn = nn.LayerNorm(dim)
        if published:
            self.attn = InteractionAttention(dim, attn_heads, dim_head or dim // (2 * attn_heads), dropout,
                                             attn_dropout, out_proj=False)
            width, mult = self.attn.out_dim, ff_mult or 1
            self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, mult * width), nn.GELU(),
                                    nn.Dropout(dropout), nn.Linear(mult * width, width))
        else:
            self.attn = InteractionAttention(dim, attn_heads, dim_head, dropout, attn_dropout)
            width, mult = dim, ff_mult or 4
            self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(mult * dim, dim), nn.Dropout(dropout))
        self.norm_out = nn.LayerNorm(width)
        self.embed_dim = 2 * width
        self.no_patches = MissingSlot(width)
        self.add_head(dims, head_hidden if head_hidden is not None else max(1, dim // 4))

    def embed(self, batch: dict) -> Tensor:
        feats, mask = patch_inputs(batch)
        genes, has_genes = gene_inputs(batch)
        path = self.no_genes(self.towers(genes), has_genes)
        patches = self.wsi_projection(feats)
        n_path = path.shape[1]
        x = torch.cat([path, patches], dim=1)
        h = self.norm_attn(x)
        path_upd, patch_upd = self.attn(h[:, :n_path], h[:, n_path:], mask)
        if self.variant == "published":
            x = self.norm_out(self.ff(torch.cat([path_upd, patch_upd], dim=1)))
        else:
            x = x + torch.cat([path_upd, patch_upd], dim=1)
            x = self.norm_out(x + self.ff(x))
        h_path = x[:, :n_path].mean(dim=1)
        h_wsi = self.no_patches(masked_mean(x[:, n_path:], mask), mask.any(dim=1))
        return torch.cat([h_path, h_wsi], dim=1)

    @torch.no_grad()
    def tile_scores(self, batch: dict) -> dict[str, Tensor]:
        """Contract C5: {"attention": (B, N)}, attention of the pathway tokens onto each patch in the
        interaction layer, mean over pathway tokens and heads; NaN on padded slots."""
        feats, mask = patch_inputs(batch)
        genes, has_genes = gene_inputs(batch)
        path = self.no_genes(self.towers(genes), has_genes)
        n_path = path.shape[1]
        h = self.norm_attn(torch.cat([path, self.wsi_projection(feats)], dim=1))
        w = self.attn.pathway_to_patch_weights(h[:, :n_path], h[:, n_path:], mask)
        return {"attention": no_score_on_padding(w.mean(dim=1), mask)}


def mcat_from_cfg(cfg: dict, dims: ModelDims, objective: str) -> MCAT:
    check_keys(cfg, set(ARCH_DEFAULTS["mcat"]))
    c = arch_config("mcat", cfg)
    return MCAT(dims, objective, dim=int(c["dim"]), num_heads=int(c["num_heads"]), dropout=float(c["dropout"]),
                n_layers=int(c["n_layers"]), head_hidden=c["head_hidden"], attn_dropout=float(c["attn_dropout"]))


def survpath_from_cfg(cfg: dict, dims: ModelDims, objective: str) -> SurvPath:
    check_keys(cfg, set(ARCH_DEFAULTS["survpath"]))
    c = arch_config("survpath", cfg)
    return SurvPath(dims, objective, dim=int(c["dim"]), attn_heads=int(c["attn_heads"]), dim_head=c["dim_head"],
                    dropout=float(c["dropout"]), ff_mult=None if c["ff_mult"] is None else int(c["ff_mult"]),
                    head_hidden=c["head_hidden"], variant=str(c["variant"]), attn_dropout=float(c["attn_dropout"]))


@register_model("mcat")
def build_mcat(cfg: dict, dims: ModelDims) -> MCAT:
    return mcat_from_cfg(cfg, dims, objective_of(cfg))


@register_model("survpath")
def build_survpath(cfg: dict, dims: ModelDims) -> SurvPath:
    return survpath_from_cfg(cfg, dims, objective_of(cfg))
