"""RNA-only baselines: MLP and S-MLP (SurvPath's MLPOmics / SNNOmics) and the Gene Mixer.

All three see only ``batch["genes"]``; a patient without RNA (``has_genes`` False) gets a learned
missing embedding instead of the encoder output, so it is kept rather than dropped.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from modaltune.errors import InputError
from modaltune.models.baselines.common import (
    BaselineModel,
    MissingSlot,
    check_keys,
    gene_inputs,
    objective_of,
)
from modaltune.models.configs import arch_config
from modaltune.models.gene_encoder import GeneMixerEncoder, SNNBlock
from modaltune.models.registry import ModelDims, register_model


def _hidden(cfg: dict) -> list[int]:
    hidden = cfg["hidden"]
    if isinstance(hidden, int):
        hidden = [hidden, hidden]
    if not hidden or any(int(h) < 1 for h in hidden):
        raise InputError(f"model config: hidden={hidden!r} must be a non-empty list of positive sizes")
    return [int(h) for h in hidden]


def _need_genes(dims: ModelDims, arch: str) -> None:
    if dims.n_genes < 1:
        raise InputError(
            f"{arch}: ModelDims.n_genes is 0; this baseline needs RNA (genomics/pathways.parquet)"
        )


class GeneBaseline(BaselineModel):
    """``encoder(genes) -> (B, E)``, with a learned embedding for patients without RNA."""

    def __init__(self, encoder: nn.Module, embed_dim: int, objective: str, dims: ModelDims,
                 head_hidden: int | None = None):
        super().__init__(objective)
        self.embed_dim = embed_dim
        self.n_genes = dims.n_genes
        self.encoder = encoder
        self.no_genes = MissingSlot(embed_dim)
        self.add_head(dims, head_hidden)

    def embed(self, batch: dict) -> Tensor:
        genes, has = gene_inputs(batch)
        if genes.dim() != 2 or genes.shape[1] != self.n_genes:
            raise InputError(
                f"batch['genes'] has shape {tuple(genes.shape)}; this model was built for {self.n_genes} genes "
                "(use the same genomics/pathways.parquet for training and evaluation)"
            )
        return self.no_genes(self.encoder(genes), has)


def mlp_encoder(n_genes: int, hidden: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, h in enumerate(hidden):
        layers += [nn.Linear(n_genes if i == 0 else hidden[i - 1], h), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def snn_encoder(n_genes: int, hidden: list[int], dropout: float) -> nn.Sequential:
    blocks = nn.Sequential(*[SNNBlock(n_genes if i == 0 else hidden[i - 1], h, dropout)
                             for i, h in enumerate(hidden)])
    # Self-normalising nets want N(0, 1/fan_in) weights and zero bias (Klambauer et al.; SurvPath does this).
    for m in blocks.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)
    return blocks


class MixerPool(nn.Module):
    """Gene Mixer tokens (B, P, E) -> mean over tokens -> LayerNorm (the reference classifier mode)."""

    def __init__(self, mixer: GeneMixerEncoder):
        super().__init__()
        self.mixer = mixer
        self.norm = nn.LayerNorm(mixer.out_dim)

    def forward(self, genes: Tensor) -> Tensor:
        return self.norm(self.mixer(genes).mean(dim=1))


def _vector_model(name: str, make_encoder, cfg: dict, dims: ModelDims, objective: str) -> GeneBaseline:
    """MLP / S-MLP: one encoder over the whole gene vector (``make_encoder(n_genes, hidden, dropout)``)."""
    check_keys(cfg, {"hidden", "dropout", "head_hidden"})
    _need_genes(dims, name)
    c = arch_config(name, cfg)
    hidden = _hidden(c)
    enc = make_encoder(dims.n_genes, hidden, float(c["dropout"]))
    return GeneBaseline(enc, hidden[-1], objective, dims, c["head_hidden"])


def mlp_from_cfg(cfg: dict, dims: ModelDims, objective: str) -> GeneBaseline:
    return _vector_model("mlp", mlp_encoder, cfg, dims, objective)


def snn_from_cfg(cfg: dict, dims: ModelDims, objective: str) -> GeneBaseline:
    return _vector_model("snn", snn_encoder, cfg, dims, objective)


_MIXER_KEYS = {"latent_dim", "depth", "token_expansion", "channel_expansion", "dropout", "out_dim"}


def gene_mixer_from_cfg(cfg: dict, dims: ModelDims, objective: str) -> GeneBaseline:
    check_keys(cfg, _MIXER_KEYS | {"head_hidden"})
    _need_genes(dims, "gene_mixer")
    c = arch_config("gene_mixer", cfg)
    mixer = GeneMixerEncoder(
        dims.pathway_groups, latent_dim=int(c["latent_dim"]), depth=int(c["depth"]),
        token_expansion=float(c["token_expansion"]), channel_expansion=float(c["channel_expansion"]),
        dropout=float(c["dropout"]), out_dim=int(c["out_dim"]), final_groups=None,
    )
    return GeneBaseline(MixerPool(mixer), mixer.out_dim, objective, dims, c["head_hidden"])


GENE_SIDES = {"mlp": mlp_from_cfg, "snn": snn_from_cfg, "gene_mixer": gene_mixer_from_cfg}


@register_model("mlp")
def build_mlp(cfg: dict, dims: ModelDims) -> GeneBaseline:
    return mlp_from_cfg(cfg, dims, objective_of(cfg))


@register_model("snn")
def build_snn(cfg: dict, dims: ModelDims) -> GeneBaseline:
    return snn_from_cfg(cfg, dims, objective_of(cfg))


@register_model("gene_mixer")
def build_gene_mixer(cfg: dict, dims: ModelDims) -> GeneBaseline:
    return gene_mixer_from_cfg(cfg, dims, objective_of(cfg))


__all__ = ["GeneBaseline", "MixerPool", "build_gene_mixer", "build_mlp", "build_snn"]
