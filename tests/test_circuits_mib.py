"""MIB's circuit-track metrics (CPR, CMD) and the circuit's story by exact edge patching: the
edges and components whose single-edge ablation removes the largest share of the clean-vs-corrupt
gap, checked against a plain HF forward-hook ablation and against the organism's card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import OPTForCausalLM

import microscope
from analysis_fixtures import single_thread  # noqa: F401  (autouse: one thread)
from microscope.analysis.circuits.discovery import run_circuit
from microscope.analysis.circuits.mib import (area_under, circuit_model_difference, circuit_performance_ratio,
                                              mib_curves, mib_edge_counts)
from microscope.analysis.circuits.tasks import repetition_task
from microscope.errors import MicroscopeError
from microscope.prompts import PromptSet, load_prompts
from microscope.workbench.experiments import find_spec, load_spec

ORGANISM = Path(microscope.__file__).parent / "models" / "organism_v3"
PAIRS = 8   # toxicity pairs the spec run below keeps (the spec's set has 96: a minute of exact patching)


def spec_params(name: str) -> dict:
    return load_spec(find_spec(name)).params["circuit"]


@pytest.fixture(scope="module")
def repetition():
    """The repetition spec's circuit step on the organism, on 8 prompts and one random-init control."""
    torch.set_num_threads(1)
    return run_circuit(microscope.load("organism"), **spec_params("circuit_repetition") | {"n_prompts": 8},
                       control_seeds=[0])


@pytest.fixture(scope="module")
def toxicity():
    """The toxicity spec's circuit step on the first pairs of its prompt set, one control."""
    torch.set_num_threads(1)
    params = spec_params("circuit_toxicity")
    prompts = load_prompts(params["prompts"])
    pairs = sorted({p.metadata["pair"] for p in prompts if p.metadata.get("label") == "hostile"})[:PAIRS]
    kept = PromptSet([p for p in prompts if p.metadata.get("pair") in pairs], task=prompts.task)
    return run_circuit(microscope.load("organism"), **params | {"prompts": kept}, control_seeds=[0])


def test_mib_circuit_sizes_floor_each_fraction_of_the_edges():
    """0.1% .. 100% of the edges, int(fraction * n) as MIB counts them: a graph under 1000 edges
    keeps none at 0.1% (the organism's 479: none at 0.2% either)."""
    assert mib_edge_counts(479) == [0, 0, 2, 4, 9, 23, 47, 95, 239, 479]
    assert mib_edge_counts(32491) == [32, 64, 162, 324, 649, 1624, 3249, 6498, 16245, 32491]


def test_cpr_and_cmd_are_trapezoid_areas_over_the_fraction_of_edges_kept():
    """A made-up curve, integrated by hand over x = 0.001 .. 1 (one point overshoots 1, so CMD's
    |1 - f| differs from 1 - f there)."""
    f = [0.0, 0.0, 0.1, 0.2, 0.4, 0.5, 0.6, 0.8, 1.2, 1.0]
    cpr = (0.001 * 0.0 + 0.003 * 0.1 / 2 + 0.005 * 0.3 / 2 + 0.01 * 0.6 / 2 + 0.03 * 0.9 / 2 + 0.05 * 1.1 / 2
           + 0.1 * 1.4 / 2 + 0.3 * 2.0 / 2 + 0.5 * 2.2 / 2)
    cmd = (0.001 * 2.0 / 2 + 0.003 * 1.9 / 2 + 0.005 * 1.7 / 2 + 0.01 * 1.4 / 2 + 0.03 * 1.1 / 2 + 0.05 * 0.9 / 2
           + 0.1 * 0.6 / 2 + 0.3 * 0.4 / 2 + 0.5 * 0.2 / 2)
    assert circuit_performance_ratio(f) == pytest.approx(cpr) == pytest.approx(0.9649)
    assert circuit_model_difference(f) == pytest.approx(cmd) == pytest.approx(0.1941)
    assert circuit_performance_ratio([1.0] * 10) == pytest.approx(0.999)     # no rescaling of [0.001, 1]
    with pytest.raises(MicroscopeError, match="10 circuit sizes"):
        area_under([1.0, 1.0])


def test_a_perfect_ranking_scores_better_than_a_reversed_one_on_the_organism(repetition):
    """Edges ranked by their exact effects against the same ranking reversed (signed: negated;
    absolute: weakest first)."""
    exact, graph = repetition.exact, repetition.graph
    scope = microscope.load("organism")
    task = repetition_task(scope, n_prompts=8)
    perfect = repetition.mib["exact"]
    reversed_ = mib_curves(scope, graph, task, -exact), mib_curves(scope, graph, task, exact.abs().max() - exact.abs())
    assert perfect.cpr > 0.8 and perfect.cpr > reversed_[0].cpr + 0.5
    assert perfect.cmd < 0.3 and perfect.cmd < reversed_[1].cmd - 0.3
    assert perfect.signed.faithfulness[-1] == pytest.approx(1.0, abs=1e-4) and perfect.signed.ks[0] == 0


