"""Faults and reuse: disk full, SIGKILL mid-write, orphaned partials, QC png after a failure, importing
TRIDENT/CLAM/STAMP features (docs catalogue rows name these tests), and a few bench_faults trials."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from modaltune.embedding import embed_slide  # noqa: E402
from modaltune.errors import InputError  # noqa: E402
from modaltune.feature_import import import_slide_features, slide_features  # noqa: E402
from modaltune.io_utils import DiskFullError, atomic_path, orphan_pattern, remove_orphans  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_faults  # noqa: E402

P = 64


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class Tiles:
    """Deterministic tiles; ``kill_at``: the process SIGKILLs itself when that tile is read."""

    def __init__(self, n: int, kill_at: int | None = None):
        self.n, self.kill_at = n, kill_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.kill_at is not None and i == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        rng = np.random.default_rng(i)
        return rng.integers(0, 256, (P, P, 3), dtype=np.uint8)


def write_tiles(path: Path, n: int, slide: str = "S1") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        c = np.stack([np.arange(n) * 128, np.zeros(n)], axis=1).astype(np.int64)
        f["coords"], f["coords_target"], f["tissue_fraction"] = c, c // 2, np.ones(n, np.float32)
        f.attrs.update(slide_path=f"/data/{slide}.tiff", slide_id=slide, patch_size=P, target_mpp=0.5,
                       level0_mpp=0.25, read_level=0, read_size=2 * P, level0_size=2 * P, tissue_method="otsu",
                       min_tissue=0.5, n_tiles=n, status="ok", error="")
    return str(path)


def embed(tiles, out, n, kill_at=None):
    return embed_slide(tiles, out, encoder="tiny", encoder_kwargs={"img_size": P}, batch_size=8, num_workers=0,
                       progress=False, reader_factory=lambda _p: Tiles(n, kill_at))


def parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


def read_features(path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("features", "coords", "coords_target")} | {"complete": f.attrs["complete"]}


# ------------------------------------------------------------------------------------------ disk full
def test_disk_full_features(tmp_path, monkeypatch):
    tiles = write_tiles(tmp_path / "tiles" / "S1.h5", 40)
    out = tmp_path / "features" / "S1.h5"
    real = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def full(self, key, value):
        calls["n"] += 1
        if calls["n"] == 3:  # a few batches in: the disk fills up mid-file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(DiskFullError) as ei:
        embed(tiles, out, 40)
    msg = str(ei.value)
    assert str(out) in msg and "no space left on device" in msg and "rerun" in msg
    assert ei.value.errno == errno.ENOSPC
    assert not out.exists() and parts(out.parent) == []  # no half-written file, no temp file
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    assert embed(tiles, out, 40)["status"] == "ok"  # space freed: the rerun completes
    assert read_features(out)["features"].shape == (40, 64)


def test_qc_png_rewritten_after_disk_full(tmp_path, monkeypatch):
    """Sharded tiling: the png failed (disk full) after the tiles HDF5 was written, and the rerun skipped
    the slide because its HDF5 looked current, so the png was never written. Now the png is written
    before the HDF5 and a missing png makes the shard re-tile."""
    from matplotlib.figure import Figure

    from modaltune.shards import run_shard

    fx = bench_faults.make_slide(tmp_path / "slide")
    slides = [{"slide_id": "S1", "path": fx["slide"], "mpp": None}]
    kw = dict(tiles_dir=str(tmp_path / "tiles"), features_dir=str(tmp_path / "features"),
              tiling={"patch_size": P, "target_mpp": 0.5, "tissue_method": "otsu", "min_tissue": 0.5},
              embedding={"encoder": "tiny", "encoder_kwargs": {"img_size": P}, "num_workers": 0,
                         "progress": False, "batch_size": 32})
    real = Figure.savefig

    def full(self, fname, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(DiskFullError, match=r"S1\.png: no space left"):
        run_shard(slides, str(tmp_path / "m.tsv"), **kw)
    assert not (tmp_path / "tiles" / "S1.h5").exists()  # the png comes first: no HDF5 that looks done
    assert parts(tmp_path / "tiles") == []
    monkeypatch.setattr(Figure, "savefig", real)
    # even an HDF5 left by an older version (png lost after it) is re-tiled when its png is missing
    run_shard(slides, str(tmp_path / "m.tsv"), **kw)
    png = tmp_path / "tiles" / "S1.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    run_shard(slides, str(tmp_path / "m.tsv"), **kw)
    assert png.is_file()


# ----------------------------------------------------------------------------------- killed mid-write
def _killed_child(tiles, out, n, kill_at):
    embed(tiles, out, n, kill_at=kill_at)


def test_killed_mid_write_leaves_no_partial(tmp_path):
    n = 40
    tiles = write_tiles(tmp_path / "tiles" / "S1.h5", n)
    out = tmp_path / "features" / "S1.h5"
    p = mp.get_context("fork").Process(target=_killed_child, args=(tiles, str(out), n, 25))
    p.start()
    p.join(120)
    assert p.exitcode == -signal.SIGKILL
    assert not out.exists()  # nothing under the final name
    left = parts(out.parent)
    assert len(left) == 1 and orphan_pattern(out).match(left[0])  # the killed job's temp file (3 batches in)
    try:  # a killed HDF5 writer leaves a truncated file (or one without the final attrs)
        with h5py.File(out.parent / left[0], "r") as f:
            assert "complete" not in f.attrs
    except OSError as e:
        assert "truncated" in str(e) or "signature" in str(e)
    ref = tmp_path / "ref" / "S1.h5"
    embed(tiles, ref, n)
    assert embed(tiles, out, n)["status"] == "ok"  # the rerun
    assert parts(out.parent) == []  # ... removed the orphan
    a, b = read_features(out), read_features(ref)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _hold_lock(path, ready, release):
    import fcntl

    fd = os.open(path, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    ready.set()
    release.wait(60)


def test_orphan_parts_cleaned_on_rerun(tmp_path):
    from modaltune.tiling import tile_slide
    from modaltune.training import train_run

    # features: orphans of S1 go, another slide's partial and a live writer's (locked) partial stay
    tiles = write_tiles(tmp_path / "tiles" / "S1.h5", 16)
    feats = tmp_path / "features"
    feats.mkdir()
    for name in (".S1.k2j4x9a1.part.h5", ".S1.zz_81m3q.part.h5", ".S2.k2j4x9a1.part.h5", ".S1.h5.bak",
                 ".S1.extra.k2j4x9a1.part.h5"):
        (feats / name).write_bytes(b"partial")
    live = feats / ".S1.livewrit.part.h5"
    live.write_bytes(b"writing")
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(live), ready, release))
    holder.start()
    assert ready.wait(30)
    try:
        embed(tiles, feats / "S1.h5", 16)
        assert sorted(os.listdir(feats)) == sorted([".S1.extra.k2j4x9a1.part.h5", ".S1.h5.bak",
                                                    ".S1.livewrit.part.h5", ".S2.k2j4x9a1.part.h5", "S1.h5"])
    finally:
        release.set()
        holder.join(30)
    # the writer died: its partial is an orphan now; a skipped (up-to-date) slide still cleans up
    (feats / ".S1.k2j4x9a1.part.h5").write_bytes(b"partial")
    assert embed(tiles, feats / "S1.h5", 16)["status"] == "skipped"
    assert not live.exists() and not (feats / ".S1.k2j4x9a1.part.h5").exists()

    # tiles HDF5 and QC png
    fx = bench_faults.make_slide(tmp_path / "slide")
    tdir = Path(fx["tiles"]).parent
    for name in (".T.abc12345.part.h5", ".T.abc12345.part.png"):
        (tdir / name).write_bytes(b"x")
    tile_slide(fx["slide"], str(tdir / "T.h5"), qc_png=str(tdir / "T.png"), patch_size=P, tissue_method="otsu")
    assert parts(tdir) == []

    # training: the resume file's and the state's partials
    c = bench_faults.make_cohort(tmp_path / "cohort")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("..resume.q1w2e3r4.part.pt", ".state.q1w2e3r4.part.pt", ".history.q1w2e3r4.part.parquet"):
        (run / name).write_bytes(b"x")
    train_run(model_name="abmil", model_cfg=bench_faults.MODEL_CFG, train_cfg={**bench_faults.TRAIN_CFG, "epochs": 1},
              fold=0, seed=0, text_h5=None, out_dir=str(run), **c)
    assert parts(run) == [] and (run / "state.pt").is_file()


def test_atomic_path_orphan_names_are_exact(tmp_path):
    target = tmp_path / "a.h5"
    with atomic_path(target) as tmp:
        assert orphan_pattern(target).match(tmp.name)
        assert not orphan_pattern(tmp_path / "a.png").match(tmp.name)  # same stem, other file
        assert not orphan_pattern(tmp_path / "a.b.h5").match(tmp.name)
        tmp.write_text("x")
    assert remove_orphans(tmp_path / "a.h5") == [] and target.read_text() == "x"


# ------------------------------------------------------------------------------------------- import
def _slide(tmp_path, w=3584, h=3072, mpp=0.25) -> str:
    from modaltune.demo import write_pyramid_tiff

    path = tmp_path / "slide.tif"
    if not path.exists():
        write_pyramid_tiff(str(path), np.full((h, w, 3), 240, np.uint8), mpp)
    return str(path)


def write_trident(path: Path, feats, coords, *, w=3584, h=3072, encoder="tiny", patch=256, fp0=512):
    """A file in TRIDENT's layout (datasets features + coords, geometry in the coords attrs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", data=feats, maxshape=(None, feats.shape[1]), chunks=(1, feats.shape[1]))
        d.attrs.update(name=path.stem, savetodir=str(path.parent), encoder=encoder)
        c = f.create_dataset("coords", data=coords.astype(np.int64), maxshape=(None, 2), chunks=(1, 2))
        c.attrs.update(patch_size=patch, patch_size_level0=fp0, level0_magnification=40, target_magnification=20,
                       overlap=0, name=path.stem, savetodir=str(path.parent), level0_width=w, level0_height=h)


