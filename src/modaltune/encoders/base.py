"""Common parts of every patch encoder: preprocessing, strict checkpoint loading, checkpoint hashing.

A ``PatchEncoder`` is a frozen ``nn.Module`` in eval mode plus the preprocessing its weights were
trained with. Preprocessing is split in two so the embedding loop can keep tiles as uint8 until they
reach the device (4x less host->device traffic): ``resize_crop`` (uint8 HWC numpy -> uint8 CHW
tensor, runs in the DataLoader workers) and ``normalize`` (uint8/float batch -> normalised float,
runs on the device). ``transform`` composes both for single images.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import nn

from modaltune.errors import InputError
from modaltune.io_utils import atomic_path, file_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks.

    Cached per (real path, size, mtime) in memory and, for large files, on disk under
    ``$MODALTUNE_CACHE_DIR`` (default ``~/.cache/modaltune``): every per-slide embedding job checks the
    checkpoint hash, and re-hashing a 4.5 GB checkpoint for each of thousands of slides adds up.
    """
    st = os.stat(path)
    return _sha256_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


DISK_CACHE_MIN_BYTES = 256 << 20


def _cache_file(path: str, size: int, mtime_ns: int) -> Path | None:
    if size < DISK_CACHE_MIN_BYTES:
        return None
    root = Path(os.environ.get("MODALTUNE_CACHE_DIR") or Path.home() / ".cache" / "modaltune")
    key = hashlib.sha256(f"{path}|{size}|{mtime_ns}".encode()).hexdigest()[:32]
    return root / "sha256" / f"{key}.txt"


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    cache = _cache_file(path, size, mtime_ns)
    if cache is not None and cache.is_file():
        digest = cache.read_text().strip()
        if len(digest) == 64:
            return digest
    digest = file_sha256(path)
    if cache is not None:
        with contextlib.suppress(OSError):  # a read-only home only costs the re-hash next time
            with atomic_path(cache) as tmp:
                tmp.write_text(digest + "\n")
    return digest


class ResizeCrop:
    """uint8 HWC numpy tile -> uint8 CHW tensor: shorter side to ``resize`` then centre crop ``size``.

    Tensor resizing with antialias stands in for PIL (what the published pipelines used): the two agree
    to about one grey level, and tensors avoid a PIL round trip per tile. Picklable for workers.
    """

    def __init__(self, size: int, resize: int | None, interpolation: str = "bicubic"):
        self.size = int(size)
        self.resize = int(resize) if resize else None
        self.interpolation = TF.InterpolationMode(interpolation)

    def __call__(self, tile: np.ndarray) -> torch.Tensor:
        if not isinstance(tile, np.ndarray) or tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3:
            got = getattr(tile, "dtype", type(tile).__name__), getattr(tile, "shape", None)
            raise InputError(f"tile must be a uint8 RGB array of shape (H, W, 3); got {got}")
        # Readers may hand out read-only views (PIL buffers); torch wants writable memory.
        x = torch.from_numpy(np.require(tile, requirements=["C", "W"])).permute(2, 0, 1)
        if self.resize is not None and min(x.shape[1:]) != self.resize:
            x = TF.resize(x, [self.resize], interpolation=self.interpolation, antialias=True)
        if tuple(x.shape[1:]) != (self.size, self.size):
            x = TF.center_crop(x, [self.size, self.size])
        return x.contiguous()


