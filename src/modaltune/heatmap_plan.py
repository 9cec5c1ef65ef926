"""Which heatmaps the DAG draws, decided at DAG-build time from config and cohort sheets only.

Torch-free (rules/heatmaps_common.smk imports it while Snakemake parses the workflow); the drawing
itself is modaltune.heatmaps.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pandas as pd

from modaltune.errors import InputError

# ------------------------------------------------------------------------------------------ DAG planning
# Architectures with tile scores / pathway tokens (checked at DAG-build time from the config alone).
TILE_ARCHS = ("abmil", "transmil", "mcat", "survpath", "modaltune", "late_fusion")
PATHWAY_ARCHS = ("modaltune", "mcat", "survpath")


def heatmap_plan(config: dict, sheets: dict[str, pd.DataFrame], models: Sequence[str], seeds: Sequence[int],
                 folds: Sequence[int], targets: Sequence[str] | None = None) -> dict:
    """What rules/heatmaps.smk draws, decided from config and cohort sheets only (no run results).

    ``sheets``: every site cohort's sheet (slide ids are checked against all of them); ``targets``: the
    cohorts to draw for (default: all of ``sheets``). Pan-cancer cohorts are not drawn (their runs join
    several sheets); a config whose targets are all pan-cancer draws nothing.

    Returns {"models", "attribution_models", "seed", "fold", "slides": {cohort: [slide ids]},
    "risk": {"high": k, "low": k}}. Raises InputError naming the config key when a selection is invalid.
    """
    hm = dict(config.get("heatmaps") or {})
    seed, fold = int(hm.get("seed", 0)), int(hm.get("fold", 0))
    chosen = list(hm.get("models", []))
    attribution = list((hm.get("attribution") or {}).get("models", []))
    for key, names, archs in (("heatmaps.models", chosen, TILE_ARCHS),
                              ("heatmaps.attribution.models", attribution, PATHWAY_ARCHS)):
        # A model that is not trained in this config (the defaults name the demo's models) is skipped.
        skipped = [m for m in names if m not in models]
        if skipped:
            warnings.warn(f"config {key}: {skipped} not in run.models, no heatmaps/attribution for them",
                          stacklevel=2)
        names[:] = [m for m in names if m in models]
        for m in names:
            arch = config["models"][m].get("arch", m)
            if arch not in archs:
                raise InputError(f"config {key}: model {m!r} (arch {arch}) has no "
                                 f"{'tile scores' if archs is TILE_ARCHS else 'pathway tokens'}; "
                                 f"choose models with arch in {list(archs)}")
    if (chosen or attribution) and seed not in [int(s) for s in seeds]:
        raise InputError(f"config heatmaps.seed={seed} is not among seeds {list(seeds)}")
    if (chosen or attribution) and fold not in [int(f) for f in folds]:
        raise InputError(f"config heatmaps.fold={fold}: the split scheme has folds {list(folds)}")
    wanted = [str(s) for s in hm.get("slides", [])]
    known = {s for sh in sheets.values() for s in sh.index}
    unknown = sorted(set(wanted) - known)
    targets = [c for c in (sheets if targets is None else targets) if c in sheets]
    slides = {c: [s for s in wanted if s in sheets[c].index] for c in targets}
    if unknown and chosen:
        raise InputError(f"config heatmaps.slides: {unknown[:5]} are in no cohort sheet of {sorted(sheets)}; "
                         "use slide_id values of the cohort sheet")
    return {"models": chosen if chosen else [], "attribution_models": attribution, "seed": seed, "fold": fold,
            "slides": slides if chosen else {c: [] for c in targets},
            "risk": {"high": int(hm.get("risk_high", 0)) if chosen else 0,
                     "low": int(hm.get("risk_low", 0)) if chosen else 0}}
