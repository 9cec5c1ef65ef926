"""Streaming embedding: format, resume/stale detection, atomicity, failed slides, determinism."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from modaltune.embedding import embed_slide, pick_device  # noqa: E402
from modaltune.errors import InputError  # noqa: E402

P = 64  # small tiles keep the tests fast; the tiny encoder resizes them to its input size


class FakeTiles:
    """TileReader-compatible source: deterministic tiles, colour and texture set by the tile index."""

    def __init__(self, n: int, patch: int = P, fail_at: int | None = None):
        self.n, self.patch, self.fail_at = n, patch, fail_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if self.fail_at is not None and i == self.fail_at:
            raise RuntimeError(f"simulated reader crash at tile {i}")
        rng = np.random.default_rng(i)
        base = np.array([200, 90, 160] if i % 2 else [120, 60, 200], dtype=np.float32)
        noise = rng.normal(0, 25 if i % 3 else 5, size=(self.patch, self.patch, 3))
        return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_tiles_h5(path, n: int, status: str = "ok", error: str = "", slide: str = "S1") -> str:
    with h5py.File(path, "w") as f:
        coords = np.stack([np.arange(n) * 128, np.arange(n) * 2 * 128], axis=1).astype(np.int64)
        f["coords"] = coords
        f["coords_target"] = coords // 2
        f["tissue_fraction"] = np.ones(n, np.float32)
        f.attrs.update(slide_path=f"/data/{slide}.tiff", slide_id=slide, patch_size=P, target_mpp=0.5,
                       level0_mpp=0.25, read_level=0, read_size=2 * P, level0_size=2 * P,
                       tissue_method="otsu", min_tissue=0.5, n_tiles=n, status=status, error=error,
                       modaltune_version="0.1.0")
    return str(path)


def factory(n: int, **kw):
    return lambda _path: FakeTiles(n, **kw)


def run(tiles, out, n, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 16)
    # The tiny encoder at the tiles' own size: no resize, so the tests stay fast on 2 busy cores.
    kw["encoder_kwargs"] = {"img_size": P, **kw.get("encoder_kwargs", {})}
    return embed_slide(tiles, out, reader_factory=factory(n), **kw)


def test_end_to_end_format(tmp_path):
    n = 37  # not a multiple of the batch size: the last partial batch must be appended too
    tiles = write_tiles_h5(tmp_path / "S1.h5", n)
    out = tmp_path / "feat" / "S1.h5"
    res = run(tiles, out, n)
    assert res["status"] == "ok" and res["n_tiles"] == n and res["tiles_per_s"] > 0 and res["wall_s"] > 0
    with h5py.File(out, "r") as f, h5py.File(tiles, "r") as t:
        assert f["features"].shape == (n, 64) and f["features"].dtype == np.float32
        assert f["features"].chunks is not None and f["features"].maxshape == (None, 64)
        np.testing.assert_array_equal(f["coords"][:], t["coords"][:])
        np.testing.assert_array_equal(f["coords_target"][:], t["coords_target"][:])
        assert f["coords"].dtype == np.int64
        a = dict(f.attrs)
        assert a["encoder"] == "tiny" and a["checkpoint_sha256"] == "none" and a["feature_dim"] == 64
        assert a["status"] == "ok" and bool(a["complete"]) and a["patch_size"] == P
        assert a["target_mpp"] == 0.5 and a["slide_path"] == "/data/S1.tiff" and a["level0_mpp"] == 0.25
        assert a["torch_version"] == torch.__version__ and "timm_version" in a
        assert list(f.attrs.keys())[-1] == "complete"  # written last
        feats = f["features"][:]
    assert np.isfinite(feats).all() and feats.std(axis=0).max() > 0
    # Rows follow tile order: row i equals the encoder applied to tile i alone.
    from modaltune.encoders import build_encoder

    enc = build_encoder("tiny", img_size=P)
    one = enc.model(enc.transform(FakeTiles(n)[5])[None]).detach().numpy()[0]
    np.testing.assert_allclose(feats[5], one, rtol=1e-4, atol=1e-5)
    # No temp file left beside the output.
    assert sorted(p.name for p in out.parent.iterdir()) == ["S1.h5"]


def test_float16_features(tmp_path):
    tiles = write_tiles_h5(tmp_path / "S1.h5", 10)
    run(tiles, tmp_path / "o.h5", 10, feature_dtype="float16")
    with h5py.File(tmp_path / "o.h5", "r") as f:
        assert f["features"].dtype == np.float16 and f.attrs["feature_dtype"] == "float16"


def test_resume_skips_untouched(tmp_path):
    tiles = write_tiles_h5(tmp_path / "S1.h5", 20)
    out = tmp_path / "o.h5"
    run(tiles, out, 20)
    before = (out.stat().st_mtime_ns, out.read_bytes())
    res = run(tiles, out, 20)
    assert res["status"] == "skipped" and res["stored_status"] == "ok" and res["n_tiles"] == 20
    assert (out.stat().st_mtime_ns, out.read_bytes()) == before
    # Passing a default explicitly is the same configuration: still skipped.
    assert run(tiles, out, 20, encoder_kwargs={"seed": 0, "dim": 64})["status"] == "skipped"


def test_stale_kwargs_redone(tmp_path, caplog):
    tiles = write_tiles_h5(tmp_path / "S1.h5", 20)
    out = tmp_path / "o.h5"
    run(tiles, out, 20)
    old = h5py.File(out, "r")["features"][:]
    with caplog.at_level(logging.WARNING, logger="modaltune.embedding"):
        res = run(tiles, out, 20, encoder_kwargs={"seed": 1})
    assert res["status"] == "ok"
    assert "encoder_kwargs" in caplog.text and "stale" in caplog.text
    new = h5py.File(out, "r")["features"][:]
    assert not np.allclose(old, new)


def test_stale_checkpoint_redone(tmp_path, caplog):
    from modaltune.encoders.tiny import TinyCNN

    tiles = write_tiles_h5(tmp_path / "S1.h5", 12)
    out = tmp_path / "o.h5"
    run(tiles, out, 12)
    ckpt = tmp_path / "tiny.pt"
    torch.manual_seed(5)
    torch.save({"model": TinyCNN(64).state_dict()}, ckpt)
    with caplog.at_level(logging.WARNING, logger="modaltune.embedding"):
        res = run(tiles, out, 12, checkpoint=str(ckpt))
    assert res["status"] == "ok" and "checkpoint_sha256" in caplog.text
    with h5py.File(out, "r") as f:
        assert f.attrs["checkpoint_sha256"] != "none" and len(f.attrs["checkpoint_sha256"]) == 64


def test_stale_when_tiling_changed(tmp_path, caplog):
    tiles = write_tiles_h5(tmp_path / "S1.h5", 12)
    out = tmp_path / "o.h5"
    run(tiles, out, 12)
    write_tiles_h5(tmp_path / "S1.h5", 14)
    with caplog.at_level(logging.WARNING, logger="modaltune.embedding"):
        res = run(tiles, out, 14)
    assert res["status"] == "ok" and res["n_tiles"] == 14 and "n_tiles" in caplog.text


def test_incomplete_existing_file_redone(tmp_path, caplog):
    tiles = write_tiles_h5(tmp_path / "S1.h5", 8)
    out = tmp_path / "o.h5"
    with h5py.File(out, "w") as f:  # looks like a features file but was never marked complete
        f["features"] = np.zeros((8, 64), np.float32)
    with caplog.at_level(logging.WARNING, logger="modaltune.embedding"):
        assert run(tiles, out, 8)["status"] == "ok"
    assert "not marked complete" in caplog.text


def test_killed_job_leaves_no_file(tmp_path):
    tiles = write_tiles_h5(tmp_path / "S1.h5", 40)
    out = tmp_path / "feat" / "S1.h5"
    with pytest.raises(RuntimeError, match="simulated reader crash"):
        embed_slide(tiles, out, reader_factory=factory(40, fail_at=30), num_workers=0, batch_size=8,
                    progress=False)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # temp file removed too


def test_failed_tiles_give_failed_record(tmp_path):
    tiles = write_tiles_h5(tmp_path / "S1.h5", 0, status="failed", error="slide S1: no tissue found")
    out = tmp_path / "o.h5"
    res = embed_slide(tiles, out, reader_factory=None, progress=False)  # reader never needed
    assert res["status"] == "failed" and "no tissue" in res["error"]
    with h5py.File(out, "r") as f:
        assert f["features"].shape == (0, 64) and f["coords"].shape == (0, 2)
        assert f.attrs["status"] == "failed" and "no tissue" in f.attrs["error"] and bool(f.attrs["complete"])
    # A failed record is itself resumable.
    assert embed_slide(tiles, out, progress=False)["status"] == "skipped"


def test_zero_tiles_is_failed(tmp_path):
    tiles = write_tiles_h5(tmp_path / "S1.h5", 0)
    res = embed_slide(tiles, tmp_path / "o.h5", progress=False)
    assert res["status"] == "failed" and res["error"] == "no tiles"


def test_deterministic_and_workers_identical(tmp_path):
    n = 45
    tiles = write_tiles_h5(tmp_path / "S1.h5", n)
    run(tiles, tmp_path / "a.h5", n, num_workers=0)
    run(tiles, tmp_path / "b.h5", n, num_workers=0)
    run(tiles, tmp_path / "c.h5", n, num_workers=2)
    a, b, c = (h5py.File(tmp_path / f"{k}.h5", "r")["features"][:] for k in "abc")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        embed_slide(tmp_path / "missing.h5", tmp_path / "o.h5", progress=False)
    tiles = write_tiles_h5(tmp_path / "S1.h5", 4)
    with pytest.raises(InputError, match="unknown patch encoder"):
        run(tiles, tmp_path / "o.h5", 4, encoder="nope")
    with pytest.raises(InputError, match="bad encoder_kwargs"):
        run(tiles, tmp_path / "o.h5", 4, encoder_kwargs={"depth": 3})
    with pytest.raises(InputError, match="n_tiles=4"):
        embed_slide(tiles, tmp_path / "o.h5", reader_factory=factory(5), num_workers=0, progress=False)
    with pytest.raises(InputError, match="precision"):
        run(tiles, tmp_path / "o.h5", 4, precision="fp8")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(InputError, match="not a readable HDF5"):
        embed_slide(tmp_path / "junk.h5", tmp_path / "o.h5", progress=False)


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            pick_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_matches_cpu(tmp_path):
    n = 33
    tiles = write_tiles_h5(tmp_path / "S1.h5", n)
    run(tiles, tmp_path / "cpu.h5", n, device="cpu")
    res = run(tiles, tmp_path / "gpu.h5", n, device="cuda", num_workers=2, channels_last=True)
    assert res["status"] == "ok"
    with h5py.File(tmp_path / "cpu.h5", "r") as c, h5py.File(tmp_path / "gpu.h5", "r") as g:
        assert g.attrs["device"] == "cuda" and g.attrs["precision"] in ("bfloat16", "float16")
        a, b = c["features"][:], g["features"][:]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_real_tile_reader_from_pyramidal_tiff(tmp_path):
    """The default reader: a real pyramidal TIFF tiled by modaltune.tiling, read in DataLoader workers."""
    tiling = pytest.importorskip("modaltune.tiling")
    from modaltune.demo import write_pyramid_tiff

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:512]
    rgb = np.stack([160 + 40 * np.sin(xx / 9.0), 90 + 30 * np.cos(yy / 7.0), 180 + 0 * xx], axis=-1)
    rgb = np.clip(rgb + rng.normal(0, 10, rgb.shape), 0, 255).astype(np.uint8)
    write_pyramid_tiff(tmp_path / "slide.tiff", rgb, mpp=0.5, tile=128)
    tiles = tmp_path / "tiles.h5"
    res = tiling.tile_slide(str(tmp_path / "slide.tiff"), str(tiles), patch_size=P, target_mpp=0.5,
                            min_tissue=0.0, on_error="raise")
    n = res["n_tiles"]
    assert n > 0
    kw = dict(encoder_kwargs={"img_size": P}, batch_size=16, progress=False)
    a = embed_slide(tiles, tmp_path / "a.h5", num_workers=2, **kw)
    b = embed_slide(tiles, tmp_path / "b.h5", num_workers=0, **kw)
    assert a["status"] == b["status"] == "ok" and a["n_tiles"] == n
    with h5py.File(tmp_path / "a.h5", "r") as fa, h5py.File(tmp_path / "b.h5", "r") as fb:
        np.testing.assert_array_equal(fa["features"][:], fb["features"][:])
        feats, coords = fa["features"][:], fa["coords"][:]
    reader = tiling.TileReader(str(tiles))
    np.testing.assert_array_equal(coords, reader.coords)
    from modaltune.encoders import build_encoder

    enc = build_encoder("tiny", img_size=P)
    with torch.no_grad():
        want = enc.model(enc.transform(reader[n - 1])[None]).numpy()[0]
    np.testing.assert_allclose(feats[n - 1], want, rtol=1e-4, atol=1e-5)
