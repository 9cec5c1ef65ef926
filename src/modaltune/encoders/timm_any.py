"""Any timm architecture as a patch encoder ("timm"), plus the ViT-S used by the benchmarks ("vit-small")."""

from __future__ import annotations

import os
from collections.abc import Sequence

import timm

from modaltune.encoders import register_encoder
from modaltune.encoders.base import IMAGENET_MEAN, IMAGENET_STD, PatchEncoder, seeded_init
from modaltune.errors import InputError


@register_encoder("timm")
class TimmEncoder(PatchEncoder):
    """``timm.create_model(model_name, num_classes=0)`` with weights from a local checkpoint."""

    def __init__(self, checkpoint: str | os.PathLike | None = None, *, model_name: str = "",
                 img_size: int = 224, resize: int | None = None, interpolation: str = "bicubic",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, seed: int = 0):
        if not model_name:
            raise InputError("encoder 'timm' needs encoder_kwargs.model_name (a timm architecture name, "
                             "e.g. 'vit_base_patch16_224')")
        if not timm.is_model(model_name.split(".")[0]):
            raise InputError(f"encoder 'timm': model_name {model_name!r} is not a timm architecture")
        with seeded_init(seed):
            try:  # transformers take img_size (sizes their position table); convnets reject it
                model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=img_size)
            except TypeError:
                model = timm.create_model(model_name, pretrained=False, num_classes=0)
        super().__init__(model, checkpoint=checkpoint, feature_dim=model.num_features, input_size=img_size,
                         resize=resize or img_size, mean=mean, std=std, interpolation=interpolation,
                         config=self.resolve_config(model_name=model_name, img_size=img_size, resize=resize,
                                                    interpolation=interpolation, mean=mean, std=std,
                                                    seed=seed))


@register_encoder("vit-small")
class VitSmallEncoder(PatchEncoder):
    """timm ``vit_small_patch16_224`` (22M parameters, 384-d), random init unless a checkpoint is given."""

    feature_dim_hint = 384

    def __init__(self, checkpoint: str | os.PathLike | None = None, *, seed: int = 0):
        with seeded_init(seed):
            model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
        super().__init__(model, checkpoint=checkpoint, feature_dim=model.num_features, input_size=224,
                         resize=224, config=self.resolve_config(seed=seed))
