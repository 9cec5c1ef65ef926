"""Pathway-grouped RNA encoders: per-pathway self-normalising towers and the Gene Mixer.

``PathwayTowers`` turns a patient's z-scored gene vector into one token per pathway (method 2.2, step 1).
The reference code runs one small ``nn.Linear`` tower per pathway in a Python loop with batch size 1;
here all towers run at once over patients and pathways while storing exactly the parameters of the
per-pathway layers, so parameter counts and state sizes match the paper's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from modaltune.errors import InputError


class SNNBlock(nn.Sequential):
    """Self-normalising block (Klambauer et al. 2017): Linear + ELU + AlphaDropout."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.25):
        super().__init__(nn.Linear(in_dim, out_dim), nn.ELU(), nn.AlphaDropout(p=dropout))


def _check_groups(pathway_groups: list[list[int]]) -> list[list[int]]:
    groups = [list(map(int, g)) for g in pathway_groups]
    if not groups:
        raise InputError(
            "ModelDims.pathway_groups is empty: the gene encoder needs at least one pathway; check "
            "genomics/pathways.parquet metadata 'modaltune.groups' (rerun rule rna_pathways)"
        )
    for i, g in enumerate(groups):
        if not g:
            raise InputError(
                f"ModelDims.pathway_groups[{i}] has no genes: drop empty pathways when building "
                "genomics/pathways.parquet (rule rna_pathways)"
            )
        if min(g) < 0:
            raise InputError(f"ModelDims.pathway_groups[{i}] holds a negative gene index {min(g)}")
    return groups