def _metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return m


def test_import_trident_matches_embedded(tmp_path):
    """Features in our layout -> TRIDENT files -> imported: same arrays, and a model trained and evaluated
    on either gives identical metrics.json numbers."""
    from modaltune.evaluation import evaluate_run
    from modaltune.training import train_run

    slide = _slide(tmp_path)
    emb = bench_faults.make_cohort(tmp_path / "embedded", dim=64)  # the tiny encoder's width
    trident_dir = tmp_path / "trident" / "features_tiny"
    for f in emb["feature_files"]:
        with h5py.File(f, "r") as h5:
            write_trident(trident_dir / Path(f).name, h5["features"][()], h5["coords"][()])
    imported = []
    embedding = {"encoder": "tiny", "source": "import", "import_dir": str(trident_dir), "import_format": "auto",
                 "import_tiling": {"patch_size": 256, "target_mpp": 0.5}, "import_mpp": None}
    for f in emb["feature_files"]:
        out = tmp_path / "imported" / Path(f).name
        r = slide_features(str(out), embedding, imported=str(trident_dir / Path(f).name), slide_path=slide,
                           slide_id=Path(f).stem)
        assert r["status"] == "ok"
        a, b = read_features(f), read_features(out)
        for k in ("features", "coords", "coords_target"):  # coords_target re-derived as tiling does
            np.testing.assert_array_equal(a[k], b[k])
        with h5py.File(out, "r") as h5:
            assert h5.attrs["import_format"] == "trident" and h5.attrs["source"] == "import"
            assert h5.attrs["import_path"] == str(trident_dir / Path(f).name)
            assert len(h5.attrs["import_sha256"]) == 64 and h5.attrs["level0_mpp"] == 0.25
        imported.append(str(out))
    assert slide_features(str(out), embedding, imported=str(trident_dir / Path(f).name), slide_path=slide,
                          slide_id=Path(f).stem)["status"] == "skipped"  # same source: not redone

    results = {}
    for name, files in (("embedded", emb["feature_files"]), ("imported", imported)):
        c = dict(emb, feature_files=files)
        run = tmp_path / f"run_{name}"
        train_run(model_name="abmil", model_cfg=bench_faults.MODEL_CFG,
                  train_cfg={**bench_faults.TRAIN_CFG, "epochs": 2}, fold=0, seed=0, text_h5=None,
                  out_dir=str(run), **c)
        evaluate_run(run_dir=str(run), fold=0, out_metrics=str(run / "metrics.json"),
                     out_embeddings=str(run / "embeddings.npz"), **c)
        results[name] = _metrics(run)
    assert results["embedded"] == results["imported"]
    assert np.isfinite(results["imported"]["subtype_bacc"])


