"""Demo cohort generator: real OpenSlide-readable slides, Xena/GMT/GDC formats with their quirks, planted signal."""

from __future__ import annotations

import gzip

import numpy as np
import openslide
import pandas as pd
import pytest
from scipy import stats

from modaltune import demo
from modaltune.errors import InputError

N = 12
SLIDE_SIZE = (1280, 1024)  # small slides keep the module fixture fast; one test renders a full-size slide


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return demo.make_demo_cohort(out, n_patients=N, seed=0, slide_size=SLIDE_SIZE)


@pytest.fixture(scope="module")
def truth(cohort):
    return pd.read_csv(cohort["truth"], sep="\t")


@pytest.fixture(scope="module")
def xena(cohort):
    return pd.read_csv(cohort["rna"], sep="\t", index_col=0)


@pytest.fixture(scope="module")
def clinical(cohort):
    return pd.read_csv(cohort["clinical"], sep="\t", dtype=str, keep_default_na=False)


# --- write_pyramid_tiff ------------------------------------------------------------------------------------


def test_pyramid_tiff_opens_in_openslide_with_levels_and_mpp(tmp_path):
    rgb = np.full((2100, 2700, 3), 238, np.uint8)
    rgb[500:1500, 600:2000] = (200, 120, 170)
    path = tmp_path / "s.tiff"
    demo.write_pyramid_tiff(path, rgb, mpp=0.25)
    with openslide.OpenSlide(path) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-6)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25, rel=1e-6)
        assert s.level_dimensions == ((2700, 2100), (1350, 1050), (675, 525))
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        px = np.asarray(s.read_region((1000, 1000), 0, (8, 8)).convert("RGB")).reshape(-1, 3).mean(0)
        assert np.abs(px - (200, 120, 170)).max() < 6  # JPEG, so close rather than exact
        low = np.asarray(s.read_region((0, 0), 2, (675, 525)).convert("RGB"))
        assert np.abs(low[250, 330].astype(int) - (200, 120, 170)).max() < 8  # pyramid levels carry the image
    assert not list(tmp_path.glob(".*part*")), "temporary file left behind"


def test_pyramid_tiff_without_mpp_has_no_resolution(tmp_path):
    path = tmp_path / "nompp.tiff"
    demo.write_pyramid_tiff(path, np.full((600, 700, 3), 240, np.uint8), mpp=None)
    with openslide.OpenSlide(path) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert "openslide.mpp-x" not in s.properties
        assert s.level_count == 1


@pytest.mark.parametrize("bad", [np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.float32)])
def test_pyramid_tiff_rejects_non_rgb8(tmp_path, bad):
    with pytest.raises(InputError, match="uint8"):
        demo.write_pyramid_tiff(tmp_path / "x.tiff", bad, mpp=0.5)


def test_pyramid_tiff_rejects_bad_mpp(tmp_path):
    with pytest.raises(InputError, match="mpp"):
        demo.write_pyramid_tiff(tmp_path / "x.tiff", np.zeros((64, 64, 3), np.uint8), mpp=-1.0)


# --- sheet and layout ------------------------------------------------------------------------------------


def test_demo_sheet_equals_written_sheet_and_slides_exist(cohort):
    written = pd.read_csv(cohort["sheet"], sep="\t")
    expected = demo.demo_sheet(N, 0)
    pd.testing.assert_frame_equal(written, expected)
    assert written["mpp"].isna().all()
    for rel in written["path"]:
        assert (cohort["sheet"].parent / rel).is_file()
    assert sorted(p.name for p in cohort["slides_dir"].iterdir()) == sorted(f"{s}.tiff" for s in written["slide_id"])


def test_demo_sheet_ids_and_two_slide_patients():
    sheet = demo.demo_sheet(40, 0)
    assert sheet["patient_id"].str.fullmatch(r"TCGA-D0-A0\d\d").all()
    assert (sheet["slide_id"] == sheet["patient_id"] + "-01Z-00-DX" + sheet["slide_id"].str[-1]).all()
    per_patient = sheet.groupby("patient_id").size()
    assert len(per_patient) == 40 and per_patient.max() == 2 and (per_patient == 2).sum() == 6
    assert set(sheet.loc[sheet["slide_id"].str.endswith("DX2"), "patient_id"]) == set(per_patient[per_patient == 2].index)
    assert not demo.demo_sheet(40, 1).equals(sheet)  # the seed changes who has two slides


def test_too_few_patients_is_an_input_error():
    with pytest.raises(InputError, match="n_patients"):
        demo.demo_sheet(3, 0)


