"""Pieces shared by the baselines: objective handling, task heads, masked pooling, missing-modality slots."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from modaltune.errors import InputError
from modaltune.models.registry import ModelDims

SUPERVISED = ("classification", "survival")
# Keys every model block may carry that the builders themselves do not read.
_GENERIC_KEYS = {"arch", "objective", "training", "name", "description"}


def objective_of(cfg: dict, allowed: Iterable[str] = SUPERVISED, default: str = "classification") -> str:
    objective = cfg.get("objective", default)
    allowed = tuple(allowed)
    if objective not in allowed:
        raise InputError(
            f"model config: objective={objective!r} is not supported by arch {cfg.get('arch', '?')!r}; "
            f"set models.<name>.objective to one of {list(allowed)}"
        )
    return objective


def check_keys(cfg: dict, known: Iterable[str]) -> None:
    """InputError on config keys a builder does not read: a typo (``hiden: 32``) must not run with the
    default (the schema cannot know each architecture's keys, so the builder checks them)."""
    unknown = sorted(set(cfg) - set(known) - _GENERIC_KEYS)
    if unknown:
        raise InputError(
            f"model config for arch {cfg.get('arch', '?')!r}: unknown key(s) {unknown}; valid keys: "
            f"{sorted(set(known) | _GENERIC_KEYS)}; fix the key in the model's block under models:"
        )


def batch_tensor(batch: dict, key: str) -> Tensor:
    if key not in batch:
        raise InputError(
            f"model input: batch has no {key!r} (keys: {sorted(batch)}); build batches with "
            "modaltune.data.collate_patients"
        )
    return batch[key]


def patch_inputs(batch: dict) -> tuple[Tensor, Tensor]:
    """(features (B, N, D), patch_mask (B, N) bool)."""
    feats = batch_tensor(batch, "features")
    mask = batch.get("patch_mask")
    if mask is None:
        mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
    return feats, mask.to(torch.bool)


def gene_inputs(batch: dict) -> tuple[Tensor, Tensor]:
    """(genes (B, G), has_genes (B,) bool)."""
    genes = batch_tensor(batch, "genes")
    has = batch.get("has_genes")
    if has is None:
        has = torch.ones(genes.shape[0], dtype=torch.bool, device=genes.device)
    return genes, has.to(torch.bool)


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis restricted to ``mask``; rows with no True entry get all-zero weights."""
    # A finite fill (not -inf) keeps empty rows free of NaN in both passes; the product zeroes them.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * mask.to(scores.dtype)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x (B, N, E) over the True entries of mask (B, N); zeros for an empty row."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def safe_key_padding(mask: Tensor) -> Tensor:
    """``key_padding_mask`` (True = ignore) for nn.MultiheadAttention that never masks a whole row.

    A patient without patches would give NaN; its first (zero) slot is left visible instead and the
    caller replaces that patient's slide-side output by a learned missing embedding.
    """
    ignore = ~mask
    empty = ~mask.any(dim=1)
    if empty.any():
        ignore = ignore.clone()
        ignore[empty, 0] = False
    return ignore


class MissingSlot(nn.Module):
    """Learned stand-in for a missing modality: rows with ``present`` False get the learned value.

    ``shape`` is the per-patient shape, e.g. (E,) for an embedding or (P, E) for a token set.
    """

    def __init__(self, *shape: int):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(*shape))
        nn.init.normal_(self.value, std=0.02)

    def forward(self, x: Tensor, present: Tensor) -> Tensor:
        sel = present.view(-1, *([1] * (x.dim() - 1)))
        return torch.where(sel, x, self.value.to(x.dtype).expand_as(x))


class GatedAttentionPool(nn.Module):
    """Gated attention MIL pooling (Ilse et al. 2018): a_i = w^T (tanh(V h_i) * sigmoid(U h_i))."""

    def __init__(self, dim: int, attn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn_a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attn_b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attn_c = nn.Linear(attn_dim, 1)

    def forward(self, h: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """h (B, N, dim), mask (B, N) -> pooled (B, dim), weights (B, N)."""
        scores = self.attn_c(self.attn_a(h) * self.attn_b(h)).squeeze(-1)
        if mask is None:
            mask = torch.ones_like(scores, dtype=torch.bool)
        weights = masked_softmax(scores, mask)
        return torch.einsum("bn,bnd->bd", weights, h), weights


class TaskHead(nn.Module):
    """Linear (or small MLP) head: ``logits`` (B, n_classes) or raw per-bin ``hazards`` (B, n_bins)."""

    def __init__(self, embed_dim: int, objective: str, dims: ModelDims, hidden: int | None = None):
        super().__init__()
        self.key = "logits" if objective == "classification" else "hazards"
        n_out = dims.n_classes if objective == "classification" else dims.n_bins
        if n_out < 1:
            raise InputError(f"ModelDims: {'n_classes' if self.key == 'logits' else 'n_bins'} must be >= 1")
        if hidden:
            self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
        else:
            self.net = nn.Linear(embed_dim, n_out)

    def forward(self, embedding: Tensor) -> dict[str, Tensor]:
        return {self.key: self.net(embedding)}


class BaselineModel(nn.Module):
    """A model that maps a batch to one embedding per patient plus, if supervised, one task head.

    Subclasses set ``embed_dim`` and implement ``embed(batch) -> (B, embed_dim)``. With objective
    ``"none"`` there is no head (used for frozen linear-probe models and as a fusion branch).
    """

    embed_dim: int
    # Model facts read by the trainer and the evaluator: one embedding vector per patient.
    token_names: tuple[str, ...] = ("embedding",)
    text_prompt_index: tuple[int, ...] = (0,)

    def __init__(self, objective: str):
        super().__init__()
        self.objective = objective
        self.headline_tokens = {"subtype": "embedding", "survival": "embedding"}
        self.head: TaskHead | None = None

    def add_head(self, dims: ModelDims, hidden: int | None = None) -> None:
        if self.objective in SUPERVISED:
            self.head = TaskHead(self.embed_dim, self.objective, dims, hidden)

    def embed(self, batch: dict) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, Tensor]:
        emb = self.embed(batch)
        out = {"embedding": emb}
        if self.head is not None:
            out.update(self.head(emb))
        return out


def no_score_on_padding(scores: Tensor, mask: Tensor) -> Tensor:
    """Tile scores (B, N) with NaN on padded slots: a padded tile gets no score (contract C5)."""
    return scores.float().masked_fill(~mask.to(torch.bool), float("nan"))
