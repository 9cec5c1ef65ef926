"""Model configurations as plain dicts: paper defaults per architecture, backbone defaults per encoder type,
and the resolution of a workflow config's ``models.<name>`` block for one cohort.

Torch-free on purpose: the Snakefile resolves model configs while it parses the DAG.

Layers of a resolved model config (later wins):

1. the paper defaults of the architecture (``ARCH_DEFAULTS``, ``paper_config()`` / ``titan_config()``),
2. ``demo_models.<name>`` of the workflow config, only when the model trains on a generated demo cohort
   (a cohort with a ``demo:`` block, or a pan-cancer cohort made only of such cohorts),
3. ``models.<name>`` of the workflow config (what the user wrote).

So a ``--configfile`` for a real cohort gets paper sizes for every model it does not size itself, and the
demo's small widths never leak into it (``tests/test_model_configs.py``).
"""

from __future__ import annotations

import copy

from modaltune.errors import InputError

GIGAPATH_SEGMENT_LENGTHS = (1024, 5792, 32768, 185363, 1048576)
GIGAPATH_DILATED_RATIOS = (1, 2, 4, 8, 16)

# Architectures whose config carries a frozen slide encoder under ``backbone`` (late fusion: ``slide.backbone``).
SLIDE_ENCODER_ARCHS = ("modaltune", "slide_encoder_lp", "slide_encoder_tuned")
BACKBONE_TYPES = ("longnet", "titan")

# Paper-scale defaults of the baselines (docs/BASELINES.md). The builders read their defaults from here.
ARCH_DEFAULTS: dict[str, dict] = {
    "abmil": {"hidden": 512, "attn_dim": 256, "dropout": 0.25, "head_hidden": None},
    "transmil": {"hidden": 512, "num_heads": 8, "dropout": 0.0, "attn_dropout": 0.1, "head_hidden": None},
    "mlp": {"hidden": [256, 256], "dropout": 0.1, "head_hidden": None},
    "snn": {"hidden": [256, 256], "dropout": 0.25, "head_hidden": None},
    "gene_mixer": {"latent_dim": 256, "depth": 3, "token_expansion": 0.5, "channel_expansion": 0.5,
                   "dropout": 0.25, "out_dim": 768, "head_hidden": None},
    # MCAT / SurvPath as in the SurvPath repository (MCATPathways, SurvPath): their co-attention applies no
    # dropout to the attention weights (attn_dropout 0).
    "mcat": {"dim": 256, "num_heads": 8, "dropout": 0.25, "n_layers": 2, "attn_dropout": 0.0,
             "head_hidden": None},
    "survpath": {"variant": "published", "dim": 256, "attn_heads": 1, "dim_head": None, "dropout": 0.1,
                 "attn_dropout": 0.0, "ff_mult": None, "head_hidden": None},
    "late_fusion": {"slide_side": "abmil", "gene_side": "snn", "slide": {}, "genes": {},
                    "fusion_hidden": None, "dropout": 0.0},
}
SURVPATH_VARIANTS = ("published", "ours")


def arch_config(arch: str, cfg: dict | None) -> dict:
    """``cfg`` over the paper defaults of ``arch`` (top-level keys; nested blocks stay as given)."""
    out = copy.deepcopy(ARCH_DEFAULTS.get(arch, {}))
    out.update(copy.deepcopy(dict(cfg or {})))
    return out


def merge_config(cfg: dict | None, base: dict | None = None) -> dict:
    """Overlay ``cfg`` on ``base`` (default: ``paper_config()``); nested dicts are merged key by key."""
    out = copy.deepcopy(base if base is not None else paper_config())
    for key, val in (cfg or {}).items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(val, out[key])
        else:
            out[key] = copy.deepcopy(val)
    return out