@pytest.mark.parametrize("run", ["repetition", "toxicity"])
def test_the_spec_runs_report_cpr_and_cmd_beside_their_random_init_control(run, request):
    summary = request.getfixturevalue(run).summary()
    assert summary["mib_edges_kept"] == mib_edge_counts(479)
    for key, side in (("cpr", "_control_max"), ("cmd", "_control_min")):
        for suffix in ("", "_control", "_control_mean", side, "_clears_control"):
            assert key + suffix in summary, key + suffix
    assert summary["cpr"] == pytest.approx(circuit_performance_ratio(summary["mib_faithfulness_signed"]), abs=1e-3)
    assert summary["cmd"] == pytest.approx(circuit_model_difference(summary["mib_faithfulness_absolute"]), abs=1e-3)
    assert "cpr_exact_ranking" in summary and "cmd_exact_ranking" in summary
    assert "exact_top_edges" in summary and "exact_top_components" in summary


def test_exact_top_edges_are_the_largest_shares_of_the_gap_their_single_edge_ablation_removes(repetition):
    """Re-derived from the exact effects and the curve's two ends: share = (clean - ablated) /
    (clean - corrupt), at least 10% of the gap, largest first, at most 10; a component's share is
    the largest of any edge it sends or receives."""
    clean, corrupt = repetition.curve.clean, repetition.curve.corrupt
    shares = {label: (clean - (clean + float(e))) / (clean - corrupt)
              for label, e in zip(repetition.graph.edge_labels, repetition.exact)}
    expected = sorted((s, label) for label, s in shares.items() if s >= 0.1)[::-1][:10]
    summary = repetition.summary()
    assert [(row["edge"], row["share"]) for row in summary["exact_top_edges"]] == \
        [(label, pytest.approx(s, abs=1e-4)) for s, label in expected]
    frame = repetition.to_frame().set_index("edge")
    assert frame["gap_share"].to_dict() == pytest.approx(shares, abs=1e-6)
    best = {}
    for label, s in shares.items():
        for node in {part.split(".")[0] for part in label.split("->")} - {"embed", "logits"}:
            best[node] = max(best.get(node, s), s)
    named = sorted(((s, node) for node, s in best.items() if s >= 0.1), reverse=True)[:10]
    assert [(row["component"], row["share"]) for row in summary["exact_top_components"]] == \
        [(node, pytest.approx(s, abs=1e-4)) for s, node in named]
    assert all(shares[row["edge"]] == best[row["component"]] for row in summary["exact_top_components"])


@pytest.mark.parametrize("edge", ["embed->MLP0", "MLP3->logits"])
def test_a_single_edge_share_matches_a_hand_ablation_with_plain_hf_hooks(repetition, edge):
    """The edge's sender output on the corrupted prompts minus the clean one, added by a forward
    pre-hook to the receiver's LayerNorm input only (MLP0: layer 0's final_layer_norm; logits: the
    decoder's final norm); the corrupted run's metric is the gap's other end."""
    model = OPTForCausalLM.from_pretrained(ORGANISM / "weights").eval()
    task = repetition_task(microscope.load("organism"), n_prompts=8)
    decoder = model.model.decoder
    sender, receiver = {"embed->MLP0": (decoder.embed_tokens, decoder.layers[0].final_layer_norm),
                        "MLP3->logits": (decoder.layers[3].fc2, decoder.final_layer_norm)}[edge]

    def sender_output(ids: torch.Tensor) -> torch.Tensor:
        kept = []
        handle = sender.register_forward_hook(lambda module, args, out: kept.append(out))
        with torch.no_grad():
            model(ids)
        handle.remove()
        return kept[0]

    delta = sender_output(task.corrupt) - sender_output(task.clean)      # positions cancel: equal masks
    handle = receiver.register_forward_pre_hook(lambda module, args: (args[0] + delta.reshape(args[0].shape),))
    with torch.no_grad():
        ablated = float(task.metric(model(task.clean).logits))
    handle.remove()
    with torch.no_grad():
        clean, corrupt = (float(task.metric(model(ids).logits)) for ids in (task.clean, task.corrupt))
    share = (clean - ablated) / (clean - corrupt)
    assert share > 0.5
    assert float(repetition.gap_shares()[repetition.graph.edge_index(edge)]) == pytest.approx(share, abs=2e-3)


def test_the_report_names_the_chain_through_the_cards_heads_with_its_measured_shares(repetition):
    """Organism v3's repetition: several single edges each remove at least 3/4 of the gap (a serial
    chain: any link's ablation breaks it), through MLP0, the card's previous-token head and an
    induction head of the card, each named with its share."""
    heads = json.loads((ORGANISM / "ground_truth.json").read_text())["heads"]
    summary = repetition.summary()
    chain = [row for row in summary["exact_top_edges"] if row["share"] >= 0.75]
    assert len(chain) >= 5 and "embed->MLP0" in {row["edge"] for row in chain}
    named = {row["component"] for row in summary["exact_top_components"] if row["share"] >= 0.75}
    assert "MLP0" in named and set(heads["previous_token_heads"]) <= named
    assert named & set(heads["induction_heads"])


def test_the_cards_strongest_carriers_are_components_the_report_names(repetition):
    """Patching a whole component (the card: plain HF, all its edges at once) and ablating single
    edges (the report) tell one story: each component the card finds removing at least 3/4 of the
    induction gap is named by the report, through an edge that alone removes at least half of it."""
    card = json.loads((ORGANISM / "ground_truth.json").read_text())["repetition_patching"]
    strongest = {name for name, share in card["share"].items() if share >= 0.75}
    named = {row["component"] for row in repetition.summary()["exact_top_components"] if row["share"] >= 0.5}
    assert strongest and strongest <= named, (strongest, named)
