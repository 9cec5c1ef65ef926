"""Slide-encoder baselines: "Prov-GigaPath LP" (frozen, linear probes only) and "Prov-GigaPath (Tuned)".

The backbone is any module exposing ``encode(features, coords, patch_mask) -> (B, E)`` and ``embed_dim``;
the config block ``backbone`` uses the same keys as the ModalTune model's backbone (``type: longnet``,
``embed_dim``, ``depth``, ``num_heads``, ``segment_lengths``, ``dilated_ratios``, ``checkpoint`` ...).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modaltune.errors import InputError
from modaltune.models.baselines.common import (
    BaselineModel,
    MissingSlot,
    batch_tensor,
    check_keys,
    objective_of,
    patch_inputs,
)
from modaltune.models.registry import ModelDims, register_model


def build_slide_backbone(bcfg: dict, dims: ModelDims) -> nn.Module:
    """Build the slide encoder named by ``bcfg["type"]`` (weights from ``bcfg["checkpoint"]`` if set)."""
    kind = bcfg.get("type", "longnet")
    if kind != "longnet":
        raise InputError(f"slide encoder baseline: backbone.type={kind!r} is not supported; use 'longnet'")
    try:
        from modaltune.models import longnet
    except ImportError as err:  # the LongNet module is written separately; say so instead of a traceback
        raise InputError(f"slide encoder baseline: modaltune.models.longnet cannot be imported ({err})") from err
    return longnet.build_slide_encoder(bcfg, dims)


class _Checkpointed(nn.Module):
    """Runs the wrapped layer under activation checkpointing while gradients are needed."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.enabled = True

    def forward(self, *args, **kwargs):
        if self.enabled and torch.is_grad_enabled() and self.training:
            return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)
        return self.layer(*args, **kwargs)


def _layer_list(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of repeated layers: its longest ModuleList of same-type modules."""
    best: nn.ModuleList | None = None
    for mod in backbone.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise InputError("slide encoder baseline: activation_checkpointing needs a backbone with a layer stack")
    return best


def set_activation_checkpointing(backbone: nn.Module, enabled: bool) -> None:
    """Wrap (once) each layer of the backbone's main stack in checkpointing and switch it on or off."""
    layers = _layer_list(backbone)
    for i, layer in enumerate(layers):
        if not isinstance(layer, _Checkpointed):
            layers[i] = layer = _Checkpointed(layer)
        layer.enabled = enabled


class SlideEncoderBranch(BaselineModel):
    """Slide encoder -> one embedding per patient (CLS), frozen or trainable.

    Frozen: parameters need no gradient and the backbone stays in eval mode (deterministic embeddings,
    as the LP row has no +-). Tuned: everything trains; ``activation_checkpointing`` trades compute for
    memory on long bags. A patient without patches gets a learned missing embedding.
    """

    def __init__(self, backbone: nn.Module, objective: str, dims: ModelDims, freeze: bool,
                 activation_checkpointing: bool = False):
        super().__init__(objective)
        self.backbone = backbone
        self.embed_dim = int(backbone.embed_dim)
        self.freeze = freeze
        if freeze:
            backbone.requires_grad_(False)
            backbone.eval()
        elif activation_checkpointing:
            set_activation_checkpointing(backbone, True)
        self.no_patches = MissingSlot(self.embed_dim)
        if freeze:
            self.no_patches.requires_grad_(False)  # a frozen encoder trains nothing, not even this slot
        self.add_head(dims)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        return self

    def embed(self, batch: dict) -> Tensor:
        feats, mask = patch_inputs(batch)
        coords = batch_tensor(batch, "coords")
        if self.freeze:
            with torch.no_grad():
                emb = self.backbone.encode(feats, coords, mask)
        else:
            emb = self.backbone.encode(feats, coords, mask)
        return self.no_patches(emb, mask.any(dim=1))


_KEYS = {"backbone", "freeze", "activation_checkpointing"}


def slide_branch_from_cfg(cfg: dict, dims: ModelDims, objective: str) -> SlideEncoderBranch:
    """Fusion branch: frozen by default (``freeze: false`` fine-tunes it with the fused head)."""
    check_keys(cfg, _KEYS)
    backbone = build_slide_backbone(dict(cfg.get("backbone") or {}), dims)
    return SlideEncoderBranch(backbone, objective, dims, freeze=bool(cfg.get("freeze", True)),
                              activation_checkpointing=bool(cfg.get("activation_checkpointing", False)))


@register_model("slide_encoder_lp")
def build_slide_encoder_lp(cfg: dict, dims: ModelDims) -> SlideEncoderBranch:
    check_keys(cfg, {"backbone"})
    objective = objective_of(cfg, allowed=("none",), default="none")
    return SlideEncoderBranch(build_slide_backbone(dict(cfg.get("backbone") or {}), dims), objective, dims,
                              freeze=True)


@register_model("slide_encoder_tuned")
def build_slide_encoder_tuned(cfg: dict, dims: ModelDims) -> SlideEncoderBranch:
    check_keys(cfg, {"backbone", "activation_checkpointing"})
    return SlideEncoderBranch(build_slide_backbone(dict(cfg.get("backbone") or {}), dims), objective_of(cfg),
                              dims, freeze=False,
                              activation_checkpointing=bool(cfg.get("activation_checkpointing", False)))
