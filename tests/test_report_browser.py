"""The main job's HTML report in headless Chromium: no console errors, nothing fetched from the
network, every plotly figure drawn; a full-page screenshot is kept in ci-artifacts/."""

from __future__ import annotations

import pytest
from browser import chromium_path, in_ci, open_in_chromium
from workbench_demo import ROOT, demo_run

ARTIFACTS = ROOT / "ci-artifacts"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        if in_ci():
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI requires it")
    return path


def test_the_demo_report_draws_every_figure_without_console_errors(chromium):
    run = demo_run()
    assert run.returncode == 0, run.output[-4000:]
    expected = len(run.record()["figures"])
    page = open_in_chromium(run.report, screenshot=ARTIFACTS / "demo_report.png",
                            first_screen=ARTIFACTS / "demo_report_top.png")
    assert page.console_errors == []
    assert page.external_requests == [], "the report must not fetch anything (offline machines)"
    assert page.figures == expected > 0
    assert page.missing == [], f"figures not drawn: {page.missing}"
    assert page.screenshot.stat().st_size > 50_000


def test_a_broken_page_is_caught(chromium, tmp_path):
    """The check itself can fail: a script error, a fetch and an undrawn figure are all reported."""
    page_file = tmp_path / "broken.html"
    page_file.write_text("<html><body><div class='plotly-graph-div' id='f1'></div>"
                         "<script>console.error('boom'); undefined_function();</script>"
                         "<img src='http://127.0.0.1:9/x.png'></body></html>")
    page = open_in_chromium(page_file, timeout=5)
    assert any("boom" in e for e in page.console_errors)
    assert any("undefined_function" in e for e in page.console_errors)
    assert page.external_requests == ["http://127.0.0.1:9/x.png"]
    assert page.figures == 1 and page.missing == ["f1"]
