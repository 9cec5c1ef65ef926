"""The demo encoder: a small random-initialised CNN that keeps colour and texture apart.

Random convolutions act as a bank of random filters. Near initialisation a GELU is almost linear, so
mean pooling alone would keep mean colour but wash out texture; the features therefore join the
spatial mean and spatial standard deviation of the first (stride-4) filter responses (colour and
local contrast, as in style statistics) with mean-pooled deeper responses (pattern). That keeps the
demo cohort's class-dependent colour/texture signal in 64-d features at a low CPU cost.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from modaltune.encoders import register_encoder
from modaltune.encoders.base import PatchEncoder, seeded_init


class TinyCNN(nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        if dim < 40:
            raise ValueError(f"tiny encoder dim must be >= 40, got {dim}")
        self.stem = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.body = nn.Sequential(
            nn.GELU(), nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
            nn.GELU(), nn.Conv2d(32, dim - 32, kernel_size=3, stride=2, padding=1), nn.GELU(),
        )
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        std, mean = torch.std_mean(s, dim=(2, 3))
        return torch.cat([mean, std, self.body(s).mean(dim=(2, 3))], dim=1)


@register_encoder("tiny")
class TinyEncoder(PatchEncoder):
    feature_dim_hint = 64

    def __init__(self, checkpoint: str | os.PathLike | None = None, *, seed: int = 0, dim: int = 64,
                 img_size: int = 224):
        with seeded_init(seed):
            model = TinyCNN(dim)
        super().__init__(model, checkpoint=checkpoint, feature_dim=dim, input_size=img_size, resize=img_size,
                         config=self.resolve_config(seed=seed, dim=dim, img_size=img_size))
