"""The HTML report and headline JSON: self-contained, one drawn div per figure, numbers kept exact."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import plotly
import plotly.offline
import torch

from microscope.provenance import FIELDS, provenance
from microscope.workbench.report import Section, jsonable, render_report, write_headline_json, write_report
from microscope.viz.figures import head_grid, line_plot


def sections() -> list[Section]:
    probe = line_plot({"test accuracy": [0.5, 0.75, 1.0]}, x=["embed", "L0", "L1"], title="probe accuracy by layer")
    grid = head_grid(torch.tensor([[0.1, 0.9], [0.2, 0.3]]), title="induction score")
    return [Section("toxicity", figures=[probe], numbers={"probe_accuracy": 0.75, "layers": [0, 1]}),
            Section("repetition", figures=[grid], numbers={"loop_rate": np.float32(0.5), "best": "L0H1"},
                    notes="loops <b>")]


def test_report_is_self_contained_with_plotly_inline_and_one_div_per_figure():
    html = render_report("demo", sections(), provenance={"model": "organism", "seed": 0})
    assert html.startswith("<!DOCTYPE html>")
    assert plotly.offline.get_plotlyjs() in html, "plotly.js must be inlined (the machines are offline)"
    assert not re.search(r"<script[^>]+src=", html), "no external scripts"
    assert html.count('class="plotly-graph-div"') == 2
    assert html.count("Plotly.newPlot") == 2
    assert "probe accuracy by layer" in html and "induction score" in html
    assert "loops &lt;b&gt;" in html, "text is escaped"


def test_headline_cards_list_every_scalar_number_of_every_section():
    html = render_report("demo", sections())
    cards = html[html.index("<div class='cards'>"):html.index("<section")]
    assert cards.count("<div class='card'>") == 2
    assert cards.count("<tr>") == 3  # probe_accuracy, loop_rate, best (lists stay in the JSON)
    assert ">0.75<" in cards and ">L0H1<" in cards and ">0.5<" in cards


def test_headline_json_keeps_numbers_figures_and_provenance(tmp_path):
    record = provenance(None, seed=7, command="microscope demo")
    path = write_headline_json(tmp_path / "r.json", "demo", sections(), provenance=record, extra={"purpose": "x"})
    data = json.loads(path.read_text())
    assert data["experiment"] == "demo" and data["purpose"] == "x"
    assert data["headline"]["toxicity"] == {"probe_accuracy": 0.75, "layers": [0, 1]}
    assert data["headline"]["repetition"]["loop_rate"] == 0.5
    assert data["figures"] == [{"section": "toxicity", "title": "probe accuracy by layer"},
                               {"section": "repetition", "title": "induction score"}]
    assert set(FIELDS) <= set(data["provenance"]) and data["provenance"]["seed"] == 7


def test_jsonable_turns_arrays_tensors_and_non_finite_numbers_into_plain_json():
    value = {"a": np.arange(3), "b": torch.tensor([1.5]), "c": np.float64("nan"), "d": (1, math.inf), 2: None}
    assert jsonable(value) == {"a": [0, 1, 2], "b": [1.5], "c": None, "d": [1, None], "2": None}
    json.dumps(jsonable(value), allow_nan=False)


def test_write_report_creates_parent_folders(tmp_path):
    path = write_report(tmp_path / "a" / "b" / "report.html", "t", sections())
    assert path.is_file() and path.read_text().count("plotly-graph-div") >= 2


def test_provenance_records_versions_commit_and_command():
    record = provenance(None, seed=1, command="microscope run x.toml")
    assert set(record) == set(FIELDS)
    assert record["command"] == "microscope run x.toml" and record["seed"] == 1
    assert record["packages"]["plotly"] == plotly.__version__
    assert record["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", record["git_commit"])


def test_a_number_with_a_control_is_shown_beside_it_in_one_row(tmp_path):
    from microscope.analysis.controls import Controlled
    from microscope.workbench.report import Section, render_report
    numbers = {**Controlled(0.91, (0.05, 0.11, 0.08, 0.07, 0.09), "random init x5").headline("top_induction_score"),
               **Controlled(0.04, (0.08, 0.12), "random init x2").headline("weak_claim"), "loop_rate": 0.5}
    page = render_report("controls", [Section("repetition", numbers=numbers)])
    assert "random init x5: 5 draws, mean 0.08, sd 0.02236, max 0.11, needs a gap of 0.091 · clears" in page
    assert "random init x2: 2 draws, mean 0.1, sd 0.02828, max 0.12, needs a gap of 1.082 · does NOT clear" in page
    assert "top_induction_score_control_mean" not in page      # folded into the value's row
    assert "loop_rate" in page


def test_what_was_found_opens_the_report_in_words_with_every_verdict_marked(tmp_path):
    """Each section's findings come first, one line each, "CLEARS" and "does NOT clear" drawn in
    their own colours; the JSON keeps the same sentences."""
    from microscope.analysis.controls import Controlled
    strong = Controlled(3.54, (0.2, 0.6, 0.3, 0.1, 0.4), "zero-ablating random other heads x5")
    weak = Controlled(0.05, (0.0, 0.1, 0.02), "random init x3")
    said = [strong.sentence("cue head L0H2: zeroing it drops the insult log-odds by", " nats"),
            weak.sentence("held-out subtractions are answered correctly at a rate of")]
    assert said[0] == ("cue head L0H2: zeroing it drops the insult log-odds by 3.54 nats; zero-ablating random other "
                       "heads x5: up to 0.6 nats (mean 0.32, 5 draws), so it CLEARS its control")
    assert said[1].endswith("so it does NOT clear its control")
    page = render_report("findings", [Section("toxicity", findings=said[:1]), Section("arithmetic", findings=said[1:])])
    found = page.index("What was found")
    assert found < page.index("Headline numbers")
    assert "<li class='clears'><a href='#s-toxicity'>toxicity</a>: cue head L0H2" in page
    assert "so it <b class='clears'>CLEARS</b> its control" in page
    assert "<li class='fails'><a href='#s-arithmetic'>arithmetic</a>" in page
    assert "so it <b class='fails'>does NOT clear</b> its control" in page
    record = json.loads(write_headline_json(tmp_path / "r.json", "x", [Section("toxicity", findings=said[:1])]).read_text())
    assert record["findings"] == {"toxicity": said[:1]}
