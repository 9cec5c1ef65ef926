"""Model configurations: paper sizes outside the demo, demo sizes only on demo cohorts, TITAN's own grid.

The merges below use Snakemake's own ``update_config``, i.e. exactly what ``--configfile`` does to
config/config.yaml.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import update_config, validate

from modaltune.errors import InputError
from modaltune.models import ModelDims, build_model
from modaltune.models.configs import (
    ARCH_DEFAULTS,
    backbone_grid,
    is_demo_cohort,
    model_config,
    paper_config,
    tile_size_for,
    titan_config,
)
from modaltune.models.modaltune import ModalTune

try:  # contract C3: the grid reader moves from training.grid_of to modaltune.models.positional_grid
    from modaltune.models import positional_grid
except ImportError:  # pragma: no cover - before that move
    from modaltune.training import grid_of as _grid_of

    def positional_grid(arch: str, cfg: dict):
        return _grid_of(cfg)


def grid_of(block: dict):
    """The positional grid the workflow uses for this (resolved) block."""
    return positional_grid(block.get("arch", "modaltune"), block)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "config/schemas/config.schema.yaml")


def _yaml(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


def _merged(*overrides: dict) -> dict:
    cfg = _yaml("config/config.yaml")
    for over in overrides:
        update_config(cfg, copy.deepcopy(over))
    return cfg


def _real_cohort(cfg: dict, name: str = "REAL") -> dict:
    cfg["cohorts"][name] = {"site": "BRCA", "sheet": "x.tsv", "rna": "x.gz", "gene_sets": "x.gmt",
                            "clinical": "c.tsv", "biospecimen": "b.tsv"}
    return cfg


def _leaves(d: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _get(d: dict, path: tuple):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return KeyError
        d = d[k]
    return d


# Paper sizes of every model of the default config (docs/BASELINES.md, method 2 / 5).
PAPER = {
    "abmil": {("hidden",): 512, ("attn_dim",): 256},
    "transmil": {("hidden",): 512, ("num_heads",): 8},
    "mlp": {("hidden",): [256, 256]},
    "snn": {("hidden",): [256, 256]},
    "gene_mixer": {("latent_dim",): 256, ("depth",): 3, ("out_dim",): 768},
    "mcat": {("dim",): 256, ("num_heads",): 8, ("n_layers",): 2},
    "survpath": {("dim",): 256, ("variant",): "published"},
    "abmil_cat": {("slide", "hidden"): 512, ("slide", "attn_dim"): 256, ("genes", "hidden"): [256, 256]},
    "modaltune": {("backbone", "embed_dim"): 768, ("backbone", "depth"): 12, ("backbone", "num_heads"): 16,
                  ("backbone", "interaction_indexes"): [[0, 3], [4, 7], [8, 11]], ("adapter", "num_heads"): 12,
                  ("genes", "latent_dim"): 256, ("genes", "final_groups"): 64, ("use_clinical",): False},
    "gigapath_lp": {("backbone", "embed_dim"): 768, ("backbone", "depth"): 12},
    "gigapath_tuned": {("backbone", "embed_dim"): 768, ("backbone", "depth"): 12},
}
ARCH_OF = {"abmil_cat": "late_fusion", "gigapath_lp": "slide_encoder_lp", "gigapath_tuned": "slide_encoder_tuned"}


def _effective(name: str, block: dict, path: tuple):
    """A key's value as the builder sees it: the block's, else the architecture's default."""
    val = _get(block, path)
    if val is not KeyError:
        return val
    arch = block.get("arch", name)
    if arch == "late_fusion" and path[0] in ("slide", "genes"):
        side = block.get("slide_side", "abmil") if path[0] == "slide" else block.get("gene_side", "snn")
        return ARCH_DEFAULTS[side][path[1]]
    return ARCH_DEFAULTS[arch][path[0]]


def _assert_paper_sizes(cfg: dict, cohort: str, names, user_blocks: dict) -> None:
    for name in names:
        block = model_config(cfg, name, cohort)
        for path, want in PAPER[name].items():
            if _get(user_blocks.get(name) or {}, path) is not KeyError:
                continue  # the user's own file sets it: not inherited
            got = _effective(name, block, path)
            assert got == want, (f"models.{name}.{'.'.join(path)} = {got!r} on non-demo cohort {cohort}, "
                                 f"paper size {want!r}: inherited from a demo-size block?")


