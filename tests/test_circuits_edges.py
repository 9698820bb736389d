"""Edge patching on tiny OPTs of every layout: the two ends of the graph and one edge by hand."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from analysis_fixtures import single_thread  # noqa: F401  (autouse: one thread)
from conftest import tiny_model
from microscope.analysis.circuits.eap import eap_scores
from microscope.analysis.circuits.edge_patching import exact_edge_effects, run_with_ablated_edges
from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.tasks import CircuitTask
from microscope.errors import AnalysisInputError
from microscope.scope import Scope

LAYOUTS = ["pre_ln", "post_ln", "odd"]


def _task(clean: torch.Tensor, corrupt: torch.Tensor) -> CircuitTask:
    n = len(clean)
    return CircuitTask("t", clean, corrupt, torch.ones_like(clean), torch.full((n, 1), 5), torch.full((n, 1), 7))


def _padded_task() -> CircuitTask:
    """Three prompts, the first padded after 7 tokens; two bad tokens (the metric is a log-odds)."""
    clean, corrupt = _pair(slice(2, 6))
    mask = torch.ones_like(clean)
    mask[0, 7:] = 0
    return CircuitTask("t", clean, corrupt, mask, torch.full((3, 1), 5), torch.full((3, 2), 7))


def _pair(positions=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(3, 90, (3, 10), generator=g)
    corrupt = clean.clone()
    corrupt[:, positions] = torch.randint(3, 90, corrupt[:, positions].shape, generator=g)
    return clean, corrupt


def test_graph_counts_edges_by_layer():
    g = CircuitGraph(n_layers=3, n_heads=4, pre_ln=True)
    heads = sum(3 * 4 * (1 + 5 * l) for l in range(3))
    mlps = sum(1 + 5 * l + 4 for l in range(3))
    assert g.n_edges == heads + mlps + g.n_senders
    assert g.upstream[g.head_sender(0, 1), g.head_receiver(2, 3, "k")]
    assert not g.upstream[g.head_sender(1, 0), g.head_receiver(1, 2, "q")]       # same layer
    assert g.upstream[g.head_sender(1, 0), g.mlp_receiver(1)]
    assert g.edge_labels[g.edge_index("L0H1->L2H3.k")] == "L0H1->L2H3.k"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ablating_every_edge_is_the_corrupted_run(layout):
    scope = Scope(tiny_model(layout))
    clean, corrupt = _pair()
    graph = CircuitGraph.of(scope.model)
    patched = run_with_ablated_edges(scope, graph, _task(clean, corrupt), graph.upstream)
    assert torch.allclose(patched, scope.run(corrupt), atol=1e-4)
    assert not torch.allclose(patched, scope.run(clean), atol=1e-2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ablating_no_edge_is_the_clean_run(layout):
    scope = Scope(tiny_model(layout))
    clean, corrupt = _pair()
    graph = CircuitGraph.of(scope.model)
    none = torch.zeros_like(graph.upstream)
    assert torch.allclose(run_with_ablated_edges(scope, graph, _task(clean, corrupt), none), scope.run(clean), atol=1e-5)
    # every edge routed through its receiver's own input, each carrying the clean value
    routed = run_with_ablated_edges(scope, graph, _task(clean, clean), graph.upstream)
    assert torch.allclose(routed, scope.run(clean), atol=1e-4)


def _record(module, store: dict, key: str, pre: bool = False):
    if pre:
        return module.register_forward_pre_hook(lambda m, args: store.__setitem__(key, args[0].detach().clone()))
    return module.register_forward_hook(
        lambda m, args, out: store.__setitem__(key, (out[0] if isinstance(out, tuple) else out).detach().clone()))


def _head_out(model, layer: int, head: int, z: torch.Tensor) -> torch.Tensor:
    """Plain torch: one head's write into the residual from out_proj's input z [b, p, heads * d_head]."""
    attn = model.model.decoder.layers[layer].self_attn
    d = attn.head_dim
    return z[..., head * d:(head + 1) * d] @ attn.out_proj.weight[:, head * d:(head + 1) * d].T


def _replace_head(module, head: int, d_head: int, make_input, store: dict):
    """Forward hook on a q/k/v projection: its `head` slice recomputed from make_input(store)."""
    rows = slice(head * d_head, (head + 1) * d_head)

    def hook(m, args, out):
        out = out.clone()
        out[..., rows] = F.linear(make_input(store), m.weight[rows], m.bias[rows])
        return out
    return module.register_forward_hook(hook)


@torch.no_grad()
def test_one_edge_patch_matches_a_hand_written_hook_pre_ln():
    """L0H1 -> L2H3.k: layer 2's key input for head 3 alone is LN(resid_pre - L0H1 clean + L0H1 corrupt)."""
    model = tiny_model("pre_ln")
    scope, graph = Scope(model), CircuitGraph.of(model)
    clean, corrupt = _pair(slice(2, 6))
    layers = model.model.decoder.layers
    store: dict = {}
    handle = _record(layers[0].self_attn.out_proj, store, "z_corrupt", pre=True)
    model(corrupt)
    handle.remove()
    k_proj = layers[2].self_attn.k_proj
    ln = layers[2].self_attn_layer_norm

    def key_input(s: dict) -> torch.Tensor:
        delta = _head_out(model, 0, 1, s["z_corrupt"]) - _head_out(model, 0, 1, s["z_clean"])
        return F.layer_norm(s["resid_pre"] + delta, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    handles = [_record(layers[0].self_attn.out_proj, store, "z_clean", pre=True),
               _record(layers[2], store, "resid_pre", pre=True),
               _replace_head(k_proj, 3, layers[2].self_attn.head_dim, key_input, store)]
    expected = model(clean).logits
    for h in handles:
        h.remove()
    ablated = torch.zeros_like(graph.upstream)
    ablated[graph.head_sender(0, 1), graph.head_receiver(2, 3, "k")] = True
    got = run_with_ablated_edges(scope, graph, _task(clean, corrupt), ablated)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, model(clean).logits, atol=1e-4)


