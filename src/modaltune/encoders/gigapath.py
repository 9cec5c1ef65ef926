"""Prov-GigaPath tile encoder: a DINOv2 ViT-g built by timm with the published hub config.

Published facts (hub ``prov-gigapath/prov-gigapath`` config.json, timm >= 1.0): architecture
``vit_giant_patch14_dinov2`` with patch_size=16, embed_dim=1536, depth=40, num_heads=24,
init_values=1e-5, mlp_ratio=5.33334 (timm's SwiGLUPacked + SiLU for this architecture), img_size=224,
num_classes=0; output = class token after the final norm, 1536-d, ~1.13B parameters. The weights file
``pytorch_model.bin`` uses timm key names, so it loads strictly into this model.
Preprocessing: resize 256 (bicubic) + centre crop 224, ImageNet mean/std (hub README). ModalTune's own
extraction script centre-crops 224 without resizing: pass ``resize=None`` to reproduce that.
"""

from __future__ import annotations

import os

import timm
from torch import nn

from modaltune.encoders import register_encoder
from modaltune.encoders.base import PatchEncoder, build_module

GIGAPATH_ARGS = dict(patch_size=16, embed_dim=1536, num_heads=24, init_values=1e-5, mlp_ratio=5.33334)


def build_gigapath_vit(depth: int = 40, img_size: int = 224) -> nn.Module:
    """The tile encoder architecture; ``depth`` < 40 gives a small variant with the same key layout."""
    # timm's registered vit_giant_patch14_dinov2 adds mlp_layer=SwiGLUPacked and act_layer=SiLU.
    return timm.create_model("vit_giant_patch14_dinov2", pretrained=False, num_classes=0,
                             img_size=img_size, depth=depth, **GIGAPATH_ARGS)


@register_encoder("prov-gigapath")
class ProvGigaPathEncoder(PatchEncoder):
    feature_dim_hint = 1536

    def __init__(self, checkpoint: str | os.PathLike | None = None, *, depth: int = 40, img_size: int = 224,
                 resize: int | None = 256, seed: int = 0):
        model = build_module(lambda: build_gigapath_vit(depth=depth, img_size=img_size), checkpoint, seed)
        super().__init__(model, checkpoint=checkpoint, feature_dim=model.num_features, input_size=img_size,
                         resize=resize, interpolation="bicubic",
                         config=self.resolve_config(depth=depth, img_size=img_size, resize=resize, seed=seed))