# ---------------------------------------------------------------------------------- 16.3 paper scale
def test_cohort_example_merged_over_default_trains_every_model_at_paper_size():
    example = _yaml("config/cohort_example.yaml")
    cfg = _merged(example)
    assert example["run"]["models"]  # the example names its models
    for cohort in example["run"]["cohorts"]:
        assert not is_demo_cohort(cfg, cohort)
        _assert_paper_sizes(cfg, cohort, example["run"]["models"], example.get("models") or {})


def test_every_default_model_gets_paper_size_on_a_real_cohort():
    cfg = _real_cohort(_merged())
    assert set(PAPER) == set(cfg["models"]), "a new model in config.yaml needs its paper sizes in PAPER"
    _assert_paper_sizes(cfg, "REAL", list(cfg["models"]), {})
    # and the built modules have the paper widths
    dims = ModelDims(feature_dim=16, n_genes=12, pathway_groups=[[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10, 11]],
                     n_classes=2, n_bins=4)
    abmil = build_model("abmil", model_config(cfg, "abmil", "REAL"), dims)
    snn = build_model("snn", model_config(cfg, "snn", "REAL"), dims)
    survpath = build_model("survpath", model_config(cfg, "survpath", "REAL"), dims)
    assert abmil.embed_dim == 512 and abmil.pool.attn_c.in_features == 256
    assert [m.out_features for m in snn.encoder.modules() if isinstance(m, torch.nn.Linear)] == [256, 256]
    assert survpath.variant == "published" and survpath.embed_dim == 256


def test_guard_fails_when_a_demo_size_leaks_into_models():
    # The check above must catch the old layout: a demo width under models: (merged into every config).
    cfg = _real_cohort(_merged({"models": {"abmil": {"hidden": 64}}}))
    with pytest.raises(AssertionError, match="abmil.hidden"):
        _assert_paper_sizes(cfg, "REAL", ["abmil"], {})
    # ... and a user's explicit choice is not flagged
    _assert_paper_sizes(cfg, "REAL", ["abmil"], {"abmil": {"hidden": 64}})


def test_default_config_demo_sizes_as_before():
    cfg = _merged()
    assert is_demo_cohort(cfg, "demo")
    got = {n: model_config(cfg, n, "demo") for n in cfg["models"]}
    assert (got["abmil"]["hidden"], got["abmil"]["attn_dim"]) == (64, 32)
    assert (got["transmil"]["hidden"], got["transmil"]["num_heads"]) == (64, 4)
    assert got["mlp"]["hidden"] == got["snn"]["hidden"] == [64, 64]
    assert (got["gene_mixer"]["latent_dim"], got["gene_mixer"]["depth"], got["gene_mixer"]["out_dim"]) == (32, 2, 64)
    assert (got["mcat"]["dim"], got["mcat"]["num_heads"], got["mcat"]["n_layers"]) == (64, 4, 1)
    assert got["survpath"]["dim"] == 64
    assert got["abmil_cat"]["slide"] == {"hidden": 64, "attn_dim": 32}
    assert got["abmil_cat"]["genes"] == {"hidden": [64, 64]}
    mt = got["modaltune"]
    assert mt["objective"] == "text_kl" and mt["use_clinical"] is True
    b = mt["backbone"]
    assert (b["type"], b["embed_dim"], b["depth"], b["num_heads"], b["tile_size"], b["slide_ngrids"]) == \
        ("longnet", 64, 6, 4, 256, 1000)
    assert b["segment_lengths"] == [16, 64] and b["interaction_indexes"] == [[0, 1], [2, 3], [4, 5]]
    assert (mt["genes"]["latent_dim"], mt["genes"]["final_groups"], mt["adapter"]["num_heads"]) == (32, 8, 4)
    for name in ("gigapath_lp", "gigapath_tuned"):
        assert got[name]["backbone"]["embed_dim"] == 64 and got[name]["backbone"]["depth"] == 6


def test_demo_models_are_not_shadowed_by_models():
    cfg = _yaml("config/config.yaml")
    for name, extra in cfg["demo_models"].items():
        assert name in cfg["models"]
        clash = set(_leaves(extra)) & set(_leaves(cfg["models"][name]))
        assert not clash, f"models.{name} sets {sorted(clash)}, which makes demo_models.{name} dead"


