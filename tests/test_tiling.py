"""Tiling: tissue mask, grid geometry, mpp handling, failure records, atomic output, tile reading."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest

from modaltune.errors import InputError, SlideError
from modaltune.slide_io import TiffLevelReader, open_slide
from modaltune.tiling import (
    TileReader,
    choose_read_level,
    detect_tissue,
    footprint_fractions,
    iter_tile_batches,
    region_to_patch,
    tile_slide,
)

# 3072 x 2048 level 0 (pyramid /1 /2 /4), tissue rectangle x 1000..2600, y 500..1600 (level-0 px).
W, H = 3072, 2048
RECT = (1000, 500, 2600, 1600)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, tissue_rect_image, write_test_pyramid) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slides")
    img = tissue_rect_image(H, W, RECT)
    out = {f"mpp{m}": write_test_pyramid(d / f"rect_{m}.tif", img, m) for m in (0.25, 0.5, 0.3)}
    out["nompp"] = write_test_pyramid(d / "rect_nompp.tif", img, None)
    out["blank"] = write_test_pyramid(d / "blank.tif", np.full((1024, 1536, 3), 245, np.uint8), 0.25)
    return out


def _h5(path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return dict(f.attrs), f["coords"][:], f["coords_target"][:], f["tissue_fraction"][:]


def _grid(xs, ys) -> np.ndarray:
    return np.array([(x, y) for y in ys for x in xs], np.int64)


def test_grid_at_025_mpp_steps_512_level0_and_reads_level1(slides, tmp_path):
    res = tile_slide(str(slides["mpp0.25"]), str(tmp_path / "a.h5"), qc_png=str(tmp_path / "a.png"))
    attrs, coords, coords_t, frac = _h5(tmp_path / "a.h5")
    assert res["status"] == "ok" and attrs["status"] == "ok"
    assert attrs["level0_size"] == 512 and attrs["read_level"] == 1 and attrs["read_size"] == 256
    # patches fully inside x 1000..2600: 1024, 1536, 2048; y 500..1600: 512, 1024
    expected = _grid([1024, 1536, 2048], [512, 1024])
    np.testing.assert_array_equal(coords, expected)
    assert coords.dtype == np.int64 and coords_t.dtype == np.int64
    np.testing.assert_array_equal(coords_t, expected // 2)
    assert attrs["n_tiles"] == 6 and np.all(frac >= 0.95)
    assert attrs["level0_mpp"] == pytest.approx(0.25) and attrs["mpp_source"] == "openslide"
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    reader = TileReader(str(tmp_path / "a.h5"))
    tile = reader[0]
    assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
    # level 1 is read directly at (x/2, y/2): identical to OpenSlide's own read of that region
    with openslide.OpenSlide(str(slides["mpp0.25"])) as s:
        ref = np.asarray(s.read_region((1024, 512), 1, (256, 256)))[..., :3]
    np.testing.assert_array_equal(tile, ref)


def test_partial_patches_have_exact_tissue_fractions(slides, tmp_path):
    tile_slide(str(slides["mpp0.25"]), str(tmp_path / "b.h5"), min_tissue=0.0)
    _, coords, _, frac = _h5(tmp_path / "b.h5")
    assert len(coords) == 6 * 4  # the whole grid (3072/512 x 2048/512)
    by_xy = {tuple(c): f for c, f in zip(coords.tolist(), frac, strict=True)}
    # column 512..1024 overlaps the rectangle by 24 px of 512; row 1536..2048 by 64 of 512
    assert by_xy[(512, 512)] == pytest.approx(24 / 512, abs=0.01)
    assert by_xy[(1024, 1536)] == pytest.approx(64 / 512, abs=0.01)
    assert by_xy[(512, 1536)] == pytest.approx(24 * 64 / 512**2, abs=0.01)
    assert by_xy[(0, 0)] == 0.0 and by_xy[(1536, 1024)] == 1.0


def test_half_mpp_slide_reads_level0_without_resize(slides, tmp_path):
    tile_slide(str(slides["mpp0.5"]), str(tmp_path / "c.h5"))
    attrs, coords, coords_t, _ = _h5(tmp_path / "c.h5")
    assert (attrs["level0_size"], attrs["read_level"], attrs["read_size"]) == (256, 0, 256)
    expected = _grid(range(1024, 2305, 256), range(512, 1281, 256))
    np.testing.assert_array_equal(coords, expected)
    np.testing.assert_array_equal(coords_t, expected)
    tile = TileReader(str(tmp_path / "c.h5"))[3]
    with openslide.OpenSlide(str(slides["mpp0.5"])) as s:
        ref = np.asarray(s.read_region(tuple(int(v) for v in coords[3]), 0, (256, 256)))[..., :3]
    np.testing.assert_array_equal(tile, ref)


def test_non_matching_mpp_reads_larger_region_and_resizes(slides, tmp_path):
    tile_slide(str(slides["mpp0.3"]), str(tmp_path / "d.h5"))
    attrs, coords, coords_t, _ = _h5(tmp_path / "d.h5")
    # 256 px at 0.5 um/px = 426.7 level-0 px at 0.3 um/px; level 1 would give 213 px (upsampling)
    assert (attrs["level0_size"], attrs["read_level"], attrs["read_size"]) == (427, 0, 427)
    assert np.all(coords % 427 == 0)
    np.testing.assert_array_equal(coords_t, np.round(coords * 0.6))
    tile = TileReader(str(tmp_path / "d.h5"))[0]
    assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
    assert tile[..., 1].mean() < 160  # tissue (green ~110), not the white background


def test_choose_read_level_tolerates_inexact_downsamples():
    assert choose_read_level((1.0, 2.0001, 4.0003), 512, 256) == (1, 256)
    assert choose_read_level((1.0, 4.0, 16.0), 512, 256) == (0, 512)
    assert choose_read_level((1.0, 4.0, 16.0), 1024, 256) == (1, 256)
    assert choose_read_level((1.0, 2.0), 200, 256) == (0, 200)  # 20x slide at 0.25 target: upsample from 0


def test_footprint_fractions_match_supersampled_brute_force():
    rng = np.random.default_rng(1)
    mask = rng.random((40, 50)) > 0.5
    x0 = rng.integers(0, 120, 30) / 4  # quarter-pixel corners
    y0 = rng.integers(0, 80, 30) / 4
    size = 7.25
    got = footprint_fractions(mask, x0, y0, size)
    fine = np.repeat(np.repeat(mask, 4, 0), 4, 1)
    for g, x, y in zip(got, x0, y0, strict=True):
        xa, ya, s = int(x * 4), int(y * 4), int(size * 4)
        window = fine[ya:ya + s, xa:xa + s]
        assert g == pytest.approx(window.sum() / s**2, abs=1e-9)


def test_mpp_override_used_when_file_has_none(slides, tmp_path):
    res = tile_slide(str(slides["nompp"]), str(tmp_path / "e.h5"), mpp_override=0.25)
    attrs, coords, _, _ = _h5(tmp_path / "e.h5")
    assert res["status"] == "ok" and attrs["mpp_source"] == "override"
    assert attrs["level0_mpp"] == 0.25 and attrs["level0_size"] == 512 and len(coords) == 6
    with open_slide(slides["mpp0.5"], mpp_override=0.25) as s:  # the file's own value wins
        assert s.level0_mpp == pytest.approx(0.5) and s.mpp_source == "openslide"
    with pytest.raises(InputError, match="positive number"):
        open_slide(slides["nompp"], mpp_override=-1)


def test_missing_mpp_records_failure_naming_slide(slides, tmp_path):
    res = tile_slide(str(slides["nompp"]), str(tmp_path / "f.h5"), qc_png=str(tmp_path / "f.png"))
    attrs, coords, coords_t, frac = _h5(tmp_path / "f.h5")
    assert res["status"] == "failed" and attrs["status"] == "failed"
    assert "rect_nompp.tif" in attrs["error"] and "mpp column of the cohort sheet" in attrs["error"]
    assert coords.shape == (0, 2) and coords_t.shape == (0, 2) and frac.shape == (0,)
    assert attrs["n_tiles"] == 0 and (tmp_path / "f.png").exists()
    assert len(TileReader(str(tmp_path / "f.h5"))) == 0
    with pytest.raises(SlideError, match="mpp column"):
        tile_slide(str(slides["nompp"]), str(tmp_path / "g.h5"), on_error="raise")
    assert not (tmp_path / "g.h5").exists()


def test_corrupt_and_truncated_files_record_failures(slides, tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide at all" * 100)
    res = tile_slide(str(bad), str(tmp_path / "bad.h5"))
    assert res["status"] == "failed" and str(bad) in res["error"] and "OpenSlide" in res["error"]
    # a valid header with its tile data cut off: OpenSlide opens it, reading then fails
    trunc = tmp_path / "trunc.tif"
    trunc.write_bytes(Path(slides["mpp0.25"]).read_bytes()[:20000])
    res = tile_slide(str(trunc), str(tmp_path / "trunc.h5"))
    assert res["status"] == "failed" and str(trunc) in res["error"]
    assert _h5(tmp_path / "trunc.h5")[0]["status"] == "failed"
    res = tile_slide(str(tmp_path / "absent.svs"), str(tmp_path / "absent.h5"))
    assert res["status"] == "failed" and "file not found" in res["error"]


def test_blank_slide_records_no_tissue(slides, tmp_path):
    for method in ("lab", "otsu"):
        res = tile_slide(str(slides["blank"]), str(tmp_path / f"{method}.h5"), tissue_method=method,
                         qc_png=str(tmp_path / f"{method}.png"))
        assert res["status"] == "failed" and "no tissue" in res["error"], method
        assert (tmp_path / f"{method}.png").exists()


def test_tissue_methods_find_the_rectangle(tissue_rect_image):
    img = tissue_rect_image(300, 400, (100, 50, 300, 250))
    truth = np.zeros((300, 400), bool)
    truth[50:250, 100:300] = True
    for method in ("lab", "otsu"):
        mask = detect_tissue(img, method)
        assert (mask == truth).mean() > 0.99, method
    with pytest.raises(InputError, match="tissue_method"):
        detect_tissue(img, "magic")


def test_output_is_atomic_when_writing_fails(slides, tmp_path, monkeypatch):
    real = h5py.Group.create_dataset

    def boom(self, name, *a, **kw):
        if name == "tissue_fraction":
            raise RuntimeError("disk full")
        return real(self, name, *a, **kw)

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        tile_slide(str(slides["mpp0.5"]), str(tmp_path / "x.h5"))
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_raise_input_error(slides, tmp_path):
    for kw in ({"patch_size": 0}, {"target_mpp": -0.5}, {"min_tissue": 1.5}, {"tissue_method": "x"},
               {"on_error": "ignore"}):
        with pytest.raises(InputError):
            tile_slide(str(slides["mpp0.5"]), str(tmp_path / "y.h5"), **kw)


def test_reader_is_picklable_and_parallel_batches_match(slides, tmp_path):
    tile_slide(str(slides["mpp0.5"]), str(tmp_path / "p.h5"))
    reader = TileReader(str(tmp_path / "p.h5"))
    first = reader[5]
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone[5], first)
    seq = reader.read_batch(range(len(reader)))
    for backend in ("thread", "process"):
        got = list(iter_tile_batches(str(tmp_path / "p.h5"), batch_size=5, workers=2, backend=backend))
        np.testing.assert_array_equal(np.concatenate([i for i, _ in got]), np.arange(len(reader)))
        np.testing.assert_array_equal(np.concatenate([b for _, b in got]), seq)
    with pytest.raises(IndexError):
        reader[len(reader)]


def test_tiff_level_reader_matches_openslide_on_unaligned_regions(slides):
    path = str(slides["mpp0.5"])
    with openslide.OpenSlide(path) as s:
        level1 = s.level_dimensions[1]
        assert TiffLevelReader.open(path, level1, vendor=None) is None  # unknown vendor: OpenSlide only
        r = TiffLevelReader.open(path, level1, s.properties["openslide.vendor"])
        assert r is not None
        try:
            got = r.read(100, 37, 300, 200)  # spans 2 x 2 TIFF tiles, at level 1
            ref = np.asarray(s.read_region((200, 74), 1, (300, 200)))[..., :3]
            np.testing.assert_array_equal(got, ref)
            edge = r.read(level1[0] - 10, 0, 20, 5)  # half outside the image: white there
            np.testing.assert_array_equal(edge[:, 10:], 255)
            np.testing.assert_array_equal(edge[:, :10], np.asarray(s.read_region(
                ((level1[0] - 10) * 2, 0), 1, (10, 5)))[..., :3])
        finally:
            r.close()


def test_region_to_patch_whitens_transparency_and_area_averages():
    from PIL import Image

    rgba = np.zeros((512, 512, 4), np.uint8)  # transparent black, as OpenSlide returns unscanned areas
    rgba[:, :256] = (200, 100, 50, 255)
    out = np.asarray(region_to_patch(Image.fromarray(rgba, "RGBA"), 256))
    assert out.shape == (256, 256, 3)
    np.testing.assert_array_equal(out[:, :128], np.broadcast_to([200, 100, 50], (256, 128, 3)))
    np.testing.assert_array_equal(out[:, 128:], 255)
    odd = np.asarray(region_to_patch(Image.fromarray(rgba[:300, :300], "RGBA"), 256))
    assert odd.shape == (256, 256, 3) and odd[0, 0].tolist() == [200, 100, 50] and odd[0, -1].tolist() == [255] * 3


def test_cmu_small_region_real_slide(tmp_path, cmu_small_region):
    svs = cmu_small_region
    res = tile_slide(str(svs), str(tmp_path / "cmu.h5"), min_tissue=0.5, qc_png=str(tmp_path / "cmu.png"))
    assert res["status"] == "ok" and res["level0_mpp"] == pytest.approx(0.499)
    assert 20 <= res["n_tiles"] <= 45, res["n_tiles"]
    reader = TileReader(str(tmp_path / "cmu.h5"))
    assert reader.attrs["read_size"] == 257 and reader.attrs["read_level"] == 0
    tile = reader[len(reader) // 2]
    assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
    assert tile.mean() < 230  # stained tissue, not glass
    # the direct TIFF-tile path (240 px Aperio tiles, regions spanning 4 of them) matches OpenSlide
    assert reader._tiff is not None
    plain = TileReader(str(tmp_path / "cmu.h5"), fast=False)
    for i in range(0, len(reader), 5):
        np.testing.assert_array_equal(reader[i], plain[i])
    assert plain._tiff is None


def test_importing_tiling_does_not_import_torch():
    code = "import sys, modaltune.tiling, modaltune.slide_io; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
