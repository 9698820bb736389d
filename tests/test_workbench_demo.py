"""The README's main-job command, run exactly as written: it writes the report and the JSON of
headline numbers, with every study's numbers and figures in them, and says where they are; the
report, opened in headless Chromium, draws every figure with no console error and fetches nothing
from the network (a full-page screenshot is kept in ci-artifacts/). One file, so the demo runs once
per session even when the suite runs in several processes."""

from __future__ import annotations

import json

import pytest
from browser import chromium_path, in_ci, open_in_chromium
from workbench_demo import ROOT, demo_run, main_job_command, readme_commands

STUDIES = ("toxicity", "repetition", "instructions", "arithmetic")


def test_the_readme_starts_with_the_main_job_then_the_tests():
    assert readme_commands()[:2] == ["make demo", "make test"]
    assert main_job_command() == "make demo"


def test_the_readme_main_job_writes_the_report_and_headline_json():
    run = demo_run()
    assert run.returncode == 0, run.output[-4000:]
    assert run.report is not None and run.report.is_file(), f"no report path printed:\n{run.output[-2000:]}"
    assert run.results is not None and run.results.is_file(), f"no results path printed:\n{run.output[-2000:]}"
    record = run.record()
    assert record["experiment"] == "demo"
    headline = record["headline"]
    dump = headline["activation dump"]
    assert dump["prompts"] == sum(1 for _ in open(ROOT / "microscope/data/prompts/demo.jsonl")) and dump["tokens"] > 0
    assert (ROOT / dump["store"]).is_dir(), "the dump's store is under activations/"
    assert dump["store"].startswith("activations/")
    for study in STUDIES:
        assert headline.get(study), f"no headline numbers for {study}"
        assert any(f["section"] == study for f in record["figures"]), f"no figure for {study}"
        said = record["findings"][study]     # what was found, in words, every verdict spelled out
        assert said and all(("CLEARS its control" in s) != ("does NOT clear its control" in s)
                            for s in said if "control" in s), said
    html = run.report.read_text(encoding="utf-8")
    assert html.index("What was found") < html.index("Headline numbers")
    assert html.count('class="plotly-graph-div"') == len(record["figures"])
    for figure in record["figures"]:  # titles sit in the plotly JSON, with <, >, & escaped
        encoded = json.dumps(figure["title"])[1:-1]
        for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
            encoded = encoded.replace(char, escape)
        assert figure["title"] and encoded in html, figure["title"]
    prov = record["provenance"]
    assert prov["command"] == "microscope demo" and prov["model"] == "organism"
    assert prov["weights_hash"].startswith("sha256:")


def test_the_dumped_store_opens_and_matches_the_reported_numbers():
    import microscope as ms

    run = demo_run()
    assert run.returncode == 0, run.output[-4000:]
    dump = run.record()["headline"]["activation dump"]
    store = ms.open_store(str(ROOT / dump["store"]))
    assert store.is_complete and store.n_prompts == dump["prompts"] and store.n_tokens == dump["tokens"]
    assert "blocks.0.hook_resid_post" in store


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
