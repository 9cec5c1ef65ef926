"""The Snakemake report rendered in a real browser (headless Debian chromium, installed by .ci/run).

``render`` loads the self-contained report HTML, lets its JavaScript (React) build the page, and returns
the rendered DOM of the app, its images and a screenshot. The fast test renders a report of a tiny
synthetic workflow that uses the project's report/workflow.rst; tests/test_e2e.py renders the demo's.
"""

from __future__ import annotations

import html.parser
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modaltune import aggregate as agg
from tests import report_fixtures as rf

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium; .ci/run installs it)")


class _AppParser(html.parser.HTMLParser):
    """Text and <img> tags inside <div id="app"> (the rendered page, not the embedded JS data)."""

    def __init__(self):
        super().__init__()
        self.depth, self.text, self.images = 0, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0 and tag == "div" and a.get("id") == "app":
            self.depth = 1
            return
        if self.depth:
            if tag in ("script", "style"):
                self.depth += 1000  # skip their text
            if tag == "img":
                self.images.append(a)
            if tag not in ("img", "br", "hr", "meta", "link", "input", "path", "circle", "rect", "line"):
                self.depth += 1

    def handle_endtag(self, tag):
        if self.depth:
            if tag in ("script", "style"):
                self.depth -= 1000
            if tag not in ("img", "br", "hr", "meta", "link", "input", "path", "circle", "rect", "line"):
                self.depth -= 1

    def handle_data(self, data):
        if 0 < self.depth < 1000:
            self.text.append(data)


def render(report_html: Path, out_dir: Path, size=(1400, 2600)) -> dict:
    """Headless chromium: rendered DOM (after the report's JS ran) and a screenshot."""
    exe = chromium()
    url = Path(report_html).resolve().as_uri()
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage",
              f"--user-data-dir={out_dir / 'chromium-profile'}", "--virtual-time-budget=15000",
              f"--window-size={size[0]},{size[1]}"]
    dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-3000:]
    shot = out_dir / "report.png"
    res = subprocess.run(common + [f"--screenshot={shot}", url], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and shot.exists(), res.stderr[-3000:]
    p = _AppParser()
    p.feed(dom.stdout)
    return {"text": " ".join(" ".join(p.text).split()), "images": p.images, "screenshot": shot}


def non_blank(png: Path) -> float:
    a = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    _, counts = np.unique(a, axis=0, return_counts=True)
    return 1 - counts.max() / len(a)


def check_report_page(page: dict, *, heatmap: bool) -> None:
    """What a reader sees first: the task tables, a Kaplan-Meier plot and (when drawn) a heatmap."""
    text = page["text"]
    for needle in ("ModalTune comparison report", "Subtype: balanced accuracy", "Survival: C-index", "Overall",
                   "modaltune", "Linear probes of every embedding"):
        assert needle in text, f"{needle!r} not on the rendered page: {text[:2000]}"
    imgs = [i for i in page["images"] if str(i.get("src", "")).startswith("data:image/png")]
    alts = [i.get("alt", "") for i in imgs]
    assert any(a.startswith("Kaplan-Meier") for a in alts), alts
    if heatmap:
        assert any(a.startswith("heatmap") for a in alts), alts
    assert len(imgs) >= 1 + heatmap
    # the page is drawn (tables, plots), not a blank or "Loading..." screen
    assert "Loading Snakemake Report" not in text
    assert non_blank(page["screenshot"]) > 0.05


SNAKEFILE = """
from modaltune.report_rst import register_directives

register_directives()


report: "report/workflow.rst"


rule all:
    input:
        "results/demo/tables/summary.html",
        "results/demo/plots/km.png",
        "results/demo/heatmaps/abmil/S1.png",


rule publish:
    output:
        html=report("results/demo/tables/summary.html", category="Tables"),
        km=report("results/demo/plots/km.png", category="Survival"),
        heat=report("results/demo/heatmaps/abmil/S1.png", category="Heatmaps"),
    shell:
        "cp stage/summary.html {output.html} && cp stage/km.png {output.km} && cp stage/heat.png {output.heat}"
"""


def test_report_front_page_renders_tables_km_and_heatmap_in_chromium(tmp_path):
    chromium()
    work = tmp_path / "wf"
    shutil.copytree(ROOT / "report", work / "report")
    (work / "Snakefile").write_text(SNAKEFILE)
    files = rf.write_cohort(tmp_path / "runs")
    agg.aggregate(files, tmp_path / "agg", prediction_files=[str(Path(f).with_name("predictions.parquet"))
                                                             for f in files])
    stage = work / "stage"
    stage.mkdir()
    shutil.copy(tmp_path / "agg/tables/summary.html", stage / "summary.html")
    shutil.copy(tmp_path / "agg/plots/km.png", stage / "km.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.imshow(np.random.default_rng(0).random((20, 30)), cmap="inferno")
    fig.savefig(stage / "heat.png")
    plt.close(fig)
    sm = [sys.executable, "-m", "snakemake"]
    res = subprocess.run(sm + ["-c1"], cwd=work, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run(sm + ["--report", "report.html"], cwd=work, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    # self-contained: the page still shows its images away from the results folder
    moved = tmp_path / "elsewhere" / "report.html"
    moved.parent.mkdir()
    shutil.move(work / "report.html", moved)
    page = render(moved, tmp_path)
    check_report_page(page, heatmap=True)
    assert "abmil" in page["text"] and "head" in page["text"]  # a row with its metric source


def test_check_report_page_fails_on_a_page_without_results(tmp_path):
    chromium()
    (tmp_path / "empty.html").write_text("<html><body><div id='app'><p>Loading Snakemake Report...</p></div>"
                                         "</body></html>")
    page = render(tmp_path / "empty.html", tmp_path, size=(400, 300))
    with pytest.raises(AssertionError):
        check_report_page(page, heatmap=False)