def test_cohort_slides_open_as_generic_tiff(cohort):
    sheet = demo.demo_sheet(N, 0)
    for rel in sheet["path"]:
        with openslide.OpenSlide(cohort["sheet"].parent / rel) as s:
            assert s.properties["openslide.vendor"] == "generic-tiff"
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
            w, h = s.dimensions
            assert 0.85 * SLIDE_SIZE[0] <= w <= 1.15 * SLIDE_SIZE[0]
            assert 0.85 * SLIDE_SIZE[1] <= h <= 1.15 * SLIDE_SIZE[1]


def test_full_size_demo_slide_is_a_40x_pyramid(tmp_path):
    path = tmp_path / "full.tiff"
    demo._write_slide((str(path), [0, 2, 0, 0], [0, 5, 0], 1, (4096, 3072), False))
    with openslide.OpenSlide(path) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25)
        assert s.level_count >= 3
        w, h = s.dimensions
        assert 3600 <= w <= 4600 and 2700 <= h <= 3400
        # a 0.5-mpp 256-px patch (512 level-0 px) from the middle of the tissue is mostly not background
        img = np.asarray(s.get_thumbnail((w // 8, h // 8)).convert("RGB"))
    assert 0.3 < (img.mean(-1) < 215).mean() < 0.55


def _tissue_stats(path) -> tuple[float, np.ndarray]:
    with openslide.OpenSlide(path) as s:
        w, h = s.dimensions
        img = np.asarray(s.get_thumbnail((w // 4, h // 4)).convert("RGB")).astype(float)
    tissue = img.mean(-1) < 215
    return tissue.mean(), img[tissue].mean(0)


def test_slides_have_tissue_on_light_background_and_class_colour(cohort, truth):
    sheet = demo.demo_sheet(N, 0).merge(truth[["patient_id", "class"]], on="patient_id")
    fracs, colours = [], []
    for rel in sheet["path"]:
        frac, colour = _tissue_stats(cohort["sheet"].parent / rel)
        fracs.append(frac)
        colours.append(colour)
        with openslide.OpenSlide(cohort["sheet"].parent / rel) as s:
            corner = np.asarray(s.read_region((0, 0), 0, (40, 40)).convert("RGB")).reshape(-1, 3).mean(0)
        assert ((corner > 230) & (corner < 250)).all(), corner  # light-grey background
    assert 0.28 < min(fracs) and max(fracs) < 0.55
    darkness = pd.Series(255 - np.array(colours).mean(1)).groupby(sheet["patient_id"]).mean()
    cls = sheet.groupby("patient_id")["class"].first().loc[darkness.index].to_numpy()
    # class 1: denser, larger, darker nuclei -> darker tissue on average. Patients overlap on purpose (no
    # single colour separates the classes), so 12 patients show the direction, not significance.
    assert darkness[cls == 1].mean() > darkness[cls == 0].mean() + 2


def test_class_effect_with_patient_draws_held_fixed():
    # Same seeds, only the class differs: every per-patient random draw is identical, so the difference is
    # the class effect alone: more and darker nuclear (purple) pixels in class 1.
    imgs = {c: demo._render_slide([5, 2, 0, 0], [5, 5, 0], c, (1024, 1024)).astype(float) for c in (0, 1)}
    nuclear = {c: ((img[..., 0] < 170) & (img[..., 2] > img[..., 1])).mean() for c, img in imgs.items()}
    assert nuclear[1] > 1.3 * nuclear[0]
    assert imgs[1].mean() < imgs[0].mean()


def test_planted_regions_are_recorded_and_cover_tissue(cohort, truth):
    regions = pd.read_csv(cohort["truth_regions"], sep="\t")
    assert list(regions.columns) == ["slide_id", "patient_id", "x0", "y0", "x1", "y1"]
    expected = demo.planted_slides(demo._layout(N, 0), 0)
    assert sorted(regions["slide_id"]) == expected and len(expected) == round(demo.PLANT_FRACTION * (truth["class"] == 1).sum())
    assert (truth.set_index("patient_id").loc[regions["patient_id"], "class"] == 1).all()
    for r in regions.itertuples():
        assert r.slide_id.endswith("-DX1") and r.slide_id.startswith(r.patient_id)
        assert r.x0 % demo.PLANT_GRID == 0 and r.y0 % demo.PLANT_GRID == 0 and r.x1 > r.x0 and r.y1 > r.y0
        with openslide.OpenSlide(cohort["slides_dir"] / f"{r.slide_id}.tiff") as s:
            w, h = s.dimensions
            assert r.x1 <= w and r.y1 <= h
            box = np.asarray(s.read_region((r.x0, r.y0), 0, (r.x1 - r.x0, r.y1 - r.y0)).convert("RGB"))
        assert (box.mean(-1) < 215).mean() > 0.35  # the box sits on tissue (the most-tissue grid cell; small test slides)


def test_planted_slide_has_the_class_look_only_inside_its_box():
    size, seeds = (2048, 1536), ([3, 2, 1, 0], [3, 5, 1])
    planted = demo._render_slide(*seeds, 1, size, planted=True)
    look1, look0 = demo._render_slide(*seeds, 1, size), demo._render_slide(*seeds, 0, size)
    x0, y0, x1, y1 = demo.plant_box(seeds[0], size)
    inside = np.zeros(planted.shape[:2], bool)
    inside[y0:y1, x0:x1] = True
    assert np.array_equal(planted[inside], look1[inside])
    assert np.array_equal(planted[~inside], look0[~inside])
    assert 0.1 < inside.mean() < 0.4
    assert demo.planted_slides(demo._layout(20, 0), 0, fraction=0) == []


def test_slides_are_deterministic():
    a = demo._render_slide([0, 2, 3, 0], [0, 5, 3], 1, (800, 600))
    b = demo._render_slide([0, 2, 3, 0], [0, 5, 3], 1, (800, 600))
    c = demo._render_slide([0, 2, 3, 1], [0, 5, 3], 1, (800, 600))
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


# --- tables ---------------------------------------------------------------------------------------------


def test_tables_are_deterministic_and_seed_dependent(cohort, tmp_path):
    # Tables do not depend on the slide size, so a run with tiny slides must give identical bytes.
    again = demo.make_demo_cohort(tmp_path / "a", n_patients=N, seed=0, slide_size=(256, 256), workers=1)
    other = demo.make_demo_cohort(tmp_path / "b", n_patients=N, seed=1, slide_size=(256, 256), workers=1)
    for key in ("rna", "gene_sets", "clinical", "biospecimen", "truth", "sheet"):
        assert cohort[key].read_bytes() == again[key].read_bytes(), key
    for key in ("rna", "clinical", "truth"):
        assert cohort[key].read_bytes() != other[key].read_bytes(), key


def test_xena_matrix_format_and_quirks(cohort, xena, truth):
    with gzip.open(cohort["rna"], "rt") as fh:
        header = fh.readline().rstrip("\n").split("\t")
    assert header[0] == "sample"
    assert all(c.count("-") == 3 and c.startswith("TCGA-D0-A") for c in header[1:])
    assert 590 <= len(xena) <= 610
    assert xena.index.str.startswith("?|").sum() >= 3
    assert xena.index.duplicated().sum() == 2
    assert "IL8" in xena.index and "CXCL8" not in xena.index
    assert (xena.to_numpy() >= 0).all() and xena.to_numpy().max() < 25  # log2(RSEM + 1) range

    samples = list(xena.columns)
    patients = {s.rsplit("-", 1)[0] for s in samples}
    assert patients == set(truth.loc[truth["has_rna"], "patient_id"])
    assert (~truth["has_rna"]).sum() >= 1
    normals = [s for s in samples if s.endswith("-11")]
    assert normals, "some patient must have a normal-tissue sample"
    for s in normals:
        tumour = s[:-3] + "-01"
        assert samples.index(s) < samples.index(tumour), "normal sample must come before its tumour sample"
    only02 = [p for p in patients if f"{p}-02" in samples]
    assert len(only02) == 1 and f"{only02[0]}-01" not in samples


def _tumour_matrix(xena: pd.DataFrame) -> pd.DataFrame:
    x = xena[~xena.index.duplicated()]
    cols = [c for c in x.columns if not c.endswith("-11")]
    x = x[cols]
    x.columns = [c.rsplit("-", 1)[0] for c in cols]
    return x


def test_rna_planted_class_and_risk_signal(xena, truth):
    x = _tumour_matrix(xena)
    t = truth.set_index("patient_id").loc[x.columns]
    cdh1 = x.loc[demo.SIGNAL_GENE]
    res = stats.ttest_ind(cdh1[t["class"].to_numpy() == 0], cdh1[t["class"].to_numpy() == 1])
    assert res.statistic > 0 and res.pvalue < 0.01  # CDH1 down in class 1 (lobular)
    prolif = demo._gene_sets()[demo.SIGNAL_RISK]
    z = x.loc[prolif].sub(x.loc[prolif].mean(1), axis=0).div(x.loc[prolif].std(1), axis=0).mean()
    assert np.corrcoef(z, t["risk"])[0, 1] > 0.6
    # a pathway without planted signal does not track risk that well
    other = demo._gene_sets()["HALLMARK_DEMO_P53_PATHWAY"]
    z_other = x.loc[other].sub(x.loc[other].mean(1), axis=0).div(x.loc[other].std(1), axis=0).mean()
    assert abs(np.corrcoef(z_other, t["risk"])[0, 1]) < np.corrcoef(z, t["risk"])[0, 1]


def test_gmt_format(cohort, xena):
    lines = cohort["gene_sets"].read_text().splitlines()
    sets = {f[0]: f[2:] for f in (line.split("\t") for line in lines)}
    assert 20 <= len(sets) <= 30
    assert all(n.startswith(("HALLMARK_DEMO_", "REACTOME_DEMO_")) for n in sets)
    assert all(5 <= len(g) <= 41 for g in sets.values())
    assert any("CXCL8" in g for g in sets.values())
    members = [g for genes in sets.values() for g in genes]
    assert len(members) > len(set(members))  # genes shared between pathways
    absent = set(members) - set(xena.index) - {"CXCL8"}
    assert 1 <= len(absent) <= 5


def test_clinical_gdc_flat_export(clinical, truth):
    assert {"case_id", "case_submitter_id", "project_id", "age_at_index", "vital_status", "days_to_death",
            "days_to_last_follow_up", "ajcc_pathologic_stage", "ajcc_pathologic_t", "ajcc_pathologic_n",
            "ajcc_pathologic_m", "primary_diagnosis", "year_of_diagnosis", "treatment_type"} <= set(clinical.columns)
    assert (clinical == "'--").any().any()
    assert (clinical["ajcc_pathologic_stage"] == "'--").any()
    assert clinical["case_id"].duplicated().any()
    dup = clinical[clinical["case_id"].duplicated(keep=False)]
    assert dup.groupby("case_id")["treatment_type"].nunique().eq(2).all()  # one row per treatment
    assert (clinical["project_id"] == "TCGA-BRCA").all()
    assert clinical["case_id"].str.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}").all()

    first = clinical.drop_duplicates("case_submitter_id").set_index("case_submitter_id").loc[truth["patient_id"]]
    dead = truth["event"].to_numpy() == 1
    assert (first["vital_status"].to_numpy() == np.where(dead, "Dead", "Alive")).all()
    assert (first["days_to_death"].to_numpy()[dead] == truth["time_days"].astype(str).to_numpy()[dead]).all()
    alive_fu = first["days_to_last_follow_up"].to_numpy()[~dead]
    assert (alive_fu == truth["time_days"].astype(str).to_numpy()[~dead]).all()
    assert (first["days_to_death"].to_numpy()[~dead] == "'--").all()
    diag = first["primary_diagnosis"].to_numpy()
    expected = np.where(truth["class"] == 1, "Lobular carcinoma, NOS", "Infiltrating duct carcinoma, NOS")
    muc = truth["label"].to_numpy() == -1
    assert muc.sum() >= 1 and (diag[muc] == "Mucinous adenocarcinoma").all()
    assert (diag[~muc] == expected[~muc]).all()


def test_biospecimen_slides_match_sheet_and_cases(cohort, clinical):
    slides = pd.read_csv(cohort["biospecimen"], sep="\t", dtype=str)
    sheet = demo.demo_sheet(N, 0)
    dx = slides[slides["slide_submitter_id"].str.contains("-DX")]
    assert sorted(dx["slide_submitter_id"]) == sorted(sheet["slide_id"])
    assert slides["slide_id"].is_unique
    case_of = dict(zip(clinical["case_submitter_id"], clinical["case_id"], strict=False))
    assert (slides["case_id"] == slides["case_submitter_id"].map(case_of)).all()


def test_survival_follows_the_planted_hazard():
    from lifelines import CoxPHFitter

    lay = demo._layout(3000, 7)
    censored = 1 - lay["event"].mean()
    assert abs(censored - demo.CENSOR_FRACTION) < 0.04
    cph = CoxPHFitter().fit(lay[["time_days", "event", "class", "risk"]], "time_days", "event")
    assert cph.params_["class"] == pytest.approx(demo.B_CLASS, abs=0.15)
    assert cph.params_["risk"] == pytest.approx(demo.B_RISK, abs=0.1)
    assert (lay["time_days"] >= 1).all()
