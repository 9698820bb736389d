"""The graph JSON as circuit-tracer's frontend reads it: validated by circuit-tracer's own pydantic
models, every link between written nodes, and the metadata index kept as its `create_graph_files` keeps it."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_model
from graphs_fixtures import one_thread, random_transcoders  # noqa: F401
from microscope.analysis.graphs.attribution import attribute
from microscope.analysis.graphs.export import cantor, graph_json, write_graph_files
from microscope.analysis.graphs.pruning import prune
from microscope.analysis.graphs.replacement import ReplacementModel
from microscope.scope import Scope
from test_graphs_replacement import IDS


@pytest.fixture(scope="module")
def pruned_graph():
    model = tiny_model("post_ln")
    graph = attribute(ReplacementModel(Scope(model), random_transcoders(model), IDS), targets=[5, 40])
    return graph, prune(graph)


def test_the_json_validates_against_circuit_tracers_own_models(pruned_graph):
    models = pytest.importorskip("circuit_tracer.frontend.graph_models",
                                 reason="circuit-tracer is not installed (pip install --no-deps circuit-tracer==0.5.0)")
    graph, pruned = pruned_graph
    data = graph_json(graph, pruned, slug="tiny", labels={(0, 3): "a label"})
    model = models.Model.model_validate(data)
    assert model.metadata.slug == "tiny" and model.metadata.node_threshold == 0.8
    assert len(model.nodes) == len(data["nodes"]) and len(model.links) == len(data["links"]) > 0
    # circuit-tracer's own constructors give the same ids for the same nodes
    feature = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, latent, pos = map(int, feature["node_id"].split("_"))
    assert models.Node.feature_node(layer, pos, latent).node_id == feature["node_id"]
    assert models.Node.feature_node(layer, pos, latent).feature == feature["feature"] == cantor(layer, latent)
    logit = next(n for n in data["nodes"] if n["is_target_logit"])
    assert logit["node_id"] == models.Node.logit_node(graph.n_pos - 1, 5, "", graph.n_layers).node_id


def test_every_link_joins_written_nodes_and_every_input_and_logit_is_written(pruned_graph):
    graph, pruned = pruned_graph
    data = graph_json(graph, pruned, slug="tiny")
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    kinds = [n["feature_type"] for n in data["nodes"]]
    assert kinds.count("embedding") == graph.n_pos and kinds.count("logit") == graph.n_logits
    assert data["metadata"]["prompt_tokens"] == graph.tokens
    assert data["metadata"]["scan"].startswith("custom-") and len(data["metadata"]["transcoder_list"]) == 3
    weights = {(link["source"], link["target"]): link["weight"] for link in data["links"]}
    assert len(weights) == int(pruned.edge_mask.sum())


def test_writing_a_slug_again_replaces_its_entry_in_the_metadata_index(pruned_graph, tmp_path):
    graph, pruned = pruned_graph
    write_graph_files(graph, pruned, tmp_path, slug="a")
    write_graph_files(graph, pruned, tmp_path, slug="b")
    path = write_graph_files(graph, pruned, tmp_path, slug="a")
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["b", "a"]
    assert json.loads(path.read_text())["metadata"]["slug"] == "a"