def test_import_wrong_dimension(tmp_path):
    slide = _slide(tmp_path)
    src = tmp_path / "trident" / "S1.h5"
    write_trident(src, np.zeros((4, 32), np.float32), np.array([[0, 0], [512, 0], [0, 512], [512, 512]]))
    with pytest.raises(InputError, match=r"S1\.h5: feature dimension 32 but encoder 'tiny' .* gives 64"):
        import_slide_features(src, tmp_path / "out" / "S1.h5", slide_path=slide, encoder="tiny")
    assert not (tmp_path / "out" / "S1.h5").exists()


def test_import_clam_and_stamp_units(tmp_path):
    slide = _slide(tmp_path)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, 64)).astype(np.float32)
    coords = np.array([[512, 512], [1024, 512], [1536, 512], [512, 1024], [1024, 1024], [1536, 1024]], np.int64)
    clam = tmp_path / "clam" / "h5_files" / "S1.h5"
    clam.parent.mkdir(parents=True)
    with h5py.File(clam, "w") as f:
        f["features"], f["coords"] = feats, coords.astype(np.int32)
    stamp = tmp_path / "stamp" / "S1.h5"
    stamp.parent.mkdir(parents=True)
    with h5py.File(stamp, "w") as f:
        f["feats"], f["coords"] = feats.astype(np.float16), coords * 0.25  # micrometres
        f.attrs.update(unit="um", tile_size_um=128.0, tile_size_px=224, extractor="tiny", feat_type="tile")
    from modaltune.feature_import import find_import_file

    assert find_import_file(tmp_path / "clam", "S1") == clam
    out = {}
    for name, src in (("clam", clam), ("stamp", stamp)):
        o = tmp_path / name / "out.h5"
        import_slide_features(src, o, slide_path=slide, encoder="tiny")
        out[name] = read_features(o)
        with h5py.File(o, "r") as h5:
            assert h5.attrs["import_format"] == name
    for name in out:
        np.testing.assert_array_equal(out[name]["coords"], coords)
        np.testing.assert_array_equal(out[name]["coords_target"], coords // 2)
    np.testing.assert_array_equal(out["clam"]["features"], feats)
    np.testing.assert_array_equal(out["stamp"]["features"], feats.astype(np.float16).astype(np.float32))


def test_import_coords_checked_against_slide(tmp_path):
    slide = _slide(tmp_path)
    feats = np.zeros((4, 64), np.float32)
    grid = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.int64)
    cases = {
        "outside": (dict(), grid * 512 + 3000, r"outside the slide \(3584 x 3072"),
        "other_scan": (dict(w=4000), grid * 512, r"level-0 size of 4000 x 3072 px but the slide is 3584 x 3072"),
        "geometry": (dict(fp0=1024), grid * 1024, r"a patch covers 1024 level-0 px .* tiling.patch_size"),
        "target_px": (dict(fp0=None), grid * 256, r"look like target-mpp pixels"),
    }
    for name, (kw, coords, msg) in cases.items():
        src = tmp_path / name / "S1.h5"
        fp0 = kw.pop("fp0", 512)
        write_trident(src, feats, coords, fp0=fp0 if fp0 else 512, **kw)
        if fp0 is None:  # CLAM-like file without geometry attrs: only the stride tells the unit
            with h5py.File(src, "a") as f:
                for k in list(f["coords"].attrs):
                    del f["coords"].attrs[k]
                del f["features"].attrs["encoder"]
        with pytest.raises(InputError, match=msg):
            import_slide_features(src, tmp_path / name / "out.h5", slide_path=slide, encoder="tiny")


