"""Attribution graphs of the organism (pre-LN) and its sibling (post-LN, OPT-350m's layout), with
transcoders trained from a store of the demo prompts: exact replacement, interventions that confirm
the toxicity graph, the cue word's path to the insults, the repetition graph's copy through the
induction heads (the card's), the study's random-init control, the command line and the specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import microscope as ms
from graphs_fixtures import REPETITION, TOXICITY, one_thread, trained_transcoders  # noqa: F401
from microscope.analysis.graphs.attribution import attribute
from microscope.analysis.graphs.copying import copying
from microscope.analysis.graphs.interventions import check_interventions
from microscope.analysis.graphs.paths import strongest_path
from microscope.analysis.graphs.pruning import prune
from microscope.analysis.graphs.replacement import ReplacementModel
from microscope.analysis.graphs.study import cue_position, run_attribution_graph, target_ids
from microscope.cli import app
from microscope.names import parse_head_label
from microscope.workbench.experiments import SHIPPED_SPECS, load_spec, preflight

CARD = json.loads((Path(ms.__file__).parent / "models" / "organism_v3" / "ground_truth.json").read_text())


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    scope = ms.load("organism")
    transcoders, store = trained_transcoders(scope, tmp_path_factory.mktemp("organism"))
    return scope, transcoders, store


@pytest.fixture(scope="module")
def sibling(tmp_path_factory):
    scope = ms.load("organism-v3-sibling")
    return scope, trained_transcoders(scope, tmp_path_factory.mktemp("sibling"))[0]


@pytest.fixture(scope="module")
def toxicity(organism):
    scope, transcoders, _ = organism
    rm = ReplacementModel(scope, transcoders, TOXICITY)
    graph = attribute(rm, target_ids(scope, None, "toxicity", "insults"))
    return rm, graph, prune(graph)


@pytest.mark.parametrize("which", ["organism", "sibling"])
def test_with_error_nodes_the_replacement_gives_the_models_own_logits(request, which):
    scope, transcoders = request.getfixturevalue(which)[:2]
    for prompt in (TOXICITY, REPETITION):
        rm = ReplacementModel(scope, transcoders, prompt)
        with torch.no_grad():
            reference = scope.model(rm.input_ids[None]).logits[0]     # a plain HF forward
        assert (rm.run() - reference).abs().max() <= 1e-4
        assert (rm.run(with_errors=False) - reference).abs().max() > 0.1


def test_ablating_the_most_influential_features_confirms_the_toxicity_graph(toxicity):
    rm, graph, pruned = toxicity
    check = check_interventions(rm, graph, pruned.node_influence, n=20, draws=3)
    assert check.spearman >= 0.8
    assert float(check.measured.abs().mean()) > 5 * max(float(m.abs().mean()) for m in check.control_measured)
    assert all(graph.features[check.nodes, 0].sort().values.tolist() ==
               graph.features[c, 0].sort().values.tolist() for c in check.control_nodes)   # same layers


def test_the_toxicity_graph_runs_from_the_mood_word_through_features_to_an_insult(toxicity, organism):
    rm, graph, pruned = toxicity
    assert graph.logit_probabilities.sum() > 0.5
    cue = graph.token_start + cue_position(organism[0], rm.input_ids, "bitter")
    path, strength = strongest_path(graph, pruned, cue)
    assert path[0] == cue and graph.kind(path[-1]) == "logit" and strength > 0
    assert [graph.kind(i) for i in path[1:-1]] and all(graph.kind(i) == "feature" for i in path[1:-1])
    assert all(pruned.edge_mask[b, a] for a, b in zip(path, path[1:]))


def test_the_repetition_graph_copies_through_the_induction_heads_frozen_patterns(organism):
    scope, transcoders, _ = organism
    rm = ReplacementModel(scope, transcoders, REPETITION)
    graph = attribute(rm)                                   # circuit-tracer's salient logits
    assert graph.logit_labels[0] == " door"
    found = copying(rm, graph, draws=3)
    induction = {parse_head_label(h) for h in CARD["heads"]["induction_heads"]}
    assert found.heads and set(found.heads) <= induction
    assert found.edge > 1.0 and found.share > 0.5 and max(abs(s) for s in found.control_shares) < 0.1


def test_the_study_reports_its_scores_beside_random_init_models_and_writes_the_graph(organism, tmp_path):
    scope, transcoders, store = organism
    folder = Path(transcoders[0].path).parent
    result = run_attribution_graph(scope, store, prompt=TOXICITY, target_set="toxicity", cue="bitter",
                                   transcoders=str(folder), out=str(tmp_path), slug="tox", steps=60,
                                   batch_size=256, interventions=20, intervention_draws=2, control_seeds=[11])
    summary = result.summary()
    assert summary["target_probability_clears_control"]
    for key in ("replacement_score", "completeness"):
        assert 0 < summary[key] <= 1 and 0 < summary[key + "_control_max"] <= 1
    assert summary["intervention_spearman"] >= 0.8 and summary["cue_path"].startswith("tok ' bitter'@3")
    data = json.loads(Path(summary["graph_json"]).read_text())
    assert data["metadata"]["slug"] == "tox" and any(n["clerp"].startswith("fires on") for n in data["nodes"])
    assert len(result.to_frame()) == summary["nodes_kept"] and len(result.figures()) == 2


def test_the_command_line_trains_every_transcoder_and_writes_the_graph(organism, tmp_path):
    store = organism[2]
    runner = CliRunner()
    trained = runner.invoke(app, ["graph", "transcoders", store.path, "--out", str(tmp_path / "tc"), "--steps", "20",
                                  "--batch-size", "256", "--k", "8", "--no-progress"])
    assert trained.exit_code == 0, trained.output
    assert sorted(p.name for p in (tmp_path / "tc").iterdir()) == ["layer_0", "layer_1", "layer_2", "layer_3"]
    graph = runner.invoke(app, ["graph", "attribute", REPETITION, "--transcoders", str(tmp_path / "tc"),
                                "--out", str(tmp_path / "out"), "--slug", "rep", "--html", str(tmp_path / "g.html")])
    assert graph.exit_code == 0, graph.output
    assert "replacement score" in graph.output and (tmp_path / "out" / "rep.json").is_file()
    assert "plotly" in (tmp_path / "g.html").read_text()[:5000].lower()
    missing = runner.invoke(app, ["graph", "attribute", REPETITION, "--transcoders", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "microscope graph transcoders" in " ".join(missing.output.split())


@pytest.mark.parametrize("name", ["attribution_graph_toxicity", "attribution_graph_repetition"])
def test_the_graph_specs_name_only_arguments_their_step_takes(name):
    spec = load_spec(SHIPPED_SPECS / f"{name}.toml")
    assert list(preflight(spec)) == ["graph"] and spec.hooks == ("blocks.*.hook_resid_mid", "blocks.*.hook_mlp_out")
