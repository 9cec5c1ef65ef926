"""Which config settings change results and which only change speed.

Rules pass only result-changing settings as ``params:`` (the profiles rerun jobs whose params
changed); speed-only settings reach the scripts through ``snakemake.config`` so that moving a run to a
GPU node (device, batch size, reader processes) does not mark every embedding and training job stale.

The choice, per block (documented in docs/ARCHITECTURE.md, "Params and speed settings"):

* ``embedding``: ``batch_size``, ``num_workers``, ``device``, ``channels_last`` are speed-only. Inference is per tile, so
  the batch size and the reader processes do not change a feature; the device changes features by
  floating-point noise only (same weights, same inputs). ``precision`` (fp32/bf16/fp16 autocast) and
  ``feature_dtype`` change the stored features: they are params. ``precision: auto`` resolves by device
  (bf16 on CUDA, fp32 on CPU); the features file records the precision actually used.
* ``tiling``: ``on_error`` only decides whether a bad slide stops the run or gets a failed record; the
  tiles of a good slide do not depend on it. Everything else (grid, mpp, tissue detection) is a param.
* ``text``: ``device`` and ``batch_size`` (frozen encoder inference): speed-only.
* ``training``: ``num_workers`` (DataLoader processes) and ``device``: speed-only. The training
  ``batch_size`` (patients per optimiser step) and ``precision`` change the optimisation: params.
"""

from __future__ import annotations

from collections.abc import Mapping

SPEED_ONLY: dict[str, tuple[str, ...]] = {
    "embedding": ("batch_size", "num_workers", "device", "channels_last"),
    "tiling": ("on_error",),
    "text": ("device", "batch_size"),
    "training": ("num_workers", "device"),
}


def result_settings(config: Mapping, block: str) -> dict:
    """The settings of ``config[block]`` that change results (what a rule passes as params), keys
    sorted: Snakemake compares params by their text, so key order must not depend on the config file."""
    speed = SPEED_ONLY.get(block, ())
    return {k: v for k, v in sorted(dict(config.get(block) or {}).items()) if k not in speed}


def result_config(config: Mapping) -> dict:
    """The whole config less its speed-only settings (what a run's fingerprint is made of)."""
    return {k: (result_settings(config, k) if k in SPEED_ONLY else v) for k, v in sorted(dict(config).items())}


def speed_settings(config: Mapping, block: str) -> dict:
    """The speed-only settings of ``config[block]`` (what a script reads from ``snakemake.config``)."""
    speed = SPEED_ONLY.get(block, ())
    return {k: v for k, v in dict(config.get(block) or {}).items() if k in speed}


def job_settings(params: Mapping, config: Mapping, block: str) -> dict:
    """A job's full settings: the rule's result-changing ``params`` plus the speed-only ones of
    ``config`` (params win, so a param can never be overridden by a speed setting)."""
    return {**speed_settings(config, block), **dict(params)}


__all__ = ["SPEED_ONLY", "job_settings", "result_config", "result_settings", "speed_settings"]
