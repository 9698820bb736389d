"""One self-contained HTML report of an experiment, and the JSON of its headline numbers.

    sections = [Section("toxicity", figures=result.figures(), numbers=result.summary())]
    write_report("results/demo/report.html", "demo", sections, provenance=record)
    write_headline_json("results/demo/results.json", "demo", sections, provenance=record)

The HTML carries plotly.js inline (no CDN: it opens on an offline machine, from a file or an
e-mail attachment); every figure is one ``div.plotly-graph-div`` drawn by ``Plotly.newPlot``.
Layout: title and provenance line, what was found in words (each section's findings, every
verdict marked CLEARS or does NOT clear), the headline numbers of every section as a table, then
one section per analysis with its numbers and its figures, then the full provenance record.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline

from microscope.analysis.controls import split_controls

FIGURE_HEIGHT = 460  # px, for figures that do not set their own height
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass
class Section:
    """One analysis in a report: its headline numbers (flat dict), figures, its findings in words
    (`Result.findings`), optional notes, and optional HTML of its own (e.g. the searchable feature
    dashboards), shown after the figures."""

    title: str
    figures: Sequence[go.Figure] = ()
    numbers: Mapping[str, object] = field(default_factory=dict)
    notes: str = ""
    html: str = ""
    findings: Sequence[str] = ()


def figure_title(fig: go.Figure) -> str:
    """The figure's own title text ('' when it has none)."""
    return str(fig.layout.title.text or "")


def jsonable(value):
    """`value` with numpy/torch scalars and arrays turned into plain Python (for json.dumps);
    NaN and infinities become None (JSON has no such numbers)."""
    if hasattr(value, "tolist"):          # numpy arrays and scalars, torch tensors
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def headline(sections: Sequence[Section]) -> dict[str, dict]:
    """{section title: its numbers}, JSON-ready."""
    return {s.title: jsonable(dict(s.numbers)) for s in sections}


def write_headline_json(path: str | Path, title: str, sections: Sequence[Section], *,
                        provenance: Mapping | None = None, extra: Mapping | None = None) -> Path:
    """Write {"experiment", "findings", "headline", "figures", "provenance", **extra} as indented
    JSON (findings: {section: [sentences]})."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"experiment": title, "findings": {s.title: list(s.findings) for s in sections if s.findings},
              "headline": headline(sections),
              "figures": [{"section": s.title, "title": figure_title(f)} for s in sections for f in s.figures],
              "provenance": jsonable(dict(provenance or {})), **jsonable(dict(extra or {}))}
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def render_report(title: str, sections: Sequence[Section], *, provenance: Mapping | None = None,
                  subtitle: str = "") -> str:
    """The report as one HTML string (plotly.js inline)."""
    provenance = jsonable(dict(provenance or {}))
    body = [f"<header><h1>{html.escape(title)}</h1>",
            f"<p class='sub'>{html.escape(subtitle)}</p>" if subtitle else "",
            f"<p class='prov'>{html.escape(_provenance_line(provenance))}</p></header>",
            "<nav>" + " · ".join(f"<a href='#{_anchor(s.title)}'>{html.escape(s.title)}</a>"
                                 for s in sections) + "</nav>",
            _findings(sections), "<h2>Headline numbers</h2>", _headline_table(sections)]
    n = 0
    for section in sections:
        body.append(f"<section id='{_anchor(section.title)}'><h2>{html.escape(section.title)}</h2>")
        if section.notes:
            body.append(f"<p>{html.escape(section.notes)}</p>")
        body.append(_numbers_list(section.numbers))
        for fig in section.figures:
            n += 1
            body.append("<div class='figure'>" + _figure_div(fig, f"figure-{n}") + "</div>")
        body.append(section.html)
        body.append("</section>")
    body.append("<h2>Provenance</h2><pre class='provenance'>"
                + html.escape(json.dumps(provenance, indent=2)) + "</pre>")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head>"
            f"<body>{''.join(body)}</body></html>\n")


def write_report(path: str | Path, title: str, sections: Sequence[Section], *,
                 provenance: Mapping | None = None, subtitle: str = "") -> Path:
    """Write `render_report(...)` to `path` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(title, sections, provenance=provenance, subtitle=subtitle), encoding="utf-8")
    return path


def _figure_div(fig: go.Figure, div_id: str) -> str:
    height = fig.layout.height or FIGURE_HEIGHT
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOTLY_CONFIG,
                       default_width="100%", default_height=f"{height}px")


def _anchor(title: str) -> str:
    return "s-" + "".join(c if c.isalnum() else "-" for c in title.lower())


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_format(v) for v in value[:8])
        return f"[{shown}{', …' if len(value) > 8 else ''}]"
    return str(value)