# ----------------------------------------------------------------------------------------------- backbones
def longnet_backbone() -> dict:
    """Prov-GigaPath ``LongNetViT`` as the authors configure it (method 2.1)."""
    return {
        "type": "longnet",
        "in_chans": None,  # taken from the patch features
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 16,
        "mlp_ratio": 4.0,
        "segment_lengths": list(GIGAPATH_SEGMENT_LENGTHS),
        "dilated_ratios": list(GIGAPATH_DILATED_RATIOS),
        "tile_size": 256,  # one 256-px tile at 0.5 mpp per grid cell
        "slide_ngrids": 1000,
        "dropout": 0.25,
        "drop_path_rate": 0.1,  # also the adapter's drop path (method 2.3)
        "checkpoint": None,
        "interaction_indexes": [[0, 3], [4, 7], [8, 11]],
        "attention_backend": "auto",
    }


def titan_backbone() -> dict:
    """TITAN's vision encoder (``TitanConfig().vision_config``) with ModalTune's TITAN settings (method 2.1/2.3).

    ``tile_size`` is one CONCH v1.5 tile, 512 px at 0.5 mpp, in the default (target, 0.5-mpp) coordinate
    space; the authors' 1024 is the same tile in level-0 pixels of a 40x slide (``tile_size_for`` derives
    it from the workflow's coordinate space). TITAN has no positional table (2-D ALiBi); ``slide_ngrids``
    only bounds how far apart a patient's slides are laid out.
    """
    return {
        "type": "titan",
        "in_chans": None,
        "embed_dim": 768,
        "depth": 6,
        "num_heads": 12,
        "mlp_ratio": 4.0,
        "tile_size": 512,
        "slide_ngrids": 1000,
        "drop_path_rate": 0.2,  # the adapter's drop path in the authors' TITAN config
        "encoder_drop_path_rate": 0.0,  # inside the frozen TITAN encoder (its released vision config)
        "checkpoint": None,
        "interaction_indexes": [[0, 1], [2, 3], [4, 5]],
    }


def backbone_defaults(kind: str) -> dict:
    if kind == "longnet":
        return longnet_backbone()
    if kind == "titan":
        return titan_backbone()
    raise InputError(f"model config backbone.type={kind!r}: use 'longnet' (Prov-GigaPath) or 'titan'")


def backbone_config(bcfg: dict | None) -> dict:
    """A backbone block over the defaults of its ``type`` (longnet when not given)."""
    bcfg = dict(bcfg or {})
    return merge_config(bcfg, backbone_defaults(bcfg.get("type", "longnet")))


# ----------------------------------------------------------------------------------------------- ModalTune
def paper_config() -> dict:
    """The authors' Prov-GigaPath configuration (gene-only; set use_clinical for the clinical variant)."""
    return {
        "backbone": longnet_backbone(),
        "adapter": {
            "num_heads": 12,
            "cffn_ratio": 0.25,
            "drop_path": None,  # None = the backbone's drop_path_rate (authors)
            # Authors' bugs 2 and 3 fixed by default (method notes 6); true reproduces the authors' code.
            "double_residual": False,
            "frozen_dropout": False,
            "use_prompt_sa": True,
        },
        "genes": {
            "latent_dim": 256,
            "depth": 3,
            "final_groups": 64,
            "dropout": 0.25,
            "token_expansion": 0.5,
            "channel_expansion": 0.5,
        },
        "use_clinical": False,
        "num_tasks": 3,
        "token_agg": "sum",
        "output_dim": 256,
        "grad_checkpointing": False,
    }


def titan_config() -> dict:
    """ModalTune with the TITAN backbone (method 2.1/2.3): depth 6, schedule [[0,1],[2,3],[4,5]], drop path
    0.2, the 'cat' head, one 512-px tile per ALiBi cell."""
    cfg = paper_config()
    cfg["backbone"] = titan_backbone()
    cfg["token_agg"] = "cat"
    return cfg


def demo_config() -> dict:
    """A tiny configuration for tests (forward+backward well under 1 s on CPU)."""
    cfg = paper_config()
    cfg["backbone"].update(
        embed_dim=64, depth=4, num_heads=4, segment_lengths=[16, 64], dilated_ratios=[1, 2],
        interaction_indexes=[[0, 1], [2, 2], [3, 3]], dropout=0.1, drop_path_rate=0.1,
    )
    cfg["adapter"].update(num_heads=4)
    cfg["genes"].update(latent_dim=32, depth=2, final_groups=8)
    return cfg


