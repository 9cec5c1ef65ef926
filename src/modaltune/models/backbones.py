"""Frozen slide encoders behind one builder: ``build_backbone(bcfg, in_chans)`` for ``backbone.type``
longnet (Prov-GigaPath ``LongNetViT``) or titan (TITAN's vision encoder).

Both implement the backbone protocol the Modal Adapter drives (``n_layers``, ``prepare``, ``run_layer``,
``image_vector``) and ``forward(features, coords, patch_mask) -> (B, embed_dim)`` for the slide-encoder
baselines. Unset keys take the defaults of the encoder type (``modaltune.models.configs``).
"""

from __future__ import annotations

import logging

from torch import nn

from modaltune.errors import InputError
from modaltune.models.configs import backbone_config
from modaltune.models.longnet import LongNetViT, load_slide_encoder_checkpoint
from modaltune.models.titan import TitanEncoder, load_titan_checkpoint

log = logging.getLogger(__name__)


def build_longnet_backbone(bcfg: dict, in_chans: int) -> LongNetViT:
    model = LongNetViT(
        in_chans=in_chans, embed_dim=bcfg["embed_dim"], depth=bcfg["depth"], num_heads=bcfg["num_heads"],
        mlp_ratio=bcfg["mlp_ratio"], slide_ngrids=bcfg["slide_ngrids"], tile_size=bcfg["tile_size"],
        segment_lengths=bcfg["segment_lengths"], dilated_ratios=bcfg["dilated_ratios"],
        dropout=bcfg["dropout"], drop_path_rate=bcfg["drop_path_rate"],
        attention_backend=bcfg.get("attention_backend", "auto"),
    )
    if bcfg.get("checkpoint"):
        load_slide_encoder_checkpoint(model, bcfg["checkpoint"])
    else:
        log.warning("slide encoder backbone: no checkpoint given, the frozen LongNet is randomly initialised")
    return model


def build_titan_backbone(bcfg: dict, in_chans: int) -> TitanEncoder:
    model = TitanEncoder(
        in_chans=in_chans, embed_dim=bcfg["embed_dim"], depth=bcfg["depth"], num_heads=bcfg["num_heads"],
        mlp_ratio=bcfg["mlp_ratio"], tile_size=bcfg["tile_size"],
        drop_path_rate=bcfg.get("encoder_drop_path_rate", 0.0),
    )
    if bcfg.get("checkpoint"):
        load_titan_checkpoint(model, bcfg["checkpoint"])
    else:
        log.warning("slide encoder backbone: no checkpoint given, the frozen TITAN encoder is randomly initialised")
    return model


_BUILDERS = {"longnet": build_longnet_backbone, "titan": build_titan_backbone}


def build_backbone(bcfg: dict, in_chans: int) -> nn.Module:
    """The frozen slide encoder named by ``bcfg["type"]``; ``in_chans`` = the patch feature width."""
    bcfg = backbone_config(bcfg)  # raises InputError for an unknown type
    if bcfg.get("in_chans") not in (None, in_chans):
        raise InputError(f"model config backbone.in_chans={bcfg['in_chans']} but the patch features have "
                         f"{in_chans} columns: set in_chans to null or re-embed with the matching encoder")
    return _BUILDERS[bcfg["type"]](bcfg, in_chans)


__all__ = ["build_backbone", "build_longnet_backbone", "build_titan_backbone"]
