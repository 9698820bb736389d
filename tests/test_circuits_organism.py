"""Circuits on the model organism: EAP-IG against exact edge patching, the repetition circuit
against the heads the card names (read here from ground_truth.json, never by the library), and a
random-init model of the same shape as the control."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import microscope
from analysis_fixtures import single_thread  # noqa: F401  (autouse: one thread)
from microscope.analysis.circuits.discovery import agreement
from microscope.analysis.circuits.eap import eap_scores
from microscope.analysis.circuits.edge_patching import exact_edge_effects
from microscope.analysis.circuits.extraction import faithfulness_curve
from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.results import budget_edges
from microscope.analysis.circuits.tasks import repetition_task
from microscope.analysis.controls import random_init_scopes

GROUND_TRUTH = Path(microscope.__file__).parent / "models" / "organism" / "ground_truth.json"
BUDGET, TARGET = 0.1, 0.8


@pytest.fixture(scope="module")
def organism():
    torch.set_num_threads(1)
    scope = microscope.load("organism")
    graph = CircuitGraph.of(scope.model)
    task = repetition_task(scope, n_prompts=16)
    scores = eap_scores(scope, graph, task, steps=5)
    kept = budget_edges(graph.n_edges, BUDGET)
    curve = faithfulness_curve(scope, graph, task, scores, ks=[kept])
    return scope, graph, task, scores, curve, kept


UNMET = ("measured 2026-12-01 on the v2 organism's final weights (4 layers, before their commit): "
         "Spearman |EAP-IG| vs |exact| 0.55 over 126 edges (top-20 overlap 0.85); the direct "
         "L0 -> L3 key edges each carry < 1% of the gap by exact patching too (the previous-token "
         "signal reaches the induction keys through MLP0), faithfulness 0.40 at 10% of the edges")


@pytest.mark.xfail(strict=True, reason=UNMET)
def test_eap_ig_agrees_with_exact_edge_patching(organism):
    scope, graph, task, scores, curve, _ = organism
    exact = exact_edge_effects(scope, graph, task)
    ig = agreement(exact, scores, curve.clean - curve.corrupt)
    assert ig.compared >= 20
    assert ig.spearman >= 0.9, ig
    assert ig.top_overlap >= 0.8, ig


@pytest.mark.xfail(strict=True, reason=UNMET)
def test_repetition_circuit_holds_previous_token_to_induction_key_edges(organism):
    _, graph, _, _, curve, kept = organism
    heads = json.loads(GROUND_TRUTH.read_text())["heads"]
    circuit = {graph.edge_labels[i] for i in curve.order[:kept]}
    named = {f"L{p}H{q}->L{i}H{j}.k" for p, q, _ in heads["previous_token_heads"]
             for i, j, _ in heads["induction_heads"] if p < i}
    assert named and named <= circuit, sorted(named - circuit)
    assert curve.faithfulness[0] >= TARGET


def test_a_random_init_model_has_no_such_circuit(organism):
    scope, graph, task, _, curve, kept = organism
    control = next(iter(random_init_scopes(scope, seeds=[0])))
    control_curve = faithfulness_curve(control, graph, task, eap_scores(control, graph, task, steps=5), ks=[kept])
    recovered = control_curve.faithfulness[0] * (control_curve.clean - control_curve.corrupt)
    assert abs(control_curve.clean - control_curve.corrupt) < 0.05 * (curve.clean - curve.corrupt)
    assert abs(recovered) < 0.05 * curve.faithfulness[0] * (curve.clean - curve.corrupt)
