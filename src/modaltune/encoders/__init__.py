"""Patch-encoder registry: ``build_encoder(name, checkpoint=None, **kwargs) -> PatchEncoder``.

Each encoder is one small class in its own module, registered by name with ``@register_encoder``.
The modules import torch/timm, so they are imported only when an encoder is looked up: importing
``modaltune.encoders`` stays cheap.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from modaltune.errors import InputError

if TYPE_CHECKING:
    from modaltune.encoders.base import PatchEncoder

_ENCODER_MODULES = (
    "modaltune.encoders.gigapath",
    "modaltune.encoders.conch_v15",
    "modaltune.encoders.timm_any",
    "modaltune.encoders.tiny",
)

_REGISTRY: dict[str, type] = {}


def register_encoder(name: str):
    """Class decorator: ``@register_encoder("tiny")`` on a ``PatchEncoder`` subclass."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise KeyError(f"patch encoder {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    for mod in _ENCODER_MODULES:
        importlib.import_module(mod)


def available_encoders() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def encoder_class(name: str) -> type:
    _load_all()
    if name not in _REGISTRY:
        raise InputError(f"unknown patch encoder {name!r}: the embedding encoder name in the config must "
                         f"be one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_encoder(name: str, checkpoint: str | os.PathLike | None = None, **kwargs) -> PatchEncoder:
    """Build the registered encoder ``name`` (eval mode, frozen), loading ``checkpoint`` if given."""
    cls = encoder_class(name)
    cls.resolve_config(**kwargs)  # clear InputError for unknown kwargs before any heavy work
    return cls(checkpoint=checkpoint, **kwargs)
