"""Dilated attention (LongNet) as in Prov-GigaPath's vendored torchscale, in plain PyTorch.

Each branch ``(segment, ratio)`` cuts the sequence into segments of ``min(segment, N)`` tokens,
keeps every ``ratio``-th token inside a segment (head group ``g`` starts at offset ``g``), attends
within that sparse set, and scatters the result back. Branches are merged by a softmax over their
per-position log-sum-exp (LSE); positions a branch does not cover get LSE -1e8.

Published quirks reproduced on purpose (they change the numbers):
* zero padding (to a multiple of the segment, then of the ratio) is added *after* the q/k/v
  projections and is not masked: padded keys score 0 and carry value 0;
* the branch weights are computed without gradient (the reference computes them under
  ``torch.no_grad()``), so gradients flow only through each branch's output.

Three interchangeable kernels compute one branch's (output, LSE); ``dilated_attention`` selects one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Published Prov-GigaPath geometry (max_wsi_size 262144, tile 256): 2**linspace(10, 20, 5), truncated.
from modaltune.models.configs import GIGAPATH_DILATED_RATIOS, GIGAPATH_SEGMENT_LENGTHS

UNCOVERED_LSE = -1e8

BACKENDS = ("auto", "reference", "cpu_flash", "cuda_efficient", "flash_attn")


def _pad_len(n: int, multiple: int) -> int:
    return (-n) % multiple


def _branch_index(n_heads: int, seg: int, ratio: int, device) -> tuple[Tensor, int]:
    """Per-head token index inside a (ratio-padded) segment: head h of group g reads l*ratio + g."""
    heads_per_group = math.ceil(n_heads / ratio)  # head padding to a multiple of ratio, as published
    length = math.ceil(seg / ratio)
    group = torch.arange(n_heads, device=device) // heads_per_group
    idx = torch.arange(length, device=device).unsqueeze(1) * ratio + group.unsqueeze(0)  # (L, H)
    return idx, length


def _sdpa_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(…, L, d) -> output (…, L, d), LSE (…, L); plain matmul, works in float64."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v)
    return out, lse


def _sdpa_cpu_flash(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    # Public SDPA hides the LSE; this aten op (PyTorch's CPU flash kernel) returns it and has a backward.
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    return out, lse


def _sdpa_cuda_efficient(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, False, scale=scale
    )[:2]
    return out, lse[..., : q.shape[-2]]  # the kernel pads the LSE length to a multiple of 32


def _sdpa_flash_attn(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    from flash_attn import flash_attn_func  # optional; only on CUDA builds that ship it

    dtype = q.dtype
    half = torch.bfloat16 if dtype == torch.float32 else dtype
    out, lse, _ = flash_attn_func(
        q.transpose(1, 2).to(half), k.transpose(1, 2).to(half), v.transpose(1, 2).to(half),
        softmax_scale=scale, return_attn_probs=True,
    )
    return out.transpose(1, 2).to(dtype), lse[..., : q.shape[-2]].float()


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: torch.device, dtype: torch.dtype, backend: str = "auto") -> str:
    """Resolve ``"auto"``: CPU -> cpu_flash (reference for float64); CUDA -> flash_attn if importable
    and half precision, else the memory-efficient kernel (reference for float64)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if dtype == torch.float64:
        return "reference"
    if device.type == "cuda":
        if dtype in (torch.float16, torch.bfloat16) and _flash_attn_available():
            return "flash_attn"
        return "cuda_efficient"
    return "cpu_flash" if device.type == "cpu" else "reference"


_KERNELS = {
    "reference": _sdpa_reference,
    "cpu_flash": _sdpa_cpu_flash,
    "cuda_efficient": _sdpa_cuda_efficient,
    "flash_attn": _sdpa_flash_attn,
}


