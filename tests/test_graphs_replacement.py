"""The replacement model and the attribution graph, checked against plain HF forwards and plain
torch: exact logits with error nodes (both layouts), every node's edges plus its bias equal to its
pre-activation, a layer-0 edge written out by hand, and pruning and scores equal to circuit-tracer's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import LAYOUTS, tiny_model
from graphs_fixtures import one_thread, plain_mlp_inputs, random_transcoders  # noqa: F401
from microscope.analysis.graphs.attribution import attribute
from microscope.analysis.graphs.pruning import graph_scores, influence, normalized, prune
from microscope.analysis.graphs.replacement import ReplacementModel
from microscope.analysis.graphs.transcoders import Transcoders
from microscope.errors import AnalysisInputError
from microscope.scope import Scope

IDS = torch.tensor([2, 17, 45, 9, 33, 60, 17, 45, 71, 12])


def replacement(layout: str, seed: int = 0) -> tuple[ReplacementModel, object]:
    model = tiny_model(layout, seed=seed)
    return ReplacementModel(Scope(model), random_transcoders(model, seed=seed), IDS), model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_with_error_nodes_the_replacement_gives_the_models_logits(layout):
    rm, model = replacement(layout)
    with torch.no_grad():
        reference = model(IDS[None]).logits[0]
    assert (rm.run() - reference).abs().max() <= 1e-4
    assert (rm.run(with_errors=False) - reference).abs().max() > 1e-2   # the control: errors matter


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_nodes_incoming_edges_plus_its_bias_sum_to_its_pre_activation(layout):
    rm, model = replacement(layout)
    graph = attribute(rm, targets=[5, 40, 77], batch_size=16)
    mlp_in, logits = plain_mlp_inputs(model, IDS)
    expected = torch.empty(graph.n_features + graph.n_logits)
    for i, (layer, pos, latent) in enumerate(graph.features.tolist()):
        encoder = rm.transcoders[layer].coder.encoder
        expected[i] = mlp_in[layer, pos] @ encoder.weight[latent].detach() + encoder.bias[latent].detach()
    expected[graph.n_features:] = logits[-1, graph.logit_tokens] - logits[-1].mean()
    rows = torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_start, graph.n_nodes)])
    total = graph.adjacency[rows].sum(1) + graph.biases[rows]
    assert graph.n_features > 3 * graph.n_layers and (graph.adjacency != 0).sum() > graph.n_nodes
    assert (total - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))
    assert graph.adjacency[graph.error_start:graph.logit_start].abs().sum() == 0   # sources have no inputs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_input_to_layer_0_feature_edge_equals_the_hand_computation(layout):
    """Through layer 0's frozen attention pattern and frozen LayerNorm scale, by plain torch."""
    rm, model = replacement(layout)
    graph = attribute(rm, targets=[5])
    model.set_attn_implementation("eager")
    seen = {}
    layer0 = model.model.decoder.layers[0]
    h1 = layer0.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("x0", (a[0] if a else kw["hidden_states"])[0]), with_kwargs=True)
    h2 = layer0.self_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out[0][0]))
    with torch.no_grad():
        pattern = model(IDS[None], output_attentions=True).attentions[0][0]        # [H, T, T]
    h1.remove(), h2.remove()
    x0, attn = seen["x0"], seen["attn"]
    ln, sa = layer0.self_attn_layer_norm, layer0.self_attn
    H = model.config.num_attention_heads
    dh = x0.shape[-1] // H
    ov = [sa.out_proj.weight[:, h * dh:(h + 1) * dh] @ sa.v_proj.weight[h * dh:(h + 1) * dh] for h in range(H)]
    pre_ln = model.config.do_layer_norm_before
    checked = 0
    with torch.no_grad():
        for i in (graph.features[:, 0] == 0).nonzero()[:, 0].tolist():
            _, p, latent = graph.features[i].tolist()
            w_enc = rm.transcoders[0].coder.encoder.weight[latent]
            for q in range(p + 1):
                x = x0[q]
                if pre_ln:
                    n = (x - x.mean()) / (x.var(unbiased=False) + ln.eps).sqrt() * ln.weight
                    write = (x if q == p else 0) + sum(pattern[h, p, q] * ov[h] @ n for h in range(H))
                else:
                    c = (x if q == p else 0) + sum(pattern[h, p, q] * ov[h] @ x for h in range(H))
                    sigma = ((x0[p] + attn[p]).var(unbiased=False) + ln.eps).sqrt()
                    write = (c - c.mean()) / sigma * ln.weight
                edge = graph.adjacency[i, graph.token_start + q]
                assert edge == pytest.approx(float(w_enc @ write), abs=1e-4, rel=1e-4)
                checked += 1
    assert checked > 20


