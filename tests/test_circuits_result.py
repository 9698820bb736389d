"""The circuit result contract (headline keys, figures, table) and the shipped circuit specs."""

from __future__ import annotations

import pytest
import torch

from analysis_fixtures import single_thread  # noqa: F401  (autouse: one thread)
from conftest import tiny_model
from microscope.analysis.circuits.discovery import find_circuit, run_circuit
from microscope.analysis.circuits.tasks import CircuitTask
from microscope.errors import AnalysisInputError, MicroscopeError
from microscope.scope import Scope
from microscope.workbench.experiments import check_params, find_spec, load_spec


def _task() -> CircuitTask:
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(3, 90, (3, 10), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:5] = torch.randint(3, 90, (3, 3), generator=g)
    return CircuitTask("t", clean, corrupt, torch.ones_like(clean), torch.full((3, 1), 5), torch.full((3, 1), 7))


def test_find_circuit_reports_the_headline_keys_figures_and_one_row_per_edge():
    scope = Scope(tiny_model("post_ln"))
    result = find_circuit(scope, _task(), steps=2, control_seeds=[0])
    summary = result.summary()
    for key in ("spearman_eap_ig", "spearman_eap", "top20_overlap_eap_ig", "faithfulness", "edges_kept",
                "minimal_edges", "recovered_metric", "recovered_metric_control_max", "circuit_heads",
                "cpr", "cpr_control_max", "cmd", "cmd_control_min", "exact_top_edges", "exact_top_components"):
        assert key in summary, key
    assert summary["edges_kept"] == int(0.1 * result.graph.n_edges)
    assert len(result.figures()) == 4
    frame = result.to_frame()
    assert len(frame) == result.graph.n_edges and frame["in_circuit"].sum() == summary["edges_kept"]
    assert result.curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)     # every edge kept
    assert summary["rank_by"] == "eap_ig" and "faithfulness_exact_ranking" in summary


def test_a_circuit_extracted_by_exact_effects_keeps_the_largest_exact_edges_and_shows_the_eap_ig_curve():
    scope = Scope(tiny_model("pre_ln"))
    result = find_circuit(scope, _task(), steps=2, rank_by="exact", control_seeds=[0])
    summary = result.summary()
    assert summary["rank_by"] == "exact" and "faithfulness_eap_ig_ranking" in summary
    top = set(result.exact.abs().topk(result.kept).indices.tolist())
    assert set(result.curve.order[:result.kept]) == top
    assert result.other_curves["eap_ig"].order != result.curve.order
    with pytest.raises(AnalysisInputError, match="exact = true"):
        find_circuit(scope, _task(), rank_by="exact", exact=False, control_seeds=[0])
    with pytest.raises(AnalysisInputError, match="rank_by"):
        find_circuit(scope, _task(), rank_by="eap", control_seeds=[0])


def test_without_exact_patching_there_are_no_gap_shares_and_the_error_says_what_to_do():
    result = find_circuit(Scope(tiny_model("pre_ln")), _task(), steps=1, exact=False, control_seeds=[])
    summary = result.summary()
    assert "exact_top_edges" not in summary and "cpr" in summary and "cpr_control" not in summary
    with pytest.raises(MicroscopeError, match="exact=True"):
        result.gap_shares()


@pytest.mark.parametrize("name", ["circuit_repetition", "circuit_toxicity"])
def test_circuit_specs_name_arguments_the_step_takes(name):
    spec = load_spec(find_spec(name))
    assert spec.analysis == ("circuit",) and spec.model == "organism"
    check_params(spec, "circuit", run_circuit)
