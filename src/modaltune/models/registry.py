"""Model registry: every trainable or probed model is a plain ``nn.Module`` registered by name.

A model differs from the others only by its module and its config block; the one trainer and the
one evaluator in ``modaltune.training`` / ``modaltune.evaluation`` serve all of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from modaltune.models.configs import backbone_grid

# Modules that register models on import; imported lazily so ``import modaltune`` stays torch-free.
_MODEL_MODULES = (
    "modaltune.models.modaltune",
    "modaltune.models.baselines",
)

_REGISTRY: dict[str, Callable] = {}


@dataclass
class ModelDims:
    """Data-dependent sizes a model needs at construction time."""

    feature_dim: int
    n_genes: int
    pathway_groups: list[list[int]] = field(default_factory=list)
    clinical_dim: int = 0
    n_classes: int = 2
    n_bins: int = 4
    text_dim: int = 0


def positional_grid(arch: str, cfg: dict) -> tuple[int | None, int]:
    """(slide_ngrids or None, tile_size) of a model's positional grid; None for models that ignore positions.

    The grid is a fact of the model's slide encoder: read from its (raw or resolved) block against the
    defaults of its encoder type (``modaltune.models.configs.backbone_grid``).
    """
    return backbone_grid(arch, cfg)


# Torch-free facts per architecture, read while Snakemake builds the DAG (which inputs a run needs):
# (objective when the config block sets none, whether the objective is fixed by the arch, needs slides).
# tests/test_science.py checks them against the built modules.
ARCH_FACTS: dict[str, tuple[str, bool, bool]] = {
    "modaltune": ("text_kl", True, True),
    "slide_encoder_lp": ("none", True, True),
    "slide_encoder_tuned": ("classification", False, True),
    "abmil": ("classification", False, True),
    "transmil": ("classification", False, True),
    "mcat": ("classification", False, True),
    "survpath": ("classification", False, True),
    "late_fusion": ("classification", False, True),
    "mlp": ("classification", False, False),
    "snn": ("classification", False, False),
    "gene_mixer": ("classification", False, False),
}


def model_objective(arch: str, cfg: dict) -> str | None:
    """The training objective a model block gets (None: an architecture without recorded facts)."""
    if arch not in ARCH_FACTS:
        return cfg.get("objective")
    default, fixed, _ = ARCH_FACTS[arch]
    return default if fixed else cfg.get("objective", default)


def needs_slides(arch: str, cfg: dict) -> bool:
    """Whether the model reads patch features (unknown architectures: assumed to)."""
    del cfg  # every recorded arch decides this alone; kept so that a config-dependent arch can be added
    return ARCH_FACTS.get(arch, ("", False, True))[2]


def needs_text(arch: str, cfg: dict) -> bool:
    """Whether training needs the fold's text targets: objective text_kl, or unknown (conservative)."""
    objective = model_objective(arch, cfg)
    return objective is None or objective == "text_kl"


def register_model(name: str):
    """Decorator: ``@register_model("abmil")`` on a builder ``fn(cfg: dict, dims: ModelDims) -> nn.Module``."""

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise KeyError(f"model architecture {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_all() -> None:
    for mod in _MODEL_MODULES:
        importlib.import_module(mod)


def available_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def build_model(arch: str, cfg: dict, dims: ModelDims):
    """Build the registered architecture ``arch`` from its config block."""
    _load_all()
    if arch not in _REGISTRY:
        raise KeyError(
            f"unknown model architecture {arch!r}; config key models.<name>.arch must be one of "
            f"{sorted(_REGISTRY)}"
        )
    return _REGISTRY[arch](cfg, dims)


def check_model_block(name: str, block: dict, feature_dim: int | None = None) -> None:
    """Config-time check of ``models.<name>``: the arch exists and the builder accepts every key.

    Builds the model on PyTorch's meta device (no memory, no weights read; checkpoints are checked
    elsewhere) with small stand-in dims; any error is re-raised as an InputError naming the block.
    """
    import copy

    import torch

    from modaltune.errors import InputError

    cfg = copy.deepcopy(dict(block))
    arch = cfg.get("arch")
    _load_all()
    if arch not in _REGISTRY:
        raise InputError(f"config models.{name}.arch={arch!r}: unknown architecture; use one of {sorted(_REGISTRY)}")
    for sub in (cfg, *(v for v in cfg.values() if isinstance(v, dict))):
        if isinstance(sub.get("backbone"), dict):
            sub["backbone"]["checkpoint"] = None  # no weights read at config time
    dims = ModelDims(feature_dim=int(feature_dim or 16), n_genes=8, pathway_groups=[[0, 1, 2, 3], [4, 5, 6, 7]],
                     clinical_dim=8, n_classes=2, n_bins=4, text_dim=8)
    try:
        try:
            with torch.device("meta"):
                _REGISTRY[arch](cfg, dims)
        except RuntimeError:  # an op without a meta kernel (repeat_interleave): build for real on the CPU
            with torch.device("cpu"):
                _REGISTRY[arch](cfg, dims)
    except InputError as exc:
        raise InputError(f"config models.{name}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"config models.{name} (arch {arch}): the block does not build: {exc!r}") from exc