def test_import_missing_file_is_a_failed_record(tmp_path):
    slide = _slide(tmp_path)
    out = tmp_path / "out" / "S9.h5"
    r = import_slide_features(None, out, slide_path=slide, slide_id="S9", encoder="tiny")
    assert r["status"] == "failed"
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "failed" and "S9" in f.attrs["error"] and f["features"].shape == (0, 64)
    from modaltune.feature_import import check_import_dir

    with pytest.raises(InputError, match="embedding.import_dir"):
        check_import_dir(tmp_path / "nope", ["S9"], [slide])
    with pytest.raises(InputError, match="no features file for any slide"):
        check_import_dir(tmp_path, ["S9"], [slide])


# ----------------------------------------------------------------------------------------- the bench
def test_bench_faults_few_trials(tmp_path, capsys):
    rows = bench_faults.main(["--trials", "3", "--seed", "1", "--workdir", str(tmp_path)])
    for r in rows:
        assert r["kills"] == 3 and r["corrupt"] == 0 and r["orphans_after_rerun"] == 0
        assert r["rerun_failed"] == 0 and r["identical"] == r["runs"] >= 3
    assert "| embed | 3 |" in capsys.readouterr().out
    # the comparison is not vacuous: a changed feature row is caught
    ref = bench_faults.features_snapshot(tmp_path / "embed_ref" / "features" / "S1.h5")
    other = {**ref, "features": ref["features"].copy()}
    other["features"][0, 0] += 1
    assert not bench_faults.same_features(other, ref)
    snap = bench_faults.train_snapshot(tmp_path / "train_ref" / "run")
    changed = dict(snap, metrics={**snap["metrics"], "subtype_bacc": -1.0})
    assert not bench_faults.same_train(changed, snap)