def modaltune_defaults(cfg: dict | None) -> dict:
    """The defaults a ModalTune block is read against: TITAN's when ``backbone.type`` is titan, else GigaPath's."""
    kind = ((cfg or {}).get("backbone") or {}).get("type", "longnet")
    if kind not in BACKBONE_TYPES:
        backbone_defaults(kind)  # raises the InputError naming the choices
    return titan_config() if kind == "titan" else paper_config()


def modaltune_config(cfg: dict | None) -> dict:
    """A ModalTune block over the defaults of its backbone type."""
    return merge_config(cfg, modaltune_defaults(cfg))


# Keys a ModalTune block may carry besides those of paper_config() (generic, or read with a default).
_EXTRA_KEYS = {"": {"arch", "objective", "training", "name", "description"},
               "backbone": {"in_chans", "encoder_drop_path_rate"}}


def check_config_keys(cfg: dict, base: dict | None = None, where: str = "") -> None:
    """InputError naming the first unknown key (a typo would otherwise run with the paper's value)."""
    base = modaltune_defaults(cfg) if base is None else base
    for key, val in (cfg or {}).items():
        if key not in base and key not in _EXTRA_KEYS.get(where, set()):
            valid = sorted(set(base) | _EXTRA_KEYS.get(where, set()))
            raise InputError(f"model config: unknown key {(where + '.' if where else '') + key!r}; "
                             f"valid keys{' of ' + where if where else ''}: {valid}")
        if isinstance(val, dict) and isinstance(base.get(key), dict):
            check_config_keys(val, base[key], key)


# ------------------------------------------------------------------------------------- workflow resolution
def tile_size_for(kind: str, coords_space: str, patch_size: int, target_mpp: float = 0.5) -> int:
    """Grid cell (px in the coordinate space) of one tile for encoder ``kind``.

    ``target``: coordinates are 0.5-mpp pixels, so one tile is ``patch_size`` px (256 for Prov-GigaPath,
    512 for TITAN / CONCH v1.5) and neighbouring tiles land in neighbouring cells. ``level0`` (the paper):
    the authors' values, LongNet 256 and TITAN 1024 = a 512-px tile at 0.5 mpp seen at level 0 of a 40x
    (0.25-mpp) slide (method 6, bug 4).
    """
    if coords_space == "level0":
        if kind == "titan":
            return int(round(patch_size * target_mpp / 0.25))
        return int(longnet_backbone()["tile_size"])
    return int(patch_size)


def _slide_backbone(arch: str, cfg: dict) -> dict | None:
    """The resolved slide-encoder block of a model (raw or resolved config); None without a slide encoder."""
    if arch in SLIDE_ENCODER_ARCHS:
        return backbone_config(cfg.get("backbone"))
    if arch == "late_fusion" and cfg.get("slide_side", "abmil") == "slide_encoder":
        return backbone_config((cfg.get("slide") or {}).get("backbone"))
    return None


def backbone_grid(arch: str, cfg: dict | None) -> tuple[int | None, int]:
    """(slide_ngrids, tile_size) of the slide encoder in a model block (raw or resolved), read against the
    defaults of its encoder type; (None, 256) for models without a slide encoder (positions unused)."""
    cfg = dict(cfg or {})
    b = _slide_backbone(arch, cfg)
    if b is None:
        return None, int(cfg.get("tile_size", longnet_backbone()["tile_size"]))
    ngrids = b.get("slide_ngrids")
    return (None if ngrids is None else int(ngrids)), int(b["tile_size"])


# Patches per patient in training (method 3.3): the authors' random-subset thresholds per slide encoder.
TRAIN_MAX_PATCHES = {"longnet": 25000, "titan": 15000}


