"""The one device picker and the one mixed-precision policy (embedding, text targets, training, evaluation).

torch is imported inside the functions: modules that the workflow imports while building the DAG
(embedding via feature_import) stay torch-free at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modaltune.errors import InputError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_ALIASES = {"float32": "fp32", "32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def pick_device(name: str | None = "auto", key: str = "device") -> torch.device:
    """"auto" (or None) -> cuda when available, else cpu; otherwise ``torch.device(name)``, checked.

    ``key`` names the config setting in the error (e.g. "training.device")."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{key}={name!r} requested but CUDA is not available on this machine; "
                         f"set {key} to 'auto' or 'cpu'")
    return dev


def amp_settings(precision: str, device: torch.device, key: str = "precision") -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler) for ``precision`` on ``device``.

    fp32 everywhere on CPU. On CUDA: "bf16" -> bf16 autocast, no scaler; "fp16" -> fp16 autocast +
    GradScaler (the authors' setting: fp16 with a GradScaler); "auto" -> bf16 where the GPU supports it,
    else the fp16 preset; "fp32" -> no autocast. Inference callers use only the dtype.
    """
    import torch

    precision = _ALIASES.get(str(precision), str(precision))
    if precision not in PRECISIONS:
        raise InputError(f"{key}={precision!r}: use one of {list(PRECISIONS)}")
    if device.type != "cuda" or precision == "fp32":
        return None, False
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (torch.bfloat16, False) if precision == "bf16" else (torch.float16, True)


__all__ = ["PRECISIONS", "amp_settings", "pick_device"]