def _scalars(numbers: Mapping) -> dict:
    return {k: v for k, v in jsonable(dict(numbers)).items() if not isinstance(v, (dict, list))}


def _headline_table(sections: Sequence[Section]) -> str:
    """One card per section with its scalar numbers, each beside its control where it has one."""
    cards = []
    for s in sections:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td class='num'>{html.escape(_format(v))}</td>"
                       f"<td class='control'>{html.escape(c)}</td></tr>"
                       for k, v, c in split_controls(_scalars(s.numbers)))
        cards.append(f"<div class='card'><h3><a href='#{_anchor(s.title)}'>{html.escape(s.title)}</a></h3>"
                     f"<table class='headline'>{rows}</table></div>")
    return f"<div class='cards'>{''.join(cards)}</div>"


CLEARS, NOT_CLEAR = "CLEARS", "does NOT clear"   # the verdicts `Controlled.sentence` writes


def _findings(sections: Sequence[Section]) -> str:
    """"What was found": each section's sentences, the verdicts drawn so that none is missed."""
    lines = []
    for s in sections:
        for sentence in s.findings:
            text = html.escape(sentence)
            text = text.replace(NOT_CLEAR, f"<b class='fails'>{NOT_CLEAR}</b>").replace(
                CLEARS, f"<b class='clears'>{CLEARS}</b>")
            kind = "fails" if NOT_CLEAR in sentence else "clears" if CLEARS in sentence else "plain"
            lines.append(f"<li class='{kind}'><a href='#{_anchor(s.title)}'>{html.escape(s.title)}</a>: {text}</li>")
    return f"<h2>What was found</h2><ul class='findings'>{''.join(lines)}</ul>" if lines else ""


def _numbers_list(numbers: Mapping) -> str:
    items = jsonable(dict(numbers))
    if not items:
        return ""
    return "<dl class='numbers'>" + "".join(
        f"<div><dt>{html.escape(k)}</dt><dd>{html.escape(_format(v) if not isinstance(v, dict) else json.dumps(v))}"
        f"{f'<small>{html.escape(c)}</small>' if c else ''}</dd></div>" for k, v, c in split_controls(items)) + "</dl>"


def _provenance_line(p: Mapping) -> str:
    commit = (p.get("git_commit") or "no git")[:10] + (" (modified)" if p.get("git_dirty") else "")
    weights = (p.get("weights_hash") or "-")[:19]
    return (f"model {p.get('model')} · weights {weights} · seed {p.get('seed')} · commit {commit} · "
            f"{p.get('created', '')}")


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1180px; padding: 24px 32px 64px; color: #1f2933; background: #fafbfc; }
header h1 { margin-bottom: 4px; } .sub, .prov { color: #52606d; margin: 2px 0; font-size: 14px; }
nav { margin: 16px 0; font-size: 15px; } nav a { color: #2463eb; text-decoration: none; }
h2 { border-bottom: 1px solid #d9e2ec; padding-bottom: 4px; margin-top: 40px; }
section { background: #fff; border: 1px solid #e4e7eb; border-radius: 8px; padding: 4px 20px 16px;
          margin: 24px 0; }
section h2 { border: none; margin-top: 16px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid #e4e7eb; border-radius: 8px; padding: 8px 14px; }
.card h3 { margin: 4px 0 6px; font-size: 15px; } .card h3 a { color: #1f2933; text-decoration: none; }
table.headline { border-collapse: collapse; font-size: 13px; width: 100%; }
table.headline td { border-bottom: 1px solid #f0f2f4; padding: 2px 4px; text-align: left; }
td.num { font-variant-numeric: tabular-nums; text-align: right; }
td.control { color: #52606d; font-size: 12px; }
dl.numbers { display: flex; flex-wrap: wrap; gap: 8px; margin: 8px 0 16px; }
dl.numbers div { background: #f0f4f8; border-radius: 6px; padding: 6px 10px; font-size: 13px; }
dl.numbers dt { color: #52606d; } dl.numbers dd { margin: 0; font-weight: 600; }
dl.numbers small { display: block; font-weight: 400; color: #52606d; }
.figure { margin: 12px 0; }
ul.findings { list-style: none; padding: 0; font-size: 15px; }
ul.findings li { margin: 6px 0; padding: 6px 10px; border-radius: 6px; border-left: 5px solid #9aa5b1; background: #fff; }
ul.findings li.clears { border-left-color: #2f9e44; } ul.findings li.fails { border-left-color: #e03131; }
ul.findings a { color: #1f2933; font-weight: 600; text-decoration: none; }
b.clears { color: #2f9e44; } b.fails { color: #e03131; text-transform: uppercase; }
pre.provenance { background: #fff; border: 1px solid #e4e7eb; padding: 12px; font-size: 12px; overflow-x: auto; }
"""
