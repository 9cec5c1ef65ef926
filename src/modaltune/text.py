"""Per-fold text targets (method 1.7 and 3.1) and the frozen projector they go through in training.

Each patient gets the four label prompts of :mod:`modaltune.prompts`; a frozen text encoder of
:mod:`modaltune.encoders.text` turns them into the targets of the KL loss. Prompt survival bins are
fitted on the fold's training patients only (fixes bug 8 of the method notes). Text is a training
target only: inference never needs it. torch is imported lazily.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd

from modaltune import __version__
from modaltune.encoders.text import build_text_encoder
from modaltune.errors import InputError
from modaltune.io_utils import atomic_path
from modaltune.prompts import PROMPT_NAMES, label_prompts
from modaltune.survival_bins import N_PROMPT_BINS, prompt_bin_edges, prompt_bin_index
from modaltune.tables import read_cases, read_splits

log = logging.getLogger(__name__)

_CASE_FIELDS = ("patient_id", "primary_diagnosis", "stage", "t", "n", "m", "survival_months", "event")


def build_text_targets(
    cases_parquet,
    splits_parquet,
    fold: int,
    out_h5,
    *,
    cohort: str | None = None,
    encoder: str = "minilm",
    checkpoint=None,
    device: str = "auto",
    batch_size: int = 64,
) -> dict:
    """Prompts + frozen text embeddings of every patient for one fold -> ``text/fold_{k}.h5``.

    Prompt survival bins are fitted per site on that site's TRAINING patients of the fold (pan-cancer: each site
    its own bins and site name). Every patient of ``cases_parquet`` gets prompts (targets serve only the
    training/validation loss). The site of a patient is the ``site`` column, or ``cohort`` where that is
    missing. Writes datasets patient_id, embeddings (P,4,T) float32, prompts (P,4), site, partition,
    survival_bin and attrs encoder, bin_edges (1-D for one site, (S,5) with ``bin_sites`` otherwise),
    fold, text_dim; returns a summary dict.
    """
    import h5py

    t0 = time.perf_counter()
    fold = int(fold)
    cases = read_cases(cases_parquet, _CASE_FIELDS).reset_index(drop=True)
    rows = read_splits(splits_parquet, fold)
    partition = rows.drop_duplicates("patient_id").set_index("patient_id")["partition"].astype(str)
    unknown = sorted(set(partition.index) - set(cases["patient_id"]))
    if unknown:
        raise InputError(
            f"{splits_parquet}: fold {fold} lists patients missing from {cases_parquet}, e.g. {unknown[:5]}"
        )

    if "site" in cases.columns:
        sites = cases["site"].astype("string")
        if cohort is not None:
            sites = sites.fillna(str(cohort))
    else:
        sites = pd.Series([cohort] * len(cases), index=cases.index, dtype="string")
    if sites.isna().any():
        raise InputError(
            f"{cases_parquet}: no site column and no cohort given; pass cohort='BRCA' (or the code)"
        )
    sites = sites.str.upper()
    part = cases["patient_id"].map(partition).fillna("").to_numpy(str)
    is_train = part == "train"

    edges_by_site: dict[str, list[float] | None] = {}
    for code in sorted(sites.unique()):
        train_months = cases.loc[(sites == code).to_numpy() & is_train, "survival_months"]
        try:
            edges_by_site[code] = prompt_bin_edges(train_months)
        except InputError:
            log.warning(
                "site %s fold %d: no training patient with survival; survival fragments left empty",
                code,
                fold,
            )
            edges_by_site[code] = None

    prompts = []
    bins = np.full(len(cases), -1, dtype=np.int8)
    for i, (site, row) in enumerate(zip(sites, cases.to_dict("records"), strict=True)):
        edges = edges_by_site[site]
        prompts.append(label_prompts(row, edges, site))
        if edges is not None:
            bins[i] = prompt_bin_index([row["survival_months"]], edges)[0]
    flat = [p for four in prompts for p in four]
    unique, inverse = np.unique(np.asarray(flat, dtype=object), return_inverse=True)

    text_encoder = build_text_encoder(encoder, checkpoint=checkpoint, device=device)
    t_enc = time.perf_counter()
    unique_emb = text_encoder.encode(list(unique), batch_size=batch_size)
    encode_s = time.perf_counter() - t_enc
    embeddings = unique_emb[inverse].reshape(len(cases), len(PROMPT_NAMES), -1).astype(np.float32)

    site_codes = sorted(edges_by_site)
    edge_array = np.array(
        [
            edges_by_site[s] if edges_by_site[s] is not None else [np.nan] * (N_PROMPT_BINS + 1)
            for s in site_codes
        ],
        dtype=np.float64,
    )
    string = h5py.string_dtype("utf-8")
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("patient_id", data=cases["patient_id"].astype(str).to_numpy(object), dtype=string)
        h5.create_dataset("embeddings", data=embeddings)
        h5.create_dataset("prompts", data=np.asarray(prompts, dtype=object), dtype=string)
        h5.create_dataset("site", data=sites.to_numpy(object), dtype=string)
        h5.create_dataset("partition", data=part.astype(object), dtype=string)
        h5.create_dataset("survival_bin", data=bins)
        h5.attrs["encoder"] = encoder
        h5.attrs["encoder_checkpoint"] = str(text_encoder.checkpoint)
        h5.attrs["text_dim"] = int(embeddings.shape[2])
        h5.attrs["fold"] = fold
        h5.attrs["bin_edges"] = edge_array[0] if len(site_codes) == 1 else edge_array
        h5.attrs["bin_sites"] = json.dumps(site_codes)
        h5.attrs["prompt_names"] = json.dumps(list(PROMPT_NAMES))
        h5.attrs["modaltune_version"] = __version__
    summary = {
        "fold": fold,
        "n_patients": len(cases),
        "n_train": int(is_train.sum()),
        "n_unique_prompts": len(unique),
        "text_dim": int(embeddings.shape[2]),
        "encoder": encoder,
        "bin_edges": edges_by_site,
        "encode_s": round(encode_s, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    log.info("text targets fold %d: %s", fold, summary)
    return summary


def read_text_targets(path) -> dict:
    """Everything in a text/fold_{k}.h5 file as numpy arrays / python values (for checks and notebooks)."""
    import h5py

    with h5py.File(path, "r") as h5:
        out = {k: h5[k][()] for k in h5.keys()}
        for key in ("patient_id", "prompts", "site", "partition"):
            if key in out:
                out[key] = np.vectorize(lambda b: b.decode() if isinstance(b, bytes) else b, otypes=[object])(
                    out[key]
                )
        out["attrs"] = {k: h5.attrs[k] for k in h5.attrs}
    return out


# ---------------------------------------------------------------------------------------------
# Projector (method 3.1)


def make_text_projector(in_dim: int, out_dim: int = 256, seed: int = 0):
    """Frozen random projection of text embeddings: Linear -> LayerNorm -> ReLU -> Linear.

    Equivalent to the authors' Conv2d 1x1 -> LayerNorm([C,1,1]) -> ReLU -> Conv2d 1x1 (same default init,
    same RNG draws). PyTorch default init under a forked RNG seeded by ``seed``, so the global RNG is left
    untouched; never trained (requires_grad False), eval mode.
    """
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        projector = nn.Sequential(
            nn.Linear(int(in_dim), int(out_dim)),
            nn.LayerNorm(int(out_dim)),
            nn.ReLU(),
            nn.Linear(int(out_dim), int(out_dim)),
        )
    for param in projector.parameters():
        param.requires_grad_(False)
    return projector.eval()
