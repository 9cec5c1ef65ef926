"""Tests for the pathway towers and the Gene Mixer encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from modaltune.errors import InputError
from modaltune.models.gene_encoder import GeneMixerEncoder, PathwayTowers, SNNBlock


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: extra intra-op threads only add contention (and slow down badly on a busy 2-core box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_groups(n_genes: int, sizes: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(n_genes, size=s, replace=False).tolist()) for s in sizes]


def _paper_sizes() -> list[int]:
    """331 pathway sizes in 1..199 summing to 9,731 memberships (method 1.4)."""
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 60, size=331)
    sizes[0] = 199
    diff = 9731 - int(sizes.sum())
    i = 1
    while diff != 0:  # nudge sizes until the total matches, keeping every size in [1, 199]
        step = 1 if diff > 0 else -1
        if 1 <= sizes[i] + step <= 199:
            sizes[i] += step
            diff -= step
        i = i % 330 + 1
    assert sizes.sum() == 9731
    return sizes.tolist()


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_snn_block_layers():
    block = SNNBlock(5, 7, dropout=0.1)
    assert isinstance(block[0], nn.Linear) and isinstance(block[1], nn.ELU)
    assert isinstance(block[2], nn.AlphaDropout) and block[2].p == 0.1
    assert block(torch.randn(3, 5)).shape == (3, 7)


@pytest.mark.parametrize("path", ["scatter", "buckets"])
def test_towers_match_naive_per_pathway_loop(path):
    torch.manual_seed(0)
    groups = _random_groups(40, [1, 3, 7, 12, 5, 2, 9, 4, 4, 11, 1], seed=3)
    groups[2] = [0, 39, 5, 5 + 1, 17, 2, 33]  # unsorted and including gene 0 (the padding gather target)
    groups[5] = [3, 3 + 1]
    towers = PathwayTowers(groups, latent_dim=16, dropout=0.25).eval()
    towers.scatter_max_elements = 10**9 if path == "scatter" else 0
    genes = torch.randn(4, 40)
    out = towers(genes)
    assert out.shape == (4, 11, 16)
    x = genes[:, towers.gather_index] * towers.valid  # the padded-layout reference of layer 1
    torch.testing.assert_close(towers.layer1(genes), torch.einsum("bpn,pnl->bpl", x, towers.padded_weight1()),
                               rtol=1e-5, atol=1e-5)
    for i, g in enumerate(groups):
        w1, b1, w2, b2 = towers.linear_layers(i)
        lin1, lin2 = nn.Linear(len(g), 16), nn.Linear(16, 16)
        with torch.no_grad():
            lin1.weight.copy_(w1)
            lin1.bias.copy_(b1)
            lin2.weight.copy_(w2)
            lin2.bias.copy_(b2)
        ref = nn.functional.elu(lin2(nn.functional.elu(lin1(genes[:, g]))))
        torch.testing.assert_close(out[:, i], ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in towers.named_parameters()}
    towers.zero_grad()
    towers.scatter_max_elements = 0 if path == "scatter" else 10**9  # the other path: same gradients
    towers(genes).sum().backward()
    for n, p in towers.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5)


def test_towers_padding_holds_no_weight_and_genes_outside_groups_are_ignored():
    groups = [[0, 1], [2, 3, 4, 5]]
    towers = PathwayTowers(groups, latent_dim=8).eval()
    padded = towers.padded_weight1()
    assert padded.shape == (2, 4, 8)
    assert torch.all(padded[0, 2:] == 0)
    genes = torch.randn(3, 8)
    changed = genes.clone()
    changed[:, 6:] = 100.0  # genes 6, 7 belong to no pathway
    torch.testing.assert_close(towers(genes), towers(changed))


def test_towers_parameter_count_and_gradients():
    groups = _random_groups(30, [2, 9, 4])
    towers = PathwayTowers(groups, latent_dim=8)
    expected = sum(n * 8 + 8 for n in (2, 9, 4)) + 3 * (8 * 8 + 8)
    assert _n_params(towers) == expected
    towers(torch.randn(5, 30)).sum().backward()
    for name, p in towers.named_parameters():
        assert p.grad is not None and torch.all(torch.isfinite(p.grad)), name
        assert p.grad.abs().sum() > 0, name


def test_towers_default_init_matches_linear_bounds_and_trunc_normal_option():
    towers = PathwayTowers([[0], list(range(100))], latent_dim=32)
    w_small = towers.linear_layers(0)[0]
    w_big = towers.linear_layers(1)[0]
    assert w_small.abs().max() <= 1.0 and w_small.abs().max() > 0.3  # bound 1/sqrt(1)
    assert w_big.abs().max() <= 0.1 + 1e-6  # bound 1/sqrt(100)
    towers.reset_parameters(std=0.02)
    towers.requires_grad_(False)
    assert towers.bias1.abs().sum() == 0 and towers.bias2.abs().sum() == 0
    assert abs(towers.weight1.std().item() - 0.02) < 0.002 and abs(towers.weight2.std().item() - 0.02) < 0.002


def test_towers_bad_input_raise_input_error():
    with pytest.raises(InputError, match="pathway_groups"):
        PathwayTowers([])
    with pytest.raises(InputError, match=r"pathway_groups\[1\]"):
        PathwayTowers([[0, 1], []])
    towers = PathwayTowers([[0, 9]], latent_dim=4)
    with pytest.raises(InputError, match="genes"):
        towers(torch.randn(2, 5))


def test_gene_mixer_shapes_and_no_compression():
    groups = _random_groups(50, [3, 5, 8, 2, 6, 4])
    enc = GeneMixerEncoder(groups, latent_dim=16, depth=2, out_dim=24, final_groups=3)
    assert enc(torch.randn(2, 50)).shape == (2, 3, 24)
    enc2 = GeneMixerEncoder(groups, latent_dim=16, depth=2, out_dim=24, final_groups=None)
    assert enc2.compression is None
    assert enc2(torch.randn(2, 50)).shape == (2, 6, 24)


def test_gene_mixer_batched_equals_per_patient():
    torch.manual_seed(1)
    enc = GeneMixerEncoder(_random_groups(30, [4, 6, 3, 5]), latent_dim=8, depth=2, out_dim=12,
                           final_groups=2).eval()
    genes = torch.randn(5, 30)
    batched = enc(genes)
    single = torch.cat([enc(genes[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_gene_mixer_paper_parameter_counts():
    """Method 2.4: towers 24,353,024; mixer + output 727,898; compression 21,248; total 25,102,170."""
    sizes = _paper_sizes()
    groups, start = [], 0
    for n in sizes:  # genes may sit in several pathways; contiguous blocks suffice for counting
        groups.append(list(range(start % 4000, start % 4000 + n)))
        start += n
    enc = GeneMixerEncoder(groups, latent_dim=256, depth=3, token_expansion=0.5, channel_expansion=0.5,
                           dropout=0.25, out_dim=768, final_groups=64)
    towers = _n_params(enc.towers)
    compression = _n_params(enc.compression)
    mixer_out = _n_params(enc) - towers - compression
    assert towers == 24_353_024
    assert mixer_out == 727_898
    assert compression == 21_248
    assert _n_params(enc) == 25_102_170
    out = enc.eval()(torch.randn(2, 4200))
    assert out.shape == (2, 64, 768) and torch.isfinite(out).all()