def test_partial_metrics_json_counts_as_corrupt(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"subtype_bacc": 0.5, ')  # truncated
    with pytest.raises(json.JSONDecodeError):  # the bench counts an unreadable final output as corrupt
        bench_faults.train_snapshot(run)


def test_import_through_shard_manifest(tmp_path):
    """The sharded DAG path (slides_per_job > 1): no tiling, per-slide features imported, manifest written."""
    from modaltune.shards import run_shard

    slide = _slide(tmp_path)
    feats = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    write_trident(tmp_path / "trident" / "A.h5", feats, np.array([[0, 0], [512, 0], [0, 512], [512, 512]]))
    emb = {"encoder": "tiny", "source": "import", "import_dir": str(tmp_path / "trident"), "import_format": "trident"}
    table = run_shard([{"slide_id": "A", "path": slide, "mpp": None}, {"slide_id": "B", "path": slide, "mpp": None}],
                      str(tmp_path / "m.tsv"), tiles_dir=str(tmp_path / "tiles"), features_dir=str(tmp_path / "f"),
                      tiling={"patch_size": 256, "target_mpp": 0.5}, embedding=emb)
    assert table.set_index("slide_id")["status"].to_dict() == {"A": "ok", "B": "failed"}  # B: no file to import
    assert not (tmp_path / "tiles").exists()
    np.testing.assert_array_equal(read_features(tmp_path / "f" / "A.h5")["features"], feats)


@pytest.mark.slow
def test_conch_v1_bundled_config_random_weights(tmp_path):
    """The optional conch-fork backend end to end: CONCH v1 built offline from the JSON config the package
    ships (ViT-B-16 CoCa), random weights saved as a checkpoint, loaded by text.encoder conch_v1 (~30 s)."""
    pytest.importorskip("conch.open_clip_custom")
    import gc
    from types import SimpleNamespace

    from conch.open_clip_custom import CoCa, get_tokenizer
    from conch.open_clip_custom.factory import CFG_DIR

    from modaltune.encoders.text import ConchTextEncoder, build_text_encoder

    cfg = json.loads((Path(CFG_DIR) / "conch_ViT-B-16.json").read_text())
    texts = ["Cancer location: breast;", "Diagnosis: invasive lobular carcinoma."]
    torch.manual_seed(0)
    ref = CoCa(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    torch.save({"state_dict": {f"text.{k}": v for k, v in ref.text.state_dict().items()}}, tmp_path / "conch.pt")
    with torch.no_grad():  # the encoder's own tokenisation, before it exists (one CoCa in memory at a time)
        expected = ref.encode_text(ConchTextEncoder.tokenize(SimpleNamespace(tokenizer=get_tokenizer()), texts))
    del ref
    gc.collect()
    enc = build_text_encoder("conch_v1", checkpoint=tmp_path / "conch.pt", device="cpu")  # bundled config
    vecs = enc.encode(texts)
    assert enc.dim == 512 and vecs.shape == (2, 512)
    np.testing.assert_allclose(vecs, expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
