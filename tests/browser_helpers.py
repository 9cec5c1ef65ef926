"""Headless-chromium rendering of a Snakemake report, shared by test_browser.py and test_e2e.py.

``render`` loads the self-contained report HTML, lets its JavaScript (React) build the page, and returns
the rendered DOM of the app, its images and a screenshot; ``check_report_page`` asserts what a reader sees
first. Not a test module: test files import from here, never from each other.
"""

from __future__ import annotations

import html.parser
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