def test_user_models_block_wins_over_demo_sizes_and_pancancer_rule():
    cfg = _merged({"models": {"abmil": {"hidden": 128}},
                   "cohorts": {"demo2": {"site": "BLCA", "demo": {"n_patients": 10, "seed": 1}}},
                   "pancancer": {"PAN": ["demo", "demo2"], "MIX": ["demo", "REAL"]}})
    _real_cohort(cfg)
    assert model_config(cfg, "abmil", "demo")["hidden"] == 128
    assert model_config(cfg, "abmil", "demo")["attn_dim"] == 32
    assert model_config(cfg, "snn", "PAN")["hidden"] == [64, 64]  # all members generated
    assert "hidden" not in model_config(cfg, "snn", "MIX")  # a real member: paper size
    with pytest.raises(InputError, match="NOPE"):
        model_config(cfg, "snn", "NOPE")
    with pytest.raises(InputError, match="demo_models"):
        model_config(_merged({"demo_models": {"ghost": {"hidden": 1}}}), "snn", "demo")


def test_schema_accepts_the_configs_and_rejects_bad_model_keys():
    validate(_merged(), SCHEMA, set_default=False)
    validate(_merged(_yaml("config/cohort_example.yaml")), SCHEMA, set_default=False)
    for bad in ({"models": {"survpath": {"variant": "fancy"}}},
                {"models": {"modaltune": {"backbone": {"tile_siz": 512}}}},
                {"demo_models": {"abmil": {"arch": "transmil"}}}):
        with pytest.raises(WorkflowError):
            validate(_merged(bad), SCHEMA, set_default=False)


# ---------------------------------------------------------------------------------- 16.5 TITAN path
def _titan_workflow_cfg(coords_space: str = "target", **backbone) -> dict:
    cfg = _real_cohort(_merged({"tiling": {"patch_size": 512},
                                "training": {"coords_space": coords_space},
                                "models": {"modaltune": {"backbone": {"type": "titan", **backbone}}}}))
    return cfg


def test_titan_modaltune_gets_titan_head_tile_and_drop_path():
    block = model_config(_titan_workflow_cfg(), "modaltune", "REAL")
    b = block["backbone"]
    assert block["token_agg"] == "cat"
    assert (b["type"], b["depth"], b["num_heads"], b["tile_size"], b["drop_path_rate"]) == ("titan", 6, 12, 512, 0.2)
    assert b["interaction_indexes"] == [[0, 1], [2, 3], [4, 5]]
    assert "segment_lengths" not in b  # no LongNet keys on a TITAN block
    assert grid_of(block)[1] == 512
    # the module itself, built from a block that only names the type (small widths to stay fast)
    dims = ModelDims(feature_dim=8, n_genes=6, pathway_groups=[[0, 1, 2], [3, 4, 5]])
    small = {"backbone": {"type": "titan", "embed_dim": 32, "num_heads": 4},
             "adapter": {"num_heads": 4}, "genes": {"latent_dim": 8, "final_groups": 2}}
    model = ModalTune(small, dims)
    assert model.token_agg == "cat" and model.final_norm.normalized_shape == (3 * 32,)
    assert model.backbone.tile_size == 512 and model.backbone.n_layers == 6
    drop = [m.drop_prob for m in model.adapter.modules() if type(m).__name__ == "DropPath"]
    assert drop and max(drop) == pytest.approx(0.2)
    assert titan_config()["backbone"]["tile_size"] == 512
    assert paper_config()["token_agg"] == "sum"  # GigaPath keeps its head


def test_titan_distinct_tiles_get_distinct_cells_in_target_space():
    from modaltune.models.titan import TitanEncoder

    block = model_config(_titan_workflow_cfg("target"), "modaltune", "REAL")
    tile = block["backbone"]["tile_size"]
    enc = TitanEncoder(in_chans=4, embed_dim=16, depth=1, num_heads=4, tile_size=tile)
    feats = torch.eye(4)
    coords = torch.tensor([[0.0, 0.0], [512.0, 0.0], [0.0, 512.0], [512.0, 512.0]])  # four 512-px tiles
    grid, pos = enc._cells(feats, coords)
    assert len(pos) == 4 and len({tuple(p) for p in pos.tolist()}) == 4
    torch.testing.assert_close(grid.sum(0), feats.sum(0))  # nothing summed away ...
    assert (grid != 0).sum(1).tolist() == [1, 1, 1, 1]  # ... and no two tiles share a token
    # the authors' level-0 mode keeps their 1024-px cell (512 px at 0.5 mpp on a 40x slide)
    level0 = model_config(_titan_workflow_cfg("level0"), "modaltune", "REAL")["backbone"]["tile_size"]
    assert level0 == 1024 and grid_of(model_config(_titan_workflow_cfg("level0"), "modaltune", "REAL"))[1] == 1024
    # an explicit tile_size is the user's choice
    assert model_config(_titan_workflow_cfg("target", tile_size=300), "modaltune", "REAL")["backbone"]["tile_size"] == 300


