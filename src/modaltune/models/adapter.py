"""Modal Adapter (method 2.3): ViT-Adapter-style cross-attention between image tokens and modal tokens.

Attention runs in a compressed width ``attn_dim`` (768 * 0.25 = 192, 12 heads of 16) with 768-d keys
and values. Two switches reproduce or fix the authors' behaviour (method 6, bugs 2-3):

* ``double_residual`` (config default False = fixed; True = the authors' code): the pre-norm
  cross-attention already returns ``tgt + attn``, and the callers add the residual again, so the
  Injector computes ``x + gamma * (x + attn)`` and the Extractor ``2c + attn``. False = the single
  residual the authors' docstring describes (``x + gamma * attn``, ``c + attn``).
* ``frozen_dropout`` lives on the model (``modaltune.ModalTune``).
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import Tensor, nn

DEFAULT_INTERACTION_INDEXES = ((0, 3), (4, 7), (8, 11))


class CrossAttn(nn.Module):
    """Pre-norm cross-attention: Wo(MHA(Wq(LN_q(tgt) + query_pos), LN_kv(mem) + key_pos)), + tgt if double."""

    def __init__(self, dim: int = 768, num_heads: int = 12, attn_dim: int = 192, double_residual: bool = False):
        super().__init__()
        self.double_residual = double_residual
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, attn_dim)
        self.attn = nn.MultiheadAttention(attn_dim, num_heads, kdim=dim, vdim=dim, batch_first=True)
        self.out_proj = nn.Linear(attn_dim, dim)

    def forward(
        self,
        tgt: Tensor,
        mem: Tensor,
        query_pos: Tensor | None = None,
        key_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        a, _ = self._attend(tgt, mem, query_pos, key_pos, key_padding_mask, need_weights=False)
        out = self.out_proj(a)
        return tgt + out if self.double_residual else out

    def _attend(self, tgt, mem, query_pos, key_pos, key_padding_mask, need_weights: bool):
        """The cross-attention itself: (output, head-averaged weights or None)."""
        t = self.norm_q(tgt)
        m = self.norm_kv(mem)
        q = self.q_proj(t if query_pos is None else t + query_pos)
        k = m if key_pos is None else m + key_pos
        return self.attn(q, k, m if key_pos is None else k, key_padding_mask=key_padding_mask,
                         need_weights=need_weights, average_attn_weights=True)

    def attention_weights(
        self,
        tgt: Tensor,
        mem: Tensor,
        query_pos: Tensor | None = None,
        key_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """(B, L_tgt, L_mem) softmax weights of this cross-attention (mean over heads), same inputs as
        ``forward``; used for tile heatmaps (each modal token's attention onto the image tokens)."""
        return self._attend(tgt, mem, query_pos, key_pos, key_padding_mask, need_weights=True)[1]


class PromptSelfAttention(nn.Module):
    """Pre-norm self-attention over the modal tokens (q = k = LN(c) + pos, v = LN(c)); single residual."""

    def __init__(self, dim: int = 768, num_heads: int = 12, attn_dim: int = 192):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, attn_dim)
        self.attn = nn.MultiheadAttention(attn_dim, num_heads, kdim=dim, vdim=dim, batch_first=True)
        self.out_proj = nn.Linear(attn_dim, dim)

    def forward(self, c: Tensor, pos: Tensor) -> Tensor:
        t = self.norm(c)
        a, _ = self.attn(self.q_proj(t + pos), t + pos, t, need_weights=False)
        return c + self.out_proj(a)


class Injector(nn.Module):
    """Modal -> image: x + gamma * CrossAttn(x, c, key_pos=pos); gamma starts at 0 (encoder untouched)."""

    def __init__(self, dim: int, num_heads: int, attn_dim: int, double_residual: bool = False):
        super().__init__()
        self.cross = CrossAttn(dim, num_heads, attn_dim, double_residual)
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, c: Tensor, pos: Tensor) -> Tensor:
        return x + self.gamma * self.cross(x, c, key_pos=pos)


