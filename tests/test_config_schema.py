"""Schema equals code: every config block's keys and defaults are exactly the ones the code uses.

For each block with code defaults the test compares the schema's properties (and their ``default``)
with what the code reads: the keyword arguments of the stage function the rule calls, or the defaults
dict of the trainer / the probes. A key present on one side only, or a different default, fails.
Arguments that never come from the config (inputs, hooks) are listed per block with the reason.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "config/schemas/config.schema.yaml").read_text())

# block -> (module, function or dict name, arguments that are not config keys)
CODE = {
    "tiling": ("modaltune.tiling", "tile_slide", {"slide_id", "mpp_override", "qc_png"}),  # per-slide inputs
    "embedding": ("modaltune.embedding", "embed_slide", {"progress", "reader_factory"}),  # console / test hooks
    "genomics": ("modaltune.genomics", "build_pathways", {"patients"}),  # from the cohort sheet
    "splits": ("modaltune.splits", "make_splits", {"sheet", "summary_path"}),  # rule input / output
    "text": ("modaltune.text", "build_text_targets", {"cohort"}),  # the cases' site column
    "training": ("modaltune.training", "TRAIN_DEFAULTS", set()),
    "probes": ("modaltune.probes", "PROBE_DEFAULTS", set()),
}


def code_defaults(block: str) -> dict:
    module, name, not_config = CODE[block]
    obj = getattr(importlib.import_module(module), name)
    if block == "embedding":  # the stage reads source/import_* itself and passes the rest to embed_slide
        from modaltune.feature_import import IMPORT_DEFAULTS

        return {**code_defaults_of(obj, not_config), **IMPORT_DEFAULTS}
    return code_defaults_of(obj, not_config)


def code_defaults_of(obj, not_config) -> dict:
    if isinstance(obj, dict):
        return {k: v for k, v in obj.items() if k not in not_config}
    params = inspect.signature(obj).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and p.name not in not_config}


def _same(schema_prop: dict, schema_default, code_default) -> bool:
    # an object-valued setting defaults to {} in the schema and to None ("none given") in a signature
    if schema_prop.get("type") == "object" and code_default is None:
        code_default = {}
    if isinstance(schema_default, float) or isinstance(code_default, float):
        return code_default is not None and schema_default is not None and \
            abs(float(schema_default) - float(code_default)) < 1e-12
    return schema_default == code_default


@pytest.mark.parametrize("block", sorted(CODE))
def test_schema_block_equals_code_defaults(block):
    props = SCHEMA["properties"][block]["properties"]
    assert SCHEMA["properties"][block].get("additionalProperties") is False, f"{block}: schema not strict"
    code = code_defaults(block)
    only_schema = sorted(set(props) - set(code))
    only_code = sorted(set(code) - set(props))
    assert not only_code, f"{block}: the code reads {only_code} but the schema does not allow them"
    assert not only_schema, f"{block}: the schema allows {only_schema} but the code never reads them"
    no_default = sorted(k for k in props if "default" not in props[k])
    assert not no_default, f"{block}: schema keys without a default: {no_default}"
    differ = {k: (props[k]["default"], code[k]) for k in props if not _same(props[k], props[k]["default"], code[k])}
    assert not differ, f"{block}: schema default != code default (schema, code): {differ}"


def test_the_walk_catches_a_difference():
    """The comparison itself: a changed default or an extra key is reported."""
    props = SCHEMA["properties"]["tiling"]["properties"]
    code = code_defaults("tiling")
    assert _same(props["min_tissue"], props["min_tissue"]["default"], code["min_tissue"])
    assert not _same(props["min_tissue"], 0.5, code["min_tissue"])
    assert not _same({"type": "string"}, "lab", "otsu")
    assert set(code) == set(props)


def test_speed_only_settings_are_schema_keys_and_stay_out_of_params():
    from modaltune.settings import SPEED_ONLY, job_settings, result_settings

    for block, keys in SPEED_ONLY.items():
        assert set(keys) <= set(SCHEMA["properties"][block]["properties"]), block
    config = {"embedding": {"precision": "bf16", "device": "cuda", "encoder": "tiny", "batch_size": 512}}
    params = result_settings(config, "embedding")
    assert params == {"encoder": "tiny", "precision": "bf16"} and list(params) == ["encoder", "precision"]
    reordered = {"embedding": dict(reversed(list(config["embedding"].items())))}
    assert repr(result_settings(reordered, "embedding")) == repr(params)  # Snakemake compares the text
    full = job_settings(params, config, "embedding")
    assert full == config["embedding"]
    assert job_settings({"device": "cpu"}, config, "embedding")["device"] == "cpu"  # params win