def _one_branch(q: Tensor, k: Tensor, v: Tensor, seg: int, ratio: int, kernel) -> tuple[Tensor, Tensor]:
    """q, k, v: (B, N, H, d) -> dense output (B, N, H, d) and LSE (B, N, H)."""
    bsz, n, n_heads, d = q.shape
    seg = min(seg, n)
    n_seg = math.ceil(n / seg)
    idx, length = _branch_index(n_heads, seg, ratio, q.device)
    seg_padded = length * ratio

    # Advanced indexing (not torch.gather): its backward keeps only the indices, not the padded input.
    pos_idx = idx.t()  # (H, L)
    head_idx = torch.arange(n_heads, device=q.device).unsqueeze(1)  # (H, 1)

    def gather(x: Tensor) -> Tensor:
        x = F.pad(x, (0, 0, 0, 0, 0, n_seg * seg - n))  # sequence -> multiple of the segment
        x = x.view(bsz, n_seg, seg, n_heads, d)
        x = F.pad(x, (0, 0, 0, 0, 0, seg_padded - seg))  # segment -> multiple of the ratio
        return x[:, :, pos_idx, head_idx].reshape(bsz * n_seg, n_heads, length, d)  # (B*S, H, L, d)

    scale = d**-0.5
    out, lse = kernel(gather(q), gather(k), gather(v), scale)
    lse = lse.detach()  # only feeds the no-grad branch weights
    if lse.dtype in (torch.float16, torch.bfloat16):
        lse = lse.float()
    dense = out.new_zeros(bsz, n_seg, seg_padded, n_heads, d)
    dense[:, :, pos_idx, head_idx] = out.reshape(bsz, n_seg, n_heads, length, d)
    dense_lse = lse.new_full((bsz, n_seg, seg_padded, n_heads), UNCOVERED_LSE)
    dense_lse[:, :, pos_idx, head_idx] = lse.reshape(bsz, n_seg, n_heads, length)
    dense = dense[:, :, :seg].reshape(bsz, n_seg * seg, n_heads, d)[:, :n]
    dense_lse = dense_lse[:, :, :seg].reshape(bsz, n_seg * seg, n_heads)[:, :n]
    return dense, dense_lse


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int] = GIGAPATH_SEGMENT_LENGTHS,
    dilated_ratios: Sequence[int] = GIGAPATH_DILATED_RATIOS,
    backend: str = "auto",
) -> Tensor:
    """Multi-branch dilated self-attention of projected q, k, v of shape (B, N, H, d) -> (B, N, H, d).

    All B sequences are taken to be N tokens long (padding of unequal patients is handled by the
    caller, see ``longnet.DilatedSelfAttention``). ``backend``: one of ``BACKENDS``.
    """
    if len(segment_lengths) != len(dilated_ratios):
        raise ValueError(f"{len(segment_lengths)} segment lengths but {len(dilated_ratios)} dilation ratios")
    kernel = _KERNELS[select_backend(q.device, q.dtype, backend)]
    outs, lses = [], []
    for seg, ratio in zip(segment_lengths, dilated_ratios, strict=True):
        o, lse = _one_branch(q, k, v, int(seg), int(ratio), kernel)
        outs.append(o)
        lses.append(lse)
    with torch.no_grad():  # published: branch weights carry no gradient
        weights = torch.softmax(torch.stack(lses, dim=0), dim=0)
    out = outs[0] * weights[0].unsqueeze(-1).to(outs[0].dtype)
    for o, w in zip(outs[1:], weights[1:], strict=True):
        out = out + o * w.unsqueeze(-1).to(o.dtype)
    return out


def naive_dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilated_ratios: Sequence[int],
) -> Tensor:
    """Loop-per-head, loop-per-segment float64 restatement of the published algorithm (for tests).

    Written independently of ``_one_branch``: explicit padding, explicit index lists.
    """
    bsz, n, n_heads, d = q.shape
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(len(segment_lengths), bsz, n, n_heads, d, dtype=torch.float64)
    lse = torch.full((len(segment_lengths), bsz, n, n_heads), UNCOVERED_LSE, dtype=torch.float64)
    for br, (seg, ratio) in enumerate(zip(segment_lengths, dilated_ratios, strict=True)):
        seg = min(seg, n)
        n_seg = math.ceil(n / seg)
        seg_padded = math.ceil(seg / ratio) * ratio
        hg = math.ceil(n_heads / ratio)
        for b in range(bsz):
            for h in range(n_heads):
                offset = h // hg
                for s in range(n_seg):
                    # positions inside the zero-padded segment this head reads
                    local = list(range(offset, seg_padded, ratio))
                    glob = [s * seg + p if p < seg else -1 for p in local]
                    glob = [g if 0 <= g < n else -1 for g in glob]

                    def rows(x, glob=glob, b=b, h=h):
                        r = torch.zeros(len(glob), d, dtype=torch.float64)
                        for i, g in enumerate(glob):
                            if g >= 0:
                                r[i] = x[b, g, h]
                        return r

                    qs, ks, vs = rows(q), rows(k), rows(v)
                    scores = qs @ ks.T / math.sqrt(d)
                    ls = torch.logsumexp(scores, dim=-1)
                    os_ = torch.softmax(scores, dim=-1) @ vs
                    for i, g in enumerate(glob):
                        if g >= 0:
                            out[br, b, g, h] = os_[i]
                            lse[br, b, g, h] = ls[i]
    w = torch.softmax(lse, dim=0).unsqueeze(-1)
    return (out * w).sum(0)
