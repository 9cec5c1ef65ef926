"""TITAN vision encoder (method 2.1) as an optional frozen backbone behind the ModalTune backbone protocol.

Facts reproduced from the public TITAN ``VisionTransformer`` (``TitanConfig().vision_config``): width 768,
depth 6, 12 heads, MLP ratio 4, qkv bias, patch embedding ``Linear(768->768) + GELU``, CLS token, no
absolute positions but a 2-D ALiBi attention bias (``-slope_h * euclidean cell distance``, zero for the
CLS row/column), LayerNorm eps 1e-6, CoCa "parallel" attentional pooling (the 1-query contrastive pooler
gives the slide vector). Parameter names equal the checkpoint's ``vision_encoder.*`` keys with the prefix
removed, e.g. ``blocks.modules_list.{i}.attn.qkv``, ``attn_pool_contrastive.attn.in_proj_weight``.

Input preparation as published: coordinates shifted to their minimum and floor-divided by the patch
size at the coordinate scale (``tile_size``: 512 = one CONCH v1.5 tile in 0.5-mpp coordinates, our
default; the authors hard-code 1024 = the same tile at level 0 of 40x slides, method 6 bug 4), features of
patches in the same cell summed, empty cells dropped, tokens in row-major cell order. Configs and the
builder: ``modaltune.models.configs.titan_config`` / ``modaltune.models.backbones``.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from modaltune.errors import InputError

LN_EPS = 1e-6
CHECKPOINT_PREFIX = "vision_encoder."


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi head slopes (Press et al.), with the interleaving rule for non-powers of two."""
    if math.log2(n_heads).is_integer():
        p = 2 ** (-(2 ** -(math.log2(n_heads) - 3)))
        return [p * p**i for i in range(n_heads)]
    base = 2 ** math.floor(math.log2(n_heads))
    return alibi_slopes(base) + alibi_slopes(2 * base)[0::2][: n_heads - base]


class TitanAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        bsz, n, dim = x.shape
        q, k, v = self.qkv(x).view(bsz, n, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bsz, n, dim))


class TitanBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = TitanAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), bias))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _Blocks(nn.Module):
    # Holds the blocks under ``modules_list`` to match the checkpoint's key names.
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.modules_list = nn.ModuleList(blocks)


class AttentionalPooler(nn.Module):
    """CoCa attentional pooler: learned queries attend over LN(tokens)."""

    def __init__(self, dim: int, n_heads: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, dim))
        self.attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.ln_k = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        k = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, k, k, key_padding_mask=key_padding_mask, need_weights=False)
        return out


class TitanEncoder(nn.Module):
    """Frozen TITAN slide encoder implementing the backbone protocol (prepare / run_layer / image_vector)."""

    def __init__(
        self,
        in_chans: int = 768,
        embed_dim: int = 768,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        tile_size: int = 512,
        attn_pooler_heads: int = 8,
        attn_pooler_queries: int = 128,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.tile_size = tile_size
        self.patch_embed = nn.Sequential(nn.Linear(in_chans, embed_dim), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = _Blocks([TitanBlock(embed_dim, num_heads, mlp_ratio, rates[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.attn_pool = AttentionalPooler(embed_dim, attn_pooler_heads, attn_pooler_queries)  # unused downstream
        self.attn_pool_contrastive = AttentionalPooler(embed_dim, attn_pooler_heads, 1)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))
        self.register_buffer("slopes", torch.tensor(alibi_slopes(num_heads)), persistent=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

    @property
    def n_layers(self) -> int:
        return len(self.blocks.modules_list)

    def _cells(self, feats: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        """One patient's patches -> (summed features per occupied cell (L, C), cell positions (L, 2))."""
        cells = torch.div(coords - coords.min(0).values, self.tile_size, rounding_mode="floor").long()
        width = int(cells[:, 1].max()) + 1
        flat = cells[:, 0] * width + cells[:, 1]
        uniq, inv = torch.unique(flat, return_inverse=True)  # sorted = the published row-major order
        grid = feats.new_zeros(len(uniq), feats.shape[1]).index_add(0, inv, feats)
        keep = (grid != 0).any(1)  # published bg_mask: empty (all-zero) cells are dropped
        pos = torch.stack([uniq // width, uniq % width], 1)[keep]
        return grid[keep], pos

    def prepare(self, features: Tensor, coords: Tensor, patch_mask: Tensor | None = None) -> tuple[Tensor, dict]:
        bsz = features.shape[0]
        per = []
        for b in range(bsz):
            real = slice(None) if patch_mask is None else patch_mask[b]
            per.append(self._cells(features[b][real], coords[b][real]))
        length = max(len(p[1]) for p in per)
        if length == 0:
            raise InputError("batch['features']: a patient has only all-zero patch features (TITAN drops them)")
        dim_in = features.shape[-1]
        tokens = features.new_zeros(bsz, length, dim_in)
        token_mask = torch.zeros(bsz, length, dtype=torch.bool, device=features.device)
        bias = features.new_zeros(bsz, self.num_heads, length + 1, length + 1)
        for b, (grid, pos) in enumerate(per):
            m = len(pos)
            tokens[b, :m] = grid
            token_mask[b, :m] = True
            dist = torch.cdist(pos.double(), pos.double())
            bias[b, :, 1 : m + 1, 1 : m + 1] = (-dist.unsqueeze(0) * self.slopes.double().view(-1, 1, 1)).to(bias.dtype)
            bias[b, :, :, m + 1 :] = torch.finfo(bias.dtype).min  # padded keys
        x = self.patch_embed(tokens)
        x = torch.cat([self.cls_token.expand(bsz, -1, -1), x], dim=1)
        return x, {"bias": bias, "token_mask": token_mask}

    def run_layer(self, i: int, h: Tensor, ctx: dict) -> Tensor:
        return self.blocks.modules_list[i](h, ctx["bias"])

    def image_vector(self, h: Tensor, ctx: dict) -> Tensor:
        """Contrastive attentional pool of norm(cat(CLS, x)), before ``proj`` (as ModalTune uses it)."""
        pad = F.pad(~ctx["token_mask"], (1, 0), value=False)
        return self.attn_pool_contrastive(self.norm(h), key_padding_mask=pad)[:, 0]

    def forward(self, features: Tensor, coords: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        h, ctx = self.prepare(features, coords, patch_mask)
        for i in range(self.n_layers):
            h = self.run_layer(i, h, ctx)
        return self.image_vector(h, ctx)


def load_titan_checkpoint(model: TitanEncoder, path: str | os.PathLike) -> list[str]:
    """Load ``vision_encoder.*`` tensors from a TITAN ``model.safetensors`` (or a torch state dict file).

    Missing keys raise InputError naming them; other keys (text tower, ...) are ignored and returned.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"TITAN checkpoint {path} not found: download model.safetensors from the MahmoodLab/TITAN "
                         "Hugging Face repo and set backbone.checkpoint to its local path")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"TITAN checkpoint {path} cannot be read: {exc}") from exc
    if any(k.startswith(CHECKPOINT_PREFIX) for k in state):
        other = sorted(k for k in state if not k.startswith(CHECKPOINT_PREFIX))
        state = {k[len(CHECKPOINT_PREFIX):]: v for k, v in state.items() if k.startswith(CHECKPOINT_PREFIX)}
    else:
        other = []
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(f"TITAN checkpoint {path} lacks {len(missing)} vision-encoder keys, e.g. "
                         f"{[CHECKPOINT_PREFIX + k for k in missing[:10]]}")
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    return other + sorted(set(state) - set(expected))

