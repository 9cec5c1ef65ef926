"""Patch encoders: registry, published architectures and key layouts, strict loading, transforms."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from modaltune.encoders import available_encoders, build_encoder, register_encoder  # noqa: E402
from modaltune.encoders.base import IMAGENET_MEAN, IMAGENET_STD, sha256_file, unwrap_state_dict  # noqa: E402
from modaltune.errors import InputError  # noqa: E402


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry():
    assert {"prov-gigapath", "conch_v1_5", "timm", "tiny", "vit-small"} <= set(available_encoders())
    with pytest.raises(InputError, match="unknown patch encoder"):
        build_encoder("gigapath-typo")
    with pytest.raises(InputError, match="bad encoder_kwargs"):
        build_encoder("tiny", depth=3)
    from modaltune.encoders.tiny import TinyEncoder

    with pytest.raises(KeyError, match="twice"):
        register_encoder("tiny")(type("Other", (TinyEncoder,), {}))


def test_gigapath_full_size_on_meta():
    from modaltune.encoders.gigapath import build_gigapath_vit

    with torch.device("meta"):
        model = build_gigapath_vit()
    assert abs(n_params(model) - 1.134e9) < 0.005e9  # published: ~1.13B
    sd = model.state_dict()
    # Key names and shapes of the published timm-format pytorch_model.bin.
    assert tuple(sd["pos_embed"].shape) == (1, 197, 1536)
    assert tuple(sd["patch_embed.proj.weight"].shape) == (1536, 3, 16, 16)
    assert tuple(sd["blocks.39.mlp.fc1.weight"].shape) == (8192, 1536)  # SwiGLU packed: 2 x 4096
    assert tuple(sd["blocks.39.mlp.fc2.weight"].shape) == (1536, 4096)
    assert tuple(sd["blocks.0.ls1.gamma"].shape) == (1536,)
    assert "norm.weight" in sd and "blocks.40.norm1.weight" not in sd and not any(k.startswith("head.") for k in sd)
    assert isinstance(model.blocks[0].mlp.act, torch.nn.SiLU)


def _save(sd, path, wrap="model"):
    torch.save({wrap: sd} if wrap else sd, path)
    return str(path)


def test_gigapath_checkpoint_roundtrip_and_strictness(tmp_path):
    from modaltune.encoders.gigapath import build_gigapath_vit

    torch.manual_seed(3)
    ref = build_gigapath_vit(depth=1).eval()
    ckpt = _save(ref.state_dict(), tmp_path / "gp.bin")
    enc = build_encoder("prov-gigapath", checkpoint=ckpt, depth=1)
    assert enc.feature_dim == 1536 and enc.input_size == 224 and not enc.model.training
    assert enc.checkpoint_sha256 == hashlib.sha256(open(ckpt, "rb").read()).hexdigest()
    assert not any(p.requires_grad for p in enc.model.parameters())
    tile = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    x = enc.transform(tile)[None]
    with torch.no_grad():
        np.testing.assert_allclose(enc.model(x).numpy(), ref(x).numpy(), rtol=1e-5, atol=1e-5)

    sd = ref.state_dict()
    sd.pop("blocks.0.ls1.gamma")
    with pytest.raises(InputError, match=r"missing 1: blocks\.0\.ls1\.gamma"):
        build_encoder("prov-gigapath", checkpoint=_save(sd, tmp_path / "m.bin"), depth=1)


def test_strict_loading_messages(tmp_path):
    from modaltune.encoders.tiny import TinyCNN

    ref = TinyCNN(64)
    sd = dict(ref.state_dict(), **{"head.weight": torch.zeros(2, 64)})
    with pytest.raises(InputError, match=r"unexpected 1: head\.weight"):
        build_encoder("tiny", checkpoint=_save(sd, tmp_path / "u.bin", wrap="state_dict"))
    sd = dict(ref.state_dict(), **{"stem.weight": torch.zeros(16, 3, 3, 3)})
    with pytest.raises(InputError, match=r"shape mismatch 1: stem\.weight"):
        build_encoder("tiny", checkpoint=_save(sd, tmp_path / "s.bin", wrap=None))
    with pytest.raises(InputError, match="not found"):
        build_encoder("tiny", checkpoint=str(tmp_path / "absent.bin"))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        build_encoder("tiny", checkpoint=str(tmp_path / "junk.bin"))


def test_gigapath_transform_resize_and_crop():
    enc = build_encoder("prov-gigapath", depth=1)
    tile = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    # A 256 px tile is already at the resize size: the transform is a centre crop + normalisation.
    want = (tile[16:240, 16:240].transpose(2, 0, 1) / 255.0 - mean) / std
    np.testing.assert_allclose(enc.transform(tile).numpy(), want, atol=1e-5)
    # A 512 px tile is resized to 256 first (not cropped from full resolution): smooth content survives.
    yy, xx = np.mgrid[0:256, 0:256]
    smooth = np.stack([xx, yy, 128 + 60 * np.sin(xx / 20.0)], axis=-1).astype(np.uint8)
    big = np.kron(smooth, np.ones((2, 2, 1), dtype=np.uint8))
    want_smooth = (smooth[16:240, 16:240].transpose(2, 0, 1) / 255.0 - mean) / std
    np.testing.assert_allclose(enc.transform(big).numpy(), want_smooth, atol=0.05)
    # ModalTune's own extraction: crop 224 without resizing.
    crop_only = build_encoder("prov-gigapath", depth=1, resize=None)
    np.testing.assert_allclose(crop_only.transform(tile).numpy(), want, atol=1e-5)
    with pytest.raises(InputError, match="uint8 RGB"):
        enc.transform(tile.astype(np.float32))


def test_conch_v15_layout_pos_embed_and_pooler(tmp_path):
    from modaltune.encoders.conch_v15 import AttentionalPooler, ConchV15Tower

    with torch.device("meta"):
        full = ConchV15Tower()
    sd = full.state_dict()
    assert 302e6 < n_params(full.trunk) < 305e6  # ViT-L/16
    assert tuple(sd["attn_pool_contrast.query"].shape) == (1, 768)
    assert tuple(sd["attn_pool_contrast.to_kv.weight"].shape) == (1536, 1024)
    assert tuple(sd["trunk.pos_embed"].shape) == (1, 785, 1024)
    assert "trunk.blocks.23.ls2.gamma" in sd and "ln_contrast.weight" in sd

    # A checkpoint with the 224-px (14x14) positional table loads into the 448-px model.
    torch.manual_seed(0)
    ref224 = ConchV15Tower(depth=1, img_size=224).eval()
    enc = build_encoder("conch_v1_5", checkpoint=_save(ref224.state_dict(), tmp_path / "c.bin", wrap=None),
                        depth=1)
    assert enc.feature_dim == 768 and enc.input_size == 448
    assert tuple(enc.model.trunk.pos_embed.shape) == (1, 785, 1024)
    torch.testing.assert_close(enc.model.trunk.pos_embed[:, 0], ref224.trunk.pos_embed[:, 0])
    tile = np.random.default_rng(2).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    x = enc.transform(tile)
    assert tuple(x.shape) == (3, 448, 448)
    with torch.no_grad():
        out = enc.model(x[None])
    assert tuple(out.shape) == (1, 768) and torch.isfinite(out).all()

    # Pooler equals the textbook multi-head attention of one learned query over the tokens.
    pool = AttentionalPooler(d_model=16, context_dim=24, n_head=4, n_queries=1).eval()
    tokens = torch.randn(3, 7, 24)
    with torch.no_grad():
        got = pool(tokens)
        k, v = pool.to_kv(pool.ln_k(tokens)).chunk(2, dim=-1)
        q = pool.to_q(pool.ln_q(pool.query))
        outs = []
        for h in range(4):
            sl = slice(4 * h, 4 * h + 4)
            att = torch.softmax(q[None, :, sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)
            outs.append(att @ v[..., sl])
        want = pool.to_out(torch.cat(outs, dim=-1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dino_pos_embed_interpolation():
    from modaltune.encoders.conch_v15 import dino_interpolate_pos_embed

    pe = torch.randn(1, 1 + 14 * 14, 8)
    assert dino_interpolate_pos_embed(pe, 14) is pe
    out = dino_interpolate_pos_embed(pe, 28)
    assert tuple(out.shape) == (1, 1 + 28 * 28, 8)
    # A constant table stays constant (bicubic weights sum to one).
    const = torch.ones(1, 197, 8)
    torch.testing.assert_close(dino_interpolate_pos_embed(const, 28), torch.ones(1, 785, 8))


def test_tiny_deterministic_and_keeps_colour_and_texture():
    a, b, c = build_encoder("tiny"), build_encoder("tiny"), build_encoder("tiny", seed=1)
    for (_, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        torch.testing.assert_close(pa, pb)
    assert not torch.equal(a.model.stem.weight, c.model.stem.weight)
    assert a.feature_dim == 64 and a.input_size == 224

    rng = np.random.default_rng(0)

    def tiles(colour, noise, k=6):
        return [np.clip(np.array(colour) + rng.normal(0, noise, (256, 256, 3)), 0, 255).astype(np.uint8)
                for _ in range(k)]

    groups = [tiles([200, 100, 170], 8), tiles([110, 70, 190], 8), tiles([200, 100, 170], 40)]
    with torch.no_grad():
        feats = [a.model(torch.stack([a.transform(t) for t in g])).numpy() for g in groups]
    centroids = np.stack([f.mean(0) for f in feats])
    spread = max(np.linalg.norm(f - f.mean(0), axis=1).max() for f in feats)
    # Colour (group 0 vs 1) and texture (group 0 vs 2) both separate far beyond within-group spread.
    assert np.linalg.norm(centroids[0] - centroids[1]) > 3 * spread
    assert np.linalg.norm(centroids[0] - centroids[2]) > 3 * spread


def test_vit_small_and_timm_generic(tmp_path):
    vs = build_encoder("vit-small")
    assert vs.feature_dim == 384 and 21e6 < n_params(vs.model) < 23e6
    torch.manual_seed(0)
    import timm

    ref = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}  # DDP-saved checkpoint
    enc = build_encoder("timm", checkpoint=_save(sd, tmp_path / "r.pt", wrap=None), model_name="resnet18")
    assert enc.feature_dim == 512 and enc.config["model_name"] == "resnet18"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(enc.model(x), ref(x))
    with pytest.raises(InputError, match="model_name"):
        build_encoder("timm")
    with pytest.raises(InputError, match="not a timm architecture"):
        build_encoder("timm", model_name="no_such_net")


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from modaltune.encoders.tiny import TinyCNN

    torch.manual_seed(9)
    ref = TinyCNN(64)
    save_file(ref.state_dict(), str(tmp_path / "t.safetensors"))
    enc = build_encoder("tiny", checkpoint=str(tmp_path / "t.safetensors"))
    torch.testing.assert_close(enc.model.stem.weight, ref.stem.weight)


def test_sha256_and_unwrap(tmp_path):
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 123)  # spans several 1 MiB chunks
    (tmp_path / "f.bin").write_bytes(data)
    assert sha256_file(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
    t = torch.zeros(1)
    assert unwrap_state_dict({"model": {"a": t}}, "x") == {"a": t}
    assert unwrap_state_dict({"module.a": t, "module.b": t}, "x").keys() == {"a", "b"}
    with pytest.raises(InputError, match="state dict"):
        unwrap_state_dict({"epoch": 3}, "ckpt.pt")


def test_sha256_disk_cache(tmp_path, monkeypatch):
    from modaltune.encoders import base

    monkeypatch.setattr(base, "DISK_CACHE_MIN_BYTES", 0)
    monkeypatch.setenv("MODALTUNE_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights v1")
    first = sha256_file(f)
    cached = list((tmp_path / "cache" / "sha256").glob("*.txt"))
    assert first == hashlib.sha256(b"weights v1").hexdigest() and len(cached) == 1
    assert cached[0].read_text().strip() == first
    f.write_bytes(b"weights v2, longer")  # new size and mtime: a new key, never the stale digest
    assert sha256_file(f) == hashlib.sha256(b"weights v2, longer").hexdigest()
    assert len(list((tmp_path / "cache" / "sha256").glob("*.txt"))) == 2