class Normalize(nn.Module):
    """uint8 (or 0-255 float) CHW / NCHW -> float in [0, 1] -> (x - mean) / std; runs on the device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)
        return (x - self.mean) / self.std


class Transform:
    """The full single-image transform: uint8 HWC numpy -> normalised float CHW tensor."""

    def __init__(self, resize_crop: ResizeCrop, normalize: Normalize):
        self.resize_crop = resize_crop
        self.normalize = normalize

    def __call__(self, tile: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return self.normalize(self.resize_crop(tile))


def unwrap_state_dict(obj, source: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or {"model"/"state_dict": ...}; drop a DDP ``module.`` prefix."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"checkpoint {source}: expected a state dict (name -> tensor), "
                         f"or a dict with a 'model' or 'state_dict' entry holding one")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} not found: set the encoder checkpoint to a local copy of the "
                         "published weights (nothing is downloaded at run time)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear message
        raise InputError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                         "re-download it or point the config at the right file") from exc
    return unwrap_state_dict(obj, str(path))


def check_keys(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict loading with a message that lists what is missing, unexpected or mis-shaped."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")

        parts = [f"{name} {len(keys)}: {few(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
        raise InputError(f"checkpoint {source} does not match the {type(model).__name__} architecture "
                         f"({'; '.join(parts)}); use the published weights file for this encoder")


class PatchEncoder:
    """A frozen patch encoder. Subclasses build ``self.model`` and call ``super().__init__``.

    Attributes: ``name``, ``model`` (eval, no grad), ``transform``, ``resize_crop``, ``normalize``,
    ``feature_dim``, ``input_size``, ``checkpoint_sha256`` ("none" for random init), ``config``
    (the resolved constructor kwargs; stored in the features file to detect stale outputs).
    """

    name: str = ""
    feature_dim_hint: int | None = None  # output size known without building the model

    def __init__(self, model: nn.Module, *, checkpoint: str | os.PathLike | None, feature_dim: int,
                 input_size: int, resize: int | None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, interpolation: str = "bicubic",
                 config: dict | None = None):
        if checkpoint is not None:
            sd = self.adapt_state_dict(read_checkpoint(checkpoint), model)
            check_keys(model, sd, str(checkpoint))
            model.load_state_dict(sd, strict=True)
            self.checkpoint_sha256 = sha256_file(checkpoint)
        else:
            self.checkpoint_sha256 = "none"
        self.model = model.eval().requires_grad_(False)
        self.feature_dim = int(feature_dim)
        self.input_size = int(input_size)
        self.resize_crop = ResizeCrop(input_size, resize, interpolation)
        self.normalize = Normalize(mean, std)
        self.transform = Transform(self.resize_crop, self.normalize)
        self.config = dict(config or {})

    def adapt_state_dict(self, sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Hook for published-format quirks (e.g. positional embeddings trained at another size)."""
        return sd

    @classmethod
    def resolve_config(cls, **kwargs) -> dict:
        """The full constructor kwargs (defaults filled in) without building the model."""
        sig = inspect.signature(cls.__init__)
        try:
            bound = sig.bind(None, **kwargs)
        except TypeError as exc:
            raise InputError(f"encoder {cls.name!r}: bad encoder_kwargs {sorted(kwargs)} ({exc}); "
                             f"allowed: {[p for p in sig.parameters if p not in ('self', 'checkpoint')]}") from exc
        bound.apply_defaults()
        cfg = dict(bound.arguments)
        cfg.pop("self", None)
        cfg.pop("checkpoint", None)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, feature_dim={self.feature_dim}, "
                f"input_size={self.input_size}, checkpoint_sha256={self.checkpoint_sha256[:12]})")


def build_module(builder: Callable[[], nn.Module], checkpoint: str | os.PathLike | None, seed: int) -> nn.Module:
    """Random init (seeded) without a checkpoint; with one, skip the init entirely.

    With a checkpoint every tensor is overwritten by the strict load, so the model is built on the meta
    device and only allocated (the random init of a 1.1B-parameter ViT costs tens of seconds on a CPU).
    Models with buffers outside the state dict fall back to a normal build (they would stay undefined).
    """
    if checkpoint is not None:
        with torch.device("meta"):
            model = builder()
        saved = set(model.state_dict())
        if all(name in saved for name, _ in model.named_buffers()):
            return model.to_empty(device="cpu")
    with seeded_init(seed):
        return builder()


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build a random-initialised model deterministically without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield
