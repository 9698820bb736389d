"""The notebooks: committed without outputs, and each runs top to bottom on the organism in a real
Jupyter kernel (nbclient, the engine nbmake uses), in well under 2 minutes."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
REQUIRED = {"quickstart", "activation_store", "toxicity", "repetition", "instructions", "arithmetic"}


def execute(book: nbformat.NotebookNode, timeout: int = 120) -> nbformat.NotebookNode:
    """Run every cell in a fresh python3 kernel started in notebooks/ (errors raise)."""
    client = NotebookClient(book, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()
    return book


def test_every_required_notebook_is_shipped():
    assert REQUIRED <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_have_their_outputs_stripped(name):
    book = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(book)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs before committing"
    assert "widgets" not in book.metadata


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_notebook_runs_top_to_bottom_and_shows_its_figures(name):
    book = execute(nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4))
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    mimetypes = {key for o in outputs for key in o.get("data", {})}
    assert "application/vnd.plotly.v1+json" in mimetypes or "text/html" in mimetypes, "no figure drawn inline"
    figures = sum("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs)
    assert figures >= 1


def test_long_work_shows_a_live_progress_bar_in_jupyter():
    """rich draws into an ipywidgets output area inside a kernel (a terminal bar outside)."""
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell(
        "from microscope.workbench.progress import step_progress\n"
        "with step_progress('demo', 2) as bar:\n"
        "    bar.start('dump'); bar('tokens', 5, 10); bar.advance()\n"
        "    bar.start('toxicity'); bar.advance()")]
    execute(book, timeout=60)
    outputs = book.cells[0].outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    state = json.dumps(book.metadata["widgets"])
    assert "OutputModel" in state and "demo: " in state and "steps" in state
    assert not any(o.output_type == "stream" and "ipywidgets" in o.text for o in outputs)