class PathwayTowers(nn.Module):
    """One two-layer S-MLP tower per pathway, evaluated for all pathways in one batched einsum.

    Layer 1 of pathway ``i`` is ``Linear(n_i -> latent)``; its weights are kept in one flat parameter
    ``weight1`` of shape (sum n_i, latent) (row ``offset_i + j`` = gene ``j`` of pathway ``i``), so no
    padding is trainable. Layer 1 runs as a gather-multiply-``index_add`` over the memberships for small
    batches (cheapest at batch 1, ModalTune's setting) and otherwise as padded einsums over 8 buckets of
    similar-size pathways (pathway sizes range 1..199, so one padded tensor would be ~7x the real work).
    Layer 2 is ``Linear(latent -> latent)`` per pathway, stored as (P, latent, latent).
    forward(genes (B, G)) -> (B, P, latent).
    """

    n_buckets = 8
    scatter_max_elements = 2**24  # B * memberships * latent below this: use the scatter path

    def __init__(self, pathway_groups: list[list[int]], latent_dim: int = 256, dropout: float = 0.25):
        super().__init__()
        groups = _check_groups(pathway_groups)
        self.n_pathways = len(groups)
        self.latent_dim = latent_dim
        self.sizes = [len(g) for g in groups]
        self.max_index = max(max(g) for g in groups)
        max_n = max(self.sizes)
        n_members = sum(self.sizes)

        gather = torch.zeros(self.n_pathways, max_n, dtype=torch.long)
        valid = torch.zeros(self.n_pathways, max_n)
        flat_pos = torch.empty(n_members, dtype=torch.long)  # position of each stored row in the padded layout
        offset = 0
        for i, g in enumerate(groups):
            gather[i, : len(g)] = torch.tensor(g)
            valid[i, : len(g)] = 1.0
            flat_pos[offset : offset + len(g)] = i * max_n + torch.arange(len(g))
            offset += len(g)
        # Derived from the pathway groups, so not part of the state dict.
        self.register_buffer("gather_index", gather, persistent=False)
        self.register_buffer("valid", valid, persistent=False)
        self.register_buffer("flat_pos", flat_pos, persistent=False)
        self.register_buffer("member_gene", torch.tensor([j for g in groups for j in g]), persistent=False)
        self.register_buffer("member_path", torch.repeat_interleave(torch.arange(self.n_pathways),
                                                                    torch.tensor(self.sizes)), persistent=False)
        self._make_buckets(groups)
        self.register_buffer(
            "fan_in1", torch.repeat_interleave(torch.tensor(self.sizes, dtype=torch.float32),
                                               torch.tensor(self.sizes)), persistent=False
        )
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)

        self.weight1 = nn.Parameter(torch.empty(n_members, latent_dim))
        self.bias1 = nn.Parameter(torch.empty(self.n_pathways, latent_dim))
        self.weight2 = nn.Parameter(torch.empty(self.n_pathways, latent_dim, latent_dim))  # (P, in, out)
        self.bias2 = nn.Parameter(torch.empty(self.n_pathways, latent_dim))
        self.act = nn.ELU()
        self.drop1 = nn.AlphaDropout(p=dropout)
        self.drop2 = nn.AlphaDropout(p=dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """``std=None``: the default init of ``nn.Linear`` per pathway (uniform +-1/sqrt(fan_in));
        ``std=x``: truncated normal(0, x) weights and zero biases (ModalTune's init, method 2.4)."""
        if std is not None:
            for w in (self.weight1, self.weight2):
                nn.init.trunc_normal_(w, std=std)
            self.bias1.zero_()
            self.bias2.zero_()
            return
        bound1 = (1.0 / self.fan_in1.sqrt()).unsqueeze(1)
        self.weight1.uniform_(-1.0, 1.0).mul_(bound1)
        sizes = torch.tensor(self.sizes, dtype=torch.float32, device=self.bias1.device)
        self.bias1.uniform_(-1.0, 1.0).mul_((1.0 / sizes.sqrt()).unsqueeze(1))
        bound2 = 1.0 / math.sqrt(self.latent_dim)
        self.weight2.uniform_(-bound2, bound2)
        self.bias2.uniform_(-bound2, bound2)

    def _make_buckets(self, groups: list[list[int]]) -> None:
        order = sorted(range(self.n_pathways), key=lambda i: self.sizes[i])
        k = min(self.n_buckets, self.n_pathways)
        starts = [0] + [sum(self.sizes[: i]) for i in range(1, self.n_pathways + 1)]
        self._bucket_names = []
        for b in range(k):
            ids = order[b * len(order) // k : (b + 1) * len(order) // k]
            width = max(self.sizes[i] for i in ids)
            gene = torch.zeros(len(ids), width, dtype=torch.long)
            row = torch.zeros(len(ids), width, dtype=torch.long)  # row of weight1; padding reads row 0, masked
            valid = torch.zeros(len(ids), width)
            for j, i in enumerate(ids):
                n = self.sizes[i]
                gene[j, :n] = torch.tensor(groups[i])
                row[j, :n] = torch.arange(starts[i], starts[i] + n)
                valid[j, :n] = 1.0
            for name, t in (("ids", torch.tensor(ids)), ("gene", gene), ("row", row), ("valid", valid)):
                self.register_buffer(f"bucket{b}_{name}", t, persistent=False)
            self._bucket_names.append(f"bucket{b}_")

    def _layer1_scatter(self, genes: Tensor) -> Tensor:
        prod = genes[:, self.member_gene].unsqueeze(-1) * self.weight1  # (B, memberships, latent)
        out = genes.new_zeros(genes.shape[0], self.n_pathways, self.latent_dim)
        return out.index_add(1, self.member_path, prod)

    def _layer1_buckets(self, genes: Tensor) -> Tensor:
        out = genes.new_zeros(genes.shape[0], self.n_pathways, self.latent_dim)
        for prefix in self._bucket_names:
            ids, gene, row, valid = (getattr(self, prefix + n) for n in ("ids", "gene", "row", "valid"))
            w = self.weight1[row] * valid.unsqueeze(-1)  # (k, width, latent), zero on padding
            out = out.index_copy(1, ids, torch.einsum("bkn,knl->bkl", genes[:, gene] * valid, w))
        return out

    def layer1(self, genes: Tensor) -> Tensor:
        """First linear layer of every tower, without bias: (B, G) -> (B, P, latent)."""
        if genes.shape[0] * self.weight1.numel() <= self.scatter_max_elements:
            return self._layer1_scatter(genes)
        return self._layer1_buckets(genes)

    def padded_weight1(self) -> Tensor:
        """Layer-1 weights in the padded (P, max_n, latent) layout, zeros where a pathway has no gene."""
        max_n = self.gather_index.shape[1]
        flat = self.weight1.new_zeros(self.n_pathways * max_n, self.latent_dim)
        flat = flat.index_copy(0, self.flat_pos, self.weight1)
        return flat.view(self.n_pathways, max_n, self.latent_dim)

    def linear_layers(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Pathway ``i``'s weights in ``nn.Linear`` layout: (W1 (latent, n_i), b1, W2 (latent, latent), b2)."""
        w1 = self.weight1[self.offsets[i] : self.offsets[i + 1]].t()
        return w1, self.bias1[i], self.weight2[i].t(), self.bias2[i]

    def forward(self, genes: Tensor) -> Tensor:
        if genes.dim() != 2 or genes.shape[1] <= self.max_index:
            raise InputError(
                f"batch['genes'] has shape {tuple(genes.shape)} but the pathway groups index gene "
                f"{self.max_index}; expected (B, G) with G > {self.max_index} (same gene table as training)"
            )
        h = self.layer1(genes) + self.bias1
        h = self.drop1(self.act(h))
        h = torch.einsum("bpl,plk->bpk", h, self.weight2) + self.bias2
        return self.drop2(self.act(h))


class PreNormResidual(nn.Module):
    """x + fn(LayerNorm(x))."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(self.norm(x))


def _token_mixing(n_tokens: int, hidden: int, dropout: float) -> nn.Sequential:
    # Conv1d with kernel 1 over the token axis (tokens = channels), as in the reference Gene Mixer.
    return nn.Sequential(
        nn.Conv1d(n_tokens, hidden, kernel_size=1), nn.GELU(), nn.Dropout(dropout),
        nn.Conv1d(hidden, n_tokens, kernel_size=1), nn.Dropout(dropout),
    )


def _channel_mixing(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
    )


class GeneMixerEncoder(nn.Module):
    """Pathway towers -> MLP-Mixer over pathway tokens -> LN -> Linear(latent->out_dim) [-> token compression].

    forward(genes (B, G)) -> (B, final_groups, out_dim), or (B, P, out_dim) when ``final_groups`` is None.
    """

    def __init__(
        self,
        pathway_groups: list[list[int]],
        latent_dim: int = 256,
        depth: int = 3,
        token_expansion: float = 0.5,
        channel_expansion: float = 0.5,
        dropout: float = 0.25,
        out_dim: int = 768,
        final_groups: int | None = 64,
    ):
        super().__init__()
        self.towers = PathwayTowers(pathway_groups, latent_dim=latent_dim, dropout=dropout)
        n_tok = self.towers.n_pathways
        token_hidden = int(n_tok * token_expansion)
        channel_hidden = int(latent_dim * channel_expansion)
        if token_hidden < 1 or channel_hidden < 1:
            raise InputError(
                f"gene mixer config: token_expansion={token_expansion} x {n_tok} pathways and "
                f"channel_expansion={channel_expansion} x latent_dim={latent_dim} must both give >= 1 unit"
            )
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers.append(PreNormResidual(latent_dim, _token_mixing(n_tok, token_hidden, dropout)))
            layers.append(PreNormResidual(latent_dim, _channel_mixing(latent_dim, channel_hidden, dropout)))
        self.mixer = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(latent_dim)
        self.proj = nn.Linear(latent_dim, out_dim)
        self.compression = nn.Linear(n_tok, final_groups) if final_groups else None
        self.out_dim = out_dim
        self.n_tokens = final_groups if final_groups else n_tok

    def forward(self, genes: Tensor) -> Tensor:
        x = self.proj(self.norm(self.mixer(self.towers(genes))))  # (B, P, out_dim)
        if self.compression is not None:
            x = self.compression(x.transpose(1, 2)).transpose(1, 2)  # mix along the token axis
        return x