@torch.no_grad()
def test_one_edge_patch_matches_a_hand_written_hook_post_ln():
    """post-LN, L0H1 -> L1H2.q: the delta enters where L0H1 writes and passes through layer 0's
    two LayerNorms with statistics recomputed on the receiver's copy; MLP0 keeps its clean output."""
    model = tiny_model("post_ln")
    scope, graph = Scope(model), CircuitGraph.of(model)
    clean, corrupt = _pair(slice(2, 6))
    layer0, layer1 = model.model.decoder.layers[:2]
    store: dict = {}
    handle = _record(layer0.self_attn.out_proj, store, "z_corrupt", pre=True)
    model(corrupt)
    handle.remove()
    q_proj = layer1.self_attn.q_proj

    def query_input(s: dict) -> torch.Tensor:
        delta = _head_out(model, 0, 1, s["z_corrupt"]) - _head_out(model, 0, 1, s["z_clean"])
        ln1, ln2 = layer0.self_attn_layer_norm, layer0.final_layer_norm
        x = F.layer_norm(s["embed"] + s["attn_out"] + delta, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)
        mlp = s["mlp_out"].view_as(x)
        return F.layer_norm(x + mlp, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)

    handles = [_record(layer0.self_attn.out_proj, store, "z_clean", pre=True),
               _record(layer0, store, "embed", pre=True), _record(layer0.self_attn, store, "attn_out"),
               _record(layer0.fc2, store, "mlp_out"), _replace_head(q_proj, 2, layer1.self_attn.head_dim, query_input, store)]
    expected = model(clean).logits
    for h in handles:
        h.remove()
    ablated = torch.zeros_like(graph.upstream)
    ablated[graph.head_sender(0, 1), graph.head_receiver(1, 2, "q")] = True
    got = run_with_ablated_edges(scope, graph, _task(clean, corrupt), ablated)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, model(clean).logits, atol=1e-4)


