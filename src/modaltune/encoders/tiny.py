"""The demo encoder: a small random-initialised CNN that keeps colour and texture apart.

Random convolutions with a nonlinearity and mean pooling act like a bank of random texture filters:
the pooled responses of the first (linear, stride-4) stage carry each tile's mean colour, the deeper
stages carry local contrast and pattern. That is enough for the demo cohort's class-dependent
colour/texture signal to survive into 64-d features, at thousands of tiles per second on a CPU.
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
        self.stem = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.body = nn.Sequential(
            nn.GELU(), nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
            nn.GELU(), nn.Conv2d(32, dim - 16, kernel_size=3, stride=2, padding=1), nn.GELU(),
        )
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        # Concatenating the pooled stem keeps mean colour linearly readable next to texture features.
        return torch.cat([s.mean(dim=(2, 3)), self.body(s).mean(dim=(2, 3))], dim=1)


@register_encoder("tiny")
class TinyEncoder(PatchEncoder):
    feature_dim_hint = 64

    def __init__(self, checkpoint: str | os.PathLike | None = None, *, seed: int = 0, dim: int = 64,
                 img_size: int = 224):
        with seeded_init(seed):
            model = TinyCNN(dim)
        super().__init__(model, checkpoint=checkpoint, feature_dim=dim, input_size=img_size, resize=img_size,
                         config=self.resolve_config(seed=seed, dim=dim, img_size=img_size))
