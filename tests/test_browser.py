"""The Snakemake report rendered in a real browser (headless Debian chromium, installed by .ci/run).

``render`` (tests/browser_helpers.py) loads the self-contained report HTML, lets its JavaScript (React)
build the page, and returns the rendered DOM of the app, its images and a screenshot. The fast test
renders a report of a tiny synthetic workflow that uses the project's report/workflow.rst;
tests/test_e2e.py renders the demo's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modaltune import aggregate as agg
from tests import report_fixtures as rf
from tests.browser_helpers import check_report_page, chromium, render

ROOT = Path(__file__).resolve().parents[1]

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