def test_one_backward_pass_per_batch_gives_the_same_rows_at_any_batch_size():
    rm, _ = replacement("post_ln")
    one, many = attribute(rm, targets=[5, 6], batch_size=1), attribute(rm, targets=[5, 6], batch_size=500)
    assert torch.allclose(one.adjacency, many.adjacency, atol=1e-5)


def test_influence_along_a_chain_is_the_product_of_shares():
    """0 -> 1 -> 2 (logit), 0 -> 2 directly: node 0 reaches the logit both ways."""
    a = torch.tensor([[0.0, 0, 0], [2.0, 0, 0], [1.0, 3.0, 0]])
    w = torch.tensor([0.0, 0, 1.0])
    got = influence(normalized(a), w)
    assert got.tolist() == pytest.approx([0.25 + 0.75 * 1.0, 0.75, 0.0])


def test_pruning_keeps_every_input_and_logit_and_no_orphan_feature():
    rm, _ = replacement("pre_ln")
    graph = attribute(rm, targets=[5, 40])
    pruned = prune(graph, node_threshold=0.5, edge_threshold=0.9)
    assert pruned.node_mask[graph.token_start:].all()
    assert 0 < int(pruned.node_mask[:graph.n_features].sum()) < graph.n_features
    for i in pruned.node_mask[:graph.n_features].nonzero()[:, 0]:
        assert pruned.edge_mask[:, i].any() and pruned.edge_mask[i].any()
    with pytest.raises(AnalysisInputError, match="between 0 and 1"):
        prune(graph, node_threshold=1.5)


@pytest.mark.parametrize("layout", ["pre_ln", "post_ln"])
def test_pruning_and_scores_equal_circuit_tracers_own(layout):
    ct = pytest.importorskip("circuit_tracer.graph", reason="circuit-tracer is not installed "
                             "(pip install --no-deps circuit-tracer==0.5.0)")
    rm, _ = replacement(layout, seed=3)
    graph = attribute(rm, targets=[5, 40, 77])
    theirs = SimpleNamespace(input_tokens=graph.input_ids, logit_targets=list(range(graph.n_logits)),
                             selected_features=torch.arange(graph.n_features), adjacency_matrix=graph.adjacency,
                             logit_probabilities=graph.logit_probabilities,
                             cfg=SimpleNamespace(n_layers=graph.n_layers))
    for node_threshold, edge_threshold in [(0.8, 0.98), (0.5, 0.7)]:
        nodes, edges, cumulative = ct.prune_graph(theirs, node_threshold, edge_threshold)
        ours = prune(graph, node_threshold, edge_threshold)
        assert torch.equal(nodes, ours.node_mask) and torch.equal(edges, ours.edge_mask)
        assert torch.allclose(cumulative, ours.cumulative)
    assert graph_scores(graph) == pytest.approx(ct.compute_graph_scores(theirs), abs=1e-6)


def test_a_batch_of_prompts_or_a_missing_transcoder_is_refused_with_what_to_do():
    model = tiny_model("pre_ln")
    scope, tcs = Scope(model), random_transcoders(model)
    with pytest.raises(AnalysisInputError, match="one prompt"):
        ReplacementModel(scope, tcs, torch.stack([IDS, IDS]))
    with pytest.raises(AnalysisInputError, match="one per block"):
        ReplacementModel(scope, Transcoders(tcs.by_layer[:-1]), IDS)
    with pytest.raises(AnalysisInputError, match=r"token ids in \[0, 96\)"):
        attribute(ReplacementModel(scope, tcs, IDS), targets=[1000])
