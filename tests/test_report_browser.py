"""`uwe report` pages opened in real headless Chromium: every thumbnail loads, the map and the
histograms render, the console stays clean, and screenshots are taken.

Set UWE_SCREENSHOTS=DIR to keep the screenshots (docs/images holds the ones the docs show).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import missing_integration
from handoff_pools import classification_pool, detection_pool, region_pool
from typer.testing import CliRunner

from uwe_cli.batch import read_batch
from uwe_cli.cli import app

pytestmark = pytest.mark.integration
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], env={"UWE_NO_PROGRESS": "1"})


@pytest.fixture(scope="module")
def browser():
    from integrations.browser import Browser, chromium_path

    if chromium_path() is None:
        missing_integration("chromium is not installed (apt-get install chromium, or `make chromium`)")
    with Browser(1280, 1000) as b:
        yield b


@pytest.mark.parametrize(
    "kind,make,budget",
    [
        ("classification", classification_pool, 12),
        ("regions", region_pool, 10),
        ("detection", detection_pool, 6),
    ],
)
def test_report_renders_in_chromium(browser, tmp_path, kind, make, budget):
    fx = make(tmp_path)
    batch = tmp_path / "batch.csv"
    assert invoke("select", fx.pool, "--budget", budget, "--out", batch, "-q").exit_code == 0
    labeled = tmp_path / "labeled.txt"
    picked = read_batch(batch).ids
    labeled.write_text("\n".join([i for i in fx.ids if i not in picked][:2]) + "\n")
    html = tmp_path / "report.html"
    result = invoke("report", batch, "--pool", fx.pool, "--labeled", labeled, "--out", html, "-q")
    assert result.exit_code == 0, result.output

    page = browser.open(html)
    assert page.js("document.querySelectorAll('img.thumb').length") == len(picked)
    assert page.js("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length") == 0
    alts = page.js("[...document.querySelectorAll('img.thumb')].map(i => i.alt)")
    assert alts == [f"#{k + 1} {i}" for k, i in enumerate(picked)]
    # the map: every point drawn, in three colours, on a canvas that is not blank
    assert int(page.js("document.getElementById('map').dataset.drawn")) == len(fx.ids)
    colours = page.js(
        """(() => { const c = document.getElementById('map'), ctx = c.getContext('2d');
        const d = ctx.getImageData(0, 0, c.width, c.height).data, seen = new Set();
        for (let i = 0; i < d.length; i += 4) seen.add(d[i] + ',' + d[i+1] + ',' + d[i+2]);
        return ['228,50,43', '47,111,222', '184,188,196'].filter(k => seen.has(k)).length; })()"""
    )
    assert colours == 3
    # histograms: 2 × 30 bars laid out with a size, and some of them tall
    bars = page.js(
        "[...document.querySelectorAll('svg.hist rect.bar')].map(r => r.getBoundingClientRect().height)"
    )
    assert len(bars) == 60 and sum(h > 1 for h in bars) >= 4
    if kind == "detection":
        assert page.js("document.querySelectorAll('.frame svg rect.rep').length") > 0
    if kind == "regions":
        assert page.js("document.querySelectorAll('.frame svg rect.region').length") == len(picked)
    top = page.screenshot(tmp_path / f"report-{kind}.png")
    grid = page.screenshot(tmp_path / f"report-{kind}-grid.png", ".grid")
    assert top.stat().st_size > 10_000 and grid.stat().st_size > 10_000
    assert page.errors() == []
    keep = os.environ.get("UWE_SCREENSHOTS")
    if keep:
        for shot in (top, grid):
            shutil.copy(shot, Path(keep) / shot.name)


def test_console_errors_are_caught(browser, tmp_path):
    """The check above would see a broken page: an uncaught exception and a console.error."""
    page_file = tmp_path / "broken.html"
    page_file.write_text(
        "<html><body><script>console.error('boom'); undefined_function();</script></body></html>"
    )
    errors = browser.open(page_file).errors()
    assert any("boom" in e for e in errors) and any("undefined_function" in e for e in errors)