@pytest.mark.parametrize("layout", ["pre_ln", "post_ln"])
def test_eap_ranks_edges_like_exact_patching_on_a_small_corruption(layout):
    """One corrupted token: the first-order estimate should order the edges as exact patching does."""
    from scipy.stats import spearmanr

    scope = Scope(tiny_model(layout))
    task = _task(*_pair(slice(2, 3)))
    graph = CircuitGraph.of(scope.model)
    exact = exact_edge_effects(scope, graph, task)
    big = exact.abs() > 0.01 * exact.abs().max()
    for steps in (1, 3):
        scores = eap_scores(scope, graph, task, steps=steps)
        assert spearmanr(exact[big], scores[big])[0] > 0.9


def test_several_masks_in_one_forward_match_one_forward_each():
    from microscope.analysis.circuits.edge_patching import ablated_metrics, ablation_values

    scope = Scope(tiny_model("post_ln"))
    task = _task(*_pair(slice(2, 6)))
    graph = CircuitGraph.of(scope.model)
    masks = torch.rand(4, graph.n_senders, graph.n_receivers, generator=torch.Generator().manual_seed(0)) < 0.5
    values = ablation_values(scope, graph, task)
    batched = ablated_metrics(scope, graph, task, masks, values, max_batch=2 * len(task))
    one_by_one = torch.stack([task.metric(run_with_ablated_edges(scope, graph, task, m, values)) for m in masks])
    assert torch.allclose(batched, one_by_one, atol=1e-5)


@pytest.mark.parametrize("layout", ["pre_ln", "odd"])
@pytest.mark.parametrize("steps", [1, 3])
def test_eap_from_the_plain_backward_equals_eap_from_the_edge_resolved_forward(layout, steps):
    """pre-LN scores come from one plain backward (q/k/v and fc1 slices, the norm's Jacobian);
    the edge-resolved forward with a leaf on every receiver is the reference. Padded prompts
    included (each prompt's metric is read at its own last token)."""
    scope = Scope(tiny_model(layout))
    task = _padded_task()
    graph = CircuitGraph.of(scope.model)
    fast = eap_scores(scope, graph, task, steps=steps)
    reference = eap_scores(scope, graph, task, steps=steps, routed=True)
    assert reference.abs().max() > 0.1
    assert torch.allclose(fast, reference, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_receiver_paths_with_one_step_are_eap(layout):
    """Every receiver's path starts at the clean run, so one step is the clean gradient: EAP.
    Padded prompts included."""
    scope = Scope(tiny_model(layout))
    task = _padded_task()
    graph = CircuitGraph.of(scope.model)
    eap = eap_scores(scope, graph, task, steps=1)
    assert eap.abs().max() > 0.1
    assert torch.allclose(eap_scores(scope, graph, task, steps=1, interpolate="receivers"), eap, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_receiver_path_with_one_incoming_edge_integrates_to_its_exact_effect(layout):
    """Layer 0's receivers read the embeddings alone, so each one's path is its single edge's
    ablation, and the gradient averaged along it (a Riemann sum, 64 steps) is the edge's exact
    effect; EAP at the clean point is not (the control)."""
    scope = Scope(tiny_model(layout))
    task = _task(*_pair(slice(2, 6)))
    graph = CircuitGraph.of(scope.model)
    layer0 = torch.tensor([r < graph.group("attn", 0).stop for r in graph.edges[:, 1].tolist()])
    exact = exact_edge_effects(scope, graph, task)[layer0]
    along = eap_scores(scope, graph, task, steps=64, interpolate="receivers")[layer0]
    tolerance = 0.05 * exact.abs().max()
    assert (along - exact).abs().max() < tolerance
    assert (eap_scores(scope, graph, task, steps=1)[layer0] - exact).abs().max() > 2 * tolerance


def test_an_unknown_interpolation_is_refused():
    scope = Scope(tiny_model("pre_ln"))
    graph = CircuitGraph.of(scope.model)
    with pytest.raises(AnalysisInputError, match="interpolate must be one of"):
        eap_scores(scope, graph, _task(*_pair()), steps=3, interpolate="activations")
