"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024).

The score of edge (s, r) estimates the metric change of ablating it to first order:

    score(s, r) = sum over prompts and positions of (ablated_s - clean_s) . d metric / d input_r

where input_r is receiver r's own copy of the residual (before its LayerNorm in pre-LN; at the
sender's entry point in post-LN, so the gradient passes through the norms in between). The
gradients come from one edge-resolved forward (`routing.EdgeRouter`) with a zero leaf added to
every receiver's input, and one backward pass.

EAP-IG averages the gradients over `steps` runs whose token embeddings are interpolated from the
ablation value of the embeddings (the corrupted prompts' for "corrupt") to the clean prompts',
``e_a = e_ablated + a (e_clean - e_ablated)`` for a = 1/steps, 2/steps, ..., 1 (the a = 1 run
is the clean one, so EAP is EAP-IG with one step).

    scores = eap_scores(scope, graph, task, steps=5)     # [n_edges], same order as graph.edges
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from microscope.analysis.circuits.edge_patching import ablation_values
from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.routing import EdgeRouter
from microscope.analysis.circuits.tasks import CircuitTask


def eap_scores(scope, graph: CircuitGraph, task: CircuitTask, *, steps: int = 1,
               ablation: str = "corrupt") -> torch.Tensor:
    """[n_edges] EAP (steps=1) or EAP-IG (steps > 1) scores, in the metric's units."""
    values = ablation_values(scope, graph, task, ablation)
    grads: dict[tuple[str, int], torch.Tensor] = {}
    clean = None
    with _frozen(scope.model):
        for alpha in [1.0] + [step / steps for step in range(1, steps)]:   # the clean run first
            leaves: dict[tuple[str, int], torch.Tensor] = {}

            def leaf(kind: str, layer: int, senders) -> torch.Tensor:
                (batch, pos), d = task.clean.shape, scope.config.hidden_size
                shape = (batch, pos, _width(graph, kind), graph.n_entries((kind, layer)), d)
                leaves[kind, layer] = torch.zeros(shape, device=scope.device, requires_grad=True)
                return leaves[kind, layer]

            def embed(x: torch.Tensor, alpha: float = alpha) -> torch.Tensor:
                # the token embedding moved toward the ablation value of the embeddings sender
                # (position embeddings are the same in both runs)
                return x + (1 - alpha) * (values[:, :, 0].to(x) - clean[:, :, 0].to(x))

            router = EdgeRouter(scope.model, graph, leaf, embed_fn=embed if alpha < 1 else None)
            with torch.enable_grad(), scope.hooks(router.hooks()):
                metric = task.metric(scope.run(task.clean, attention_mask=task.mask))
                got = torch.autograd.grad(metric, list(leaves.values()))
            for key, grad in zip(leaves, got):
                grads[key] = grads[key] + grad if key in grads else grad
            if alpha == 1:
                clean = router.senders()
    diff = values.to(clean) - clean                                            # [b, p, S, d]
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    for (kind, layer), grad in grads.items():
        upstream = graph.upstream_senders(kind, layer)
        per_entry = torch.einsum("bpsd,bpred->sre", diff[:, :, :upstream], grad / steps)   # [S', R, E]
        entry = graph.entry[:upstream].to(per_entry.device)
        scores[:upstream, graph.group(kind, layer)] = per_entry.gather(
            2, entry[:, None, None].expand(-1, per_entry.shape[1], 1))[:, :, 0].cpu()
    return scores[graph.edges[:, 0], graph.edges[:, 1]]


def _width(graph: CircuitGraph, kind: str) -> int:
    return 3 * graph.n_heads if kind == "attn" else 1


@contextmanager
def _frozen(model):
    """Parameters without gradients for the block (only the receivers' leaves need them)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