class Extractor(nn.Module):
    """Image -> modal: c + CrossAttn(c, x, query_pos=pos), then c + DropPath(FFN(c)) (LN, 768->192->768)."""

    def __init__(self, dim: int, num_heads: int, attn_dim: int, cffn_ratio: float = 0.25,
                 drop_path: float = 0.0, double_residual: bool = False):
        super().__init__()
        self.cross = CrossAttn(dim, num_heads, attn_dim, double_residual)
        hidden = int(dim * cffn_ratio)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, c: Tensor, x: Tensor, pos: Tensor, x_padding_mask: Tensor | None = None) -> Tensor:
        c = c + self.cross(c, x, query_pos=pos, key_padding_mask=x_padding_mask)
        return c + self.drop_path(self.ffn(self.ffn_norm(c)))


class InteractionBlock(nn.Module):
    """One injector, one extractor, and ``n_extra`` further extractors (2 in the last block)."""

    def __init__(self, dim: int, num_heads: int, attn_dim: int, cffn_ratio: float, drop_path: float,
                 double_residual: bool, n_extra: int = 0):
        super().__init__()
        self.injector = Injector(dim, num_heads, attn_dim, double_residual)
        self.extractor = Extractor(dim, num_heads, attn_dim, cffn_ratio, drop_path, double_residual)
        self.extra_extractors = nn.ModuleList(
            Extractor(dim, num_heads, attn_dim, cffn_ratio, drop_path, double_residual) for _ in range(n_extra)
        )

    def extract(self, c: Tensor, x: Tensor, pos: Tensor, x_padding_mask: Tensor | None) -> Tensor:
        c = self.extractor(c, x, pos, x_padding_mask)
        for ex in self.extra_extractors:
            c = ex(c, x, pos, x_padding_mask)
        return c


class ModalAdapter(nn.Module):
    """Interaction blocks + prompt self-attention ([Identity, SA, SA]) + the modal positional table ``gene_pe``.

    The frozen encoder is driven by the caller (``ModalTune``); this module owns only trainable parts.
    """

    def __init__(
        self,
        dim: int = 768,
        n_modal_tokens: int = 65,
        num_heads: int = 12,
        cffn_ratio: float = 0.25,
        drop_path: float = 0.1,
        interaction_indexes=DEFAULT_INTERACTION_INDEXES,
        double_residual: bool = False,
        use_prompt_sa: bool = True,
    ):
        super().__init__()
        attn_dim = int(dim * cffn_ratio)
        self.interaction_indexes = [tuple(map(int, ab)) for ab in interaction_indexes]
        n = len(self.interaction_indexes)
        self.blocks = nn.ModuleList(
            InteractionBlock(dim, num_heads, attn_dim, cffn_ratio, drop_path, double_residual,
                             n_extra=2 if i == n - 1 else 0)
            for i in range(n)
        )
        self.prompt_sa = nn.ModuleList(
            PromptSelfAttention(dim, num_heads, attn_dim) if (use_prompt_sa and i > 0) else nn.Identity()
            for i in range(n)
        )
        self.gene_pe = nn.Parameter(torch.zeros(1, n_modal_tokens, dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        init_linear_ln(self)
        for m in self.modules():
            if isinstance(m, (CrossAttn, PromptSelfAttention)):
                for p in m.parameters():
                    if p.dim() >= 2:
                        nn.init.xavier_uniform_(p)
        for blk in self.blocks:
            nn.init.zeros_(blk.injector.gamma)
        nn.init.trunc_normal_(self.gene_pe, std=0.02)

    def prompt_step(self, i: int, c: Tensor) -> Tensor:
        sa = self.prompt_sa[i]
        return c if isinstance(sa, nn.Identity) else sa(c, self.gene_pe)


@torch.no_grad()
def init_linear_ln(module: nn.Module) -> None:
    """Method 2.4: Linear trunc-normal(0.02) / bias 0, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
