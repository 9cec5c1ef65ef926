"""Slide-encoder baselines: "Prov-GigaPath LP" (frozen, linear probes only) and "Prov-GigaPath (Tuned)".

The backbone is the ModalTune model's frozen encoder (``LongNetViT``, or TITAN), built from a ``backbone``
block with the same keys (``type``, ``embed_dim``, ``depth``, ``num_heads``, ``segment_lengths``,
``dilated_ratios``, ``checkpoint`` ...). Any module with ``forward(features, coords, patch_mask) -> (B, E)``
and ``embed_dim`` works. The slide vector is the backbone's own output: for LongNet the CLS token after
the final norms (as Prov-GigaPath's linear-probe recipe), for TITAN the attention-pooled vector.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modaltune.errors import InputError
from modaltune.models.backbones import build_backbone
from modaltune.models.baselines.common import (
    BaselineModel,
    MissingSlot,
    batch_tensor,
    check_keys,
    objective_of,
    patch_inputs,
)
from modaltune.models.configs import check_config_keys, modaltune_defaults
from modaltune.models.registry import ModelDims, register_model


def build_slide_backbone(bcfg: dict, dims: ModelDims) -> nn.Module:
    """The frozen-encoder module of the ModalTune model (``backbone.type`` longnet or titan), built from the
    same config keys, with the defaults of the encoder type for any key left out; weights from
    ``backbone.checkpoint``."""
    check_config_keys({"backbone": bcfg}, modaltune_defaults({"backbone": bcfg}))  # a typo must not run with a default
    return build_backbone(bcfg, dims.feature_dim)


# Where the known backbones keep their layer stacks (LongNet, TITAN); other modules: the longest stack.
_LAYER_PATHS = ("encoder.layers", "blocks.modules_list", "layers", "blocks")


def _layer_list(backbone: nn.Module) -> nn.ModuleList:
    for path in _LAYER_PATHS:
        mod: object = backbone
        for attr in path.split("."):
            mod = getattr(mod, attr, None)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return mod
    stacks = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not stacks:
        raise InputError("slide encoder baseline: activation_checkpointing needs a backbone with a layer stack")
    return max(stacks, key=len)


def _checkpointed_call(layer: nn.Module, *args, **kwargs):
    if layer._ckpt_enabled and layer.training and torch.is_grad_enabled():
        # Non-reentrant checkpointing restores the RNG state, so dropout / drop-path masks are replayed.
        return checkpoint(layer._plain_forward, *args, use_reentrant=False, **kwargs)
    return layer._plain_forward(*args, **kwargs)


def set_activation_checkpointing(backbone: nn.Module, enabled: bool) -> None:
    """Recompute each layer of the backbone's stack in the backward pass instead of storing activations.

    The layers' ``forward`` is redirected in place (no wrapper module), so state-dict keys stay those of
    the published checkpoint.
    """
    for layer in _layer_list(backbone):
        if "_plain_forward" not in layer.__dict__:
            layer._plain_forward = layer.forward
            layer.forward = functools.partial(_checkpointed_call, layer)
        layer._ckpt_enabled = enabled


def _real_patches_first(feats: Tensor, coords: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # LongNet reads a patient's tokens as a prefix of length mask.sum(); a stable sort keeps patch order.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    feats = torch.gather(feats, 1, order.unsqueeze(-1).expand_as(feats))
    coords = torch.gather(coords, 1, order.unsqueeze(-1).expand_as(coords))
    return feats, coords, torch.gather(mask, 1, order)


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
        self.add_head(dims)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        return self

    def encode(self, feats: Tensor, coords: Tensor, mask: Tensor) -> Tensor:
        """Slide vector (B, E) of the patients with at least one patch; zeros for the others."""
        present = mask.any(dim=1)
        out = feats.new_zeros(feats.shape[0], self.embed_dim)
        if not bool(present.any()):
            return out
        idx = present.nonzero().flatten()
        f, c, m = _real_patches_first(feats[idx], coords[idx].to(feats.dtype), mask[idx])
        n = int(m.sum(dim=1).max())  # drop columns that are padding for every patient
        emb = self.backbone(f[:, :n], c[:, :n], m[:, :n])
        return out.index_put((idx,), emb.to(out.dtype))

    def embed(self, batch: dict) -> Tensor:
        feats, mask = patch_inputs(batch)
        coords = batch_tensor(batch, "coords")
        if self.freeze:
            with torch.no_grad():
                emb = self.encode(feats, coords, mask)
        else:
            emb = self.encode(feats, coords, mask)
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
    model = SlideEncoderBranch(build_slide_backbone(dict(cfg.get("backbone") or {}), dims), objective, dims,
                               freeze=True)
    model.no_patches.requires_grad_(False)  # linear probes only: nothing in this model is trained
    return model


@register_model("slide_encoder_tuned")
def build_slide_encoder_tuned(cfg: dict, dims: ModelDims) -> SlideEncoderBranch:
    check_keys(cfg, {"backbone", "activation_checkpointing"})
    return SlideEncoderBranch(build_slide_backbone(dict(cfg.get("backbone") or {}), dims), objective_of(cfg),
                              dims, freeze=False,
                              activation_checkpointing=bool(cfg.get("activation_checkpointing", False)))