def test_tile_size_for_longnet_matches_prov_gigapath():
    assert tile_size_for("longnet", "target", 256) == 256
    assert tile_size_for("longnet", "level0", 256) == 256
    assert tile_size_for("titan", "target", 512) == 512
    assert tile_size_for("titan", "level0", 512) == 1024


def test_slide_encoder_baselines_with_titan_backbone_get_titan_grid():
    cfg = _titan_workflow_cfg()
    cfg["models"]["gigapath_lp"]["backbone"] = {"type": "titan"}
    block = model_config(cfg, "gigapath_lp", "REAL")
    assert block["backbone"]["tile_size"] == 512 and grid_of(block)[1] == 512


def test_backbone_grid_reads_raw_blocks_against_the_encoder_type():
    assert backbone_grid("modaltune", {"backbone": {"type": "titan"}}) == (1000, 512)
    assert backbone_grid("modaltune", {}) == (1000, 256)
    assert backbone_grid("slide_encoder_lp", {"backbone": {"tile_size": 128}}) == (1000, 128)
    assert backbone_grid("late_fusion", {"slide_side": "slide_encoder",
                                         "slide": {"backbone": {"type": "titan"}}}) == (1000, 512)
    assert backbone_grid("abmil", {}) == (None, 256)
    # a resolved block gives what the encoder is built with
    block = model_config(_titan_workflow_cfg("level0"), "modaltune", "REAL")
    assert backbone_grid("modaltune", block) == grid_of(block) == (1000, 1024)


# ---------------------------------------------------------------------------------- issue 14: import tree
def _package_imports(path: Path, package: str) -> set[str]:
    import ast

    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods |= {a.name for a in node.names if a.name.startswith(package)}
    return mods


def test_models_import_graph_has_no_cycle():
    """Every import between modaltune.models modules (module- and function-level) forms a DAG."""
    import graphlib

    root = ROOT / "src/modaltune/models"
    graph = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(ROOT / "src").with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name] = {m for m in _package_imports(path, "modaltune.models") if m != name}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a cycle
    assert "modaltune.models.modaltune" not in graph["modaltune.models.titan"]
    assert "modaltune.models.modaltune" not in graph["modaltune.models.baselines.slide_encoder"]


def test_configs_module_is_torch_free():
    import subprocess
    import sys

    code = "import sys, modaltune.models.configs; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ,
                                                                  "PYTHONPATH": str(ROOT / "src")})


def test_training_max_patches_auto_follows_the_slide_encoder():
    """method 3.3: the authors subsample 25,000 patches for Prov-GigaPath and 15,000 for TITAN."""
    from modaltune.models.configs import train_max_patches

    assert train_max_patches("modaltune", {}, "auto") == 25000
    assert train_max_patches("modaltune", {"backbone": {"type": "titan"}}, "auto") == 15000
    assert train_max_patches("slide_encoder_tuned", {"backbone": {"type": "titan"}}, "auto") == 15000
    assert train_max_patches("late_fusion", {"slide_side": "slide_encoder",
                                             "slide": {"backbone": {"type": "titan"}}}, "auto") == 15000
    assert train_max_patches("abmil", {}, "auto") == 25000
    assert train_max_patches("modaltune", {"backbone": {"type": "titan"}}, 1234) == 1234  # a number wins
    assert train_max_patches("modaltune", {}, None) is None
    for ok in ("auto", None, 5):
        validate(_merged({"training": {"max_patches": ok}}), SCHEMA, set_default=False)
    with pytest.raises(WorkflowError):
        validate(_merged({"training": {"max_patches": "all"}}), SCHEMA, set_default=False)