def train_max_patches(arch: str, cfg: dict | None, setting) -> int | None:
    """``training.max_patches`` resolved for one model: a number (or null = every patch) as given; "auto" =
    the authors' threshold for its slide encoder type (25,000 Prov-GigaPath, 15,000 TITAN), 25,000 for
    models without a slide encoder."""
    if setting != "auto":
        return None if setting is None else int(setting)
    b = _slide_backbone(arch, dict(cfg or {}))
    return TRAIN_MAX_PATCHES["longnet" if b is None else b.get("type", "longnet")]


def is_demo_cohort(config: dict, cohort: str | None) -> bool:
    """True for a generated demo cohort (``cohorts.<c>.demo``) or a pan-cancer cohort made only of them."""
    if cohort is None:
        return False
    cohorts = config.get("cohorts") or {}
    pan = config.get("pancancer") or {}
    if cohort in pan:
        members = list(pan[cohort])
        return bool(members) and all(is_demo_cohort(config, m) for m in members)
    if cohort not in cohorts:
        raise InputError(f"config: cohort {cohort!r} is neither under cohorts: nor under pancancer:")
    return bool((cohorts[cohort] or {}).get("demo"))


def _fill_backbone(bcfg: dict | None, explicit: dict | None, config: dict, model_training: dict) -> dict:
    """Full backbone block; ``tile_size`` follows the coordinate space unless the user set it."""
    out = backbone_config(bcfg)
    if "tile_size" not in (explicit or {}):
        train = {**(config.get("training") or {}), **(model_training or {})}
        tiling = config.get("tiling") or {}
        out["tile_size"] = tile_size_for(out["type"], train.get("coords_space", "target"),
                                         int(tiling.get("patch_size", out["tile_size"])),
                                         float(tiling.get("target_mpp", 0.5)))
    return out


def model_config(config: dict, name: str, cohort: str | None = None) -> dict:
    """The config block model ``name`` trains with on ``cohort`` (see the module docstring for the layers).

    Slide-encoder blocks come back with every backbone key filled in (type defaults, ``tile_size`` fitted
    to the coordinate space), so whoever reads the positional grid from the block reads the encoder's grid.
    """
    models = config.get("models") or {}
    if name not in models:
        raise InputError(f"config: model {name!r} has no block under models:")
    demo = config.get("demo_models") or {}
    unknown = sorted(set(demo) - set(models))
    if unknown:
        raise InputError(f"config demo_models: {unknown} have no block under models:; remove them or add the models")
    user = copy.deepcopy(models[name] or {})
    extra = copy.deepcopy(demo.get(name) or {}) if is_demo_cohort(config, cohort) else {}
    block = merge_config(user, extra) if extra else user
    arch = block.get("arch", name)
    training = block.get("training") or {}
    if arch in SLIDE_ENCODER_ARCHS:
        explicit = {**(extra.get("backbone") or {}), **(user.get("backbone") or {})}
        if arch == "modaltune":
            defaults = modaltune_defaults(block)
            defaults.pop("backbone")
            block = merge_config(block, defaults)
        block["backbone"] = _fill_backbone(block.get("backbone"), explicit, config, training)
    elif arch == "late_fusion" and block.get("slide_side", "abmil") == "slide_encoder":
        explicit = {**((extra.get("slide") or {}).get("backbone") or {}),
                    **((user.get("slide") or {}).get("backbone") or {})}
        slide = dict(block.get("slide") or {})
        slide["backbone"] = _fill_backbone(slide.get("backbone"), explicit, config, training)
        block["slide"] = slide
    return block


__all__ = [
    "ARCH_DEFAULTS", "BACKBONE_TYPES", "backbone_grid", "GIGAPATH_DILATED_RATIOS", "GIGAPATH_SEGMENT_LENGTHS",
    "SLIDE_ENCODER_ARCHS", "SURVPATH_VARIANTS", "arch_config", "backbone_config", "backbone_defaults",
    "demo_config", "is_demo_cohort", "longnet_backbone", "merge_config", "model_config", "modaltune_config",
    "modaltune_defaults", "paper_config", "tile_size_for", "titan_backbone", "titan_config", "TRAIN_MAX_PATCHES",
    "train_max_patches",
]
