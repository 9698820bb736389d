"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024).

The score of edge (s, r) estimates the metric change of ablating it to first order:

    score(s, r) = sum over prompts and positions of (ablated_s - clean_s) . d metric / d input_r

where input_r is receiver r's own copy of the residual (before its LayerNorm in pre-LN; at the
sender's entry point in post-LN, so the gradient passes through the norms in between).

Where the gradients come from:
- pre-LN (every OPT but 350m): one plain forward and backward of the model. A receiver reads
  ``LN(resid + delta)`` through its own slice of q/k/v_proj (or fc1), so its gradient is the
  backward's gradient at ``hook_q|k|v`` (or ``mlp.hook_pre``) times that slice, pulled back
  through the LayerNorm's Jacobian at the model's own residual (the same for every receiver of a
  layer at zero delta). The logits receiver's gradient is the one at the last ``hook_resid_post``.
  Only the last position's logits are computed (the metric reads nothing else).
- post-LN, or ``routed=True``: one edge-resolved forward (`routing.EdgeRouter`) with a zero leaf
  added to every receiver's input, and its backward. Slower (each head's q/k/v is recomputed from
  its own copy of the residual), and the reference the fast path is tested against.

EAP-IG averages the gradients over `steps` points of a path from the clean run toward the
ablated one (steps=1 is EAP: the clean point alone). Which path (`interpolate`):

- ``"inputs"`` (Hanna et al. 2024): the token embeddings, ``e_a = e_ablated + a (e_clean -
  e_ablated)`` for a = 1/steps, ..., 1 (the a = 1 run is the clean one); every receiver's
  gradient comes from the same `steps` runs. Query and key, and every link of a chain, move
  together along this path.
- ``"receivers"``: one path per receiver. Receiver r's input alone moves from the clean run toward
  every one of its incoming edges ablated, ``input_r + a * sum_s (value_s - clean_s)`` for
  a = 0, 1/steps, ..., (steps-1)/steps, the rest of the model clean; r's gradient is averaged
  along its own path. This is the regime single-edge patching probes (one receiver moved, the
  model otherwise clean), so it follows a receiver's own nonlinearity (a query/key mismatch, a
  saturated softmax downstream); for a receiver with one incoming edge it is that edge's exact
  effect, up to the Riemann sum. Cost: `steps` forwards and backwards per receiver, batched
  (between EAP-IG on inputs and exact patching's one forward per edge).

    scores = eap_scores(scope, graph, task, steps=5)                            # [n_edges]
    scores = eap_scores(scope, graph, task, steps=5, interpolate="receivers")   # same order
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch.nn import functional as F

from microscope.analysis.circuits.edge_patching import ablation_values, sender_outputs
from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.routing import EdgeRouter
from microscope.analysis.circuits.tasks import CircuitTask
from microscope.analysis.inputs import last_positions
from microscope.errors import AnalysisInputError
from microscope.models import anatomy
from microscope.names import act_name

# ((kind, layer), d metric / d input of each receiver of the group [R_group, n_entries, batch * pos * d_model])
Gradients = Iterator[tuple[tuple[str, int], torch.Tensor]]
Interpolation = Literal["inputs", "receivers"]
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)


def eap_scores(scope, graph: CircuitGraph, task: CircuitTask, *, steps: int = 1,
               ablation: str = "corrupt", routed: bool = False, interpolate: str = "inputs") -> torch.Tensor:
    """[n_edges] EAP (steps=1) or EAP-IG (steps > 1) scores, in the metric's units; `interpolate`:
    the path, "inputs" or "receivers" (see module doc). `routed`: take the gradients of the
    "inputs" path from the edge-resolved forward even in pre-LN."""
    if interpolate not in INTERPOLATIONS:
        raise AnalysisInputError(f"interpolate must be one of {INTERPOLATIONS}, got {interpolate!r}")
    if steps < 1:
        raise AnalysisInputError(f"steps must be at least 1, got {steps}")
    values = ablation_values(scope, graph, task, ablation)                     # [b, p, S, d]
    if interpolate == "receivers":
        return _receiver_path_scores(scope, graph, task, values, steps)
    receiver_gradients = _routed_gradients if routed or not graph.pre_ln else _backward_gradients
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    embed_diff = diff = None
    with _frozen(scope.model):
        for alpha in [1.0] + [step / steps for step in range(1, steps)]:   # the clean run first
            shift = None if alpha == 1 else (1 - alpha) * embed_diff
            senders, groups = receiver_gradients(scope, graph, task, shift)
            if alpha == 1:
                diff = values.to(senders) - senders
                embed_diff = diff[:, :, 0].clone()                            # [b, p, d]
                diff = diff.permute(2, 0, 1, 3).flatten(1)                    # [S, b * p * d]
            for (kind, layer), grad in groups:
                upstream, (r, e) = graph.upstream_senders(kind, layer), grad.shape[:2]
                per_entry = (diff[:upstream] @ grad.flatten(0, 1).T).view(upstream, r, e)
                entry = graph.entry[:upstream, None, None].expand(-1, r, 1).to(per_entry.device)
                scores[:upstream, graph.group(kind, layer)] += per_entry.gather(2, entry)[:, :, 0].cpu()
    return scores[graph.edges[:, 0], graph.edges[:, 1]] / steps


def _receiver_path_scores(scope, graph: CircuitGraph, task: CircuitTask, values: torch.Tensor, steps: int,
                          max_batch: int = 256) -> torch.Tensor:
    """[n_edges] EAP-IG along each receiver's own path (module doc), several receivers per forward
    (each `steps` copies of the batch; about `max_batch` sequences a forward)."""
    diff = values - sender_outputs(scope, graph, task.clean, task.mask).to(values)     # [b, p, S, d]
    receivers = [(kind, layer, i) for kind, layer in graph.groups for i in range(_width(graph, kind))]
    per_run = max(1, max_batch // (len(task) * steps))
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    with _frozen(scope.model):
        for start in range(0, len(receivers), per_run):
            chunk = receivers[start:start + per_run]
            for (kind, layer, i), grad in zip(chunk, _receiver_path_gradients(scope, graph, task, values, chunk, steps)):
                upstream, r = graph.upstream_senders(kind, layer), graph.group(kind, layer).start + i
                entry = graph.entry[:upstream]
                for e in range(len(grad)):           # the senders entering at e read the gradient there
                    chosen = (entry == e).nonzero()[:, 0]
                    scores[chosen, r] = torch.einsum("bpsd,bpd->s", diff[:, :, chosen.to(diff.device)], grad[e]).cpu()
    return scores[graph.edges[:, 0], graph.edges[:, 1]]


def _receiver_path_gradients(scope, graph: CircuitGraph, task: CircuitTask, values: torch.Tensor,
                             chunk: list[tuple[str, int, int]], steps: int) -> list[torch.Tensor]:
    """For each receiver (kind, layer, index in its group) of `chunk`, d metric / d its input
    [n_entries, b, p, d] averaged over the `steps` points of its own path; one edge-resolved run
    of len(chunk) x steps copies of the batch (copy j * steps + k: receiver j at a = k / steps)."""
    b, copies = len(task), len(chunk) * steps
    share = (torch.arange(steps, device=values.device, dtype=values.dtype) / steps).repeat_interleave(b)
    leaves: dict[int, torch.Tensor] = {}

    def delta(kind: str, layer: int, senders) -> torch.Tensor | None:
        here = [j for j, (k, l, _) in enumerate(chunk) if (k, l) == (kind, layer)]
        if not here:
            return None
        current = senders()                                                      # [copies * b, p, S', d]
        upstream, n_entries = current.shape[2], graph.n_entries((kind, layer))
        entry = F.one_hot(graph.entry[:upstream], n_entries).to(current)          # [S', E]
        out = current.new_zeros(*current.shape[:2], _width(graph, kind), n_entries, current.shape[-1])
        for j in here:
            rows = slice(j * steps * b, (j + 1) * steps * b)
            moved = values[:, :, :upstream].to(current).repeat(steps, 1, 1, 1) - current[rows]
            moved = torch.einsum("npsd,se->nped", moved, entry) * share[:, None, None, None]
            leaves[j] = torch.zeros_like(moved, requires_grad=True)
            out[rows, :, chunk[j][2]] = moved + leaves[j]
        return out

    ids, mask = task.clean.repeat(copies, 1).to(scope.device), task.mask.repeat(copies, 1).to(scope.device)
    router = EdgeRouter(scope.model, graph, delta)
    with torch.enable_grad(), scope.hooks(router.hooks()):
        last = last_positions(mask).to(scope.device)[:, None]
        logits = scope.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=last).logits
        metric = sum(task.log_odds(part).mean() for part in logits[:, 0].split(b)) / steps
        got = torch.autograd.grad(metric, [leaves[j] for j in range(len(chunk))])
    return [grad.view(steps, b, *grad.shape[1:]).sum(0).permute(2, 0, 1, 3) for grad in got]


def _routed_gradients(scope, graph: CircuitGraph, task: CircuitTask, shift: torch.Tensor | None
                      ) -> tuple[torch.Tensor, Gradients]:
    """The senders [b, p, S, d] of one edge-resolved run, and the gradients at zero leaves on
    every receiver's input; `shift` is added to the token embeddings (EAP-IG)."""
    leaves: dict[tuple[str, int], torch.Tensor] = {}

    def leaf(kind: str, layer: int, senders) -> torch.Tensor:
        (batch, pos), d = task.clean.shape, scope.config.hidden_size
        shape = (batch, pos, _width(graph, kind), graph.n_entries((kind, layer)), d)
        leaves[kind, layer] = torch.zeros(shape, device=scope.device, requires_grad=True)
        return leaves[kind, layer]

    router = EdgeRouter(scope.model, graph, leaf, embed_fn=None if shift is None else _shifted(shift))
    with torch.enable_grad(), scope.hooks(router.hooks()):
        metric = task.metric(scope.run(task.clean, attention_mask=task.mask, logits_to_keep=task.positions_read))
        got = torch.autograd.grad(metric, list(leaves.values()))
    return router.senders(), ((key, grad.permute(2, 3, 0, 1, 4).flatten(2)) for key, grad in zip(leaves, got))


def _backward_gradients(scope, graph: CircuitGraph, task: CircuitTask, shift: torch.Tensor | None
                        ) -> tuple[torch.Tensor | None, Gradients]:
    """pre-LN: the senders of one plain run (None in an interpolated run, where `shift` is added to
    the token embeddings) and the receivers' gradients from its backward (see module doc), one
    receiver group at a time."""
    resid: dict[str, torch.Tensor] = {}          # resid_pre / resid_mid of each layer, detached
    outputs: dict[str, torch.Tensor] = {}        # hook_q|k|v, mlp.hook_pre, last resid_post, in the graph

    def start_graph(x: torch.Tensor, hook) -> torch.Tensor:
        return x.detach().requires_grad_()       # the parameters are frozen: autograd starts here

    def keep_value(x: torch.Tensor, hook) -> None:
        resid[hook.name] = x.detach()

    def keep_output(x: torch.Tensor, hook) -> torch.Tensor:
        outputs[hook.name] = x.view_as(x)        # a node of its own, so autograd can differentiate it
        return outputs[hook.name]

    last = graph.n_layers - 1
    capture: dict[str, Callable] = {act_name("hook_embed"): start_graph, act_name("resid_post", last): keep_output}
    for l in range(graph.n_layers):
        capture |= {act_name("resid_pre", l): keep_value, act_name("resid_mid", l): keep_value,
                    act_name("mlp_pre", l): keep_output}
        capture |= {act_name(which, l): keep_output for which in "qkv"}
    if shift is None:     # the clean run: record the senders too
        router = EdgeRouter(scope.model, graph, lambda kind, layer, senders: None)
        first = router.hooks()
    else:                 # an interpolated run: only the gradients are needed
        router, first = None, {act_name("hook_embed"): lambda x, hook: _shifted(shift)(x)}
    ids, mask = task.clean.to(scope.device), task.mask.to(scope.device)
    last_token = last_positions(mask).to(scope.device)[:, None]                  # [b, 1]
    with torch.enable_grad(), scope.hooks(first), scope.hooks(capture):
        logits = scope.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=last_token).logits
        metric = task.log_odds(logits[:, 0]).mean()
        got = dict(zip(outputs, torch.autograd.grad(metric, list(outputs.values()))))
    return None if router is None else router.senders(), _pre_ln_groups(scope, graph, resid, got)


def _pre_ln_groups(scope, graph: CircuitGraph, resid: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
                   ) -> Gradients:
    """Each receiver group's gradients [R, 1, b * p * d] from the backward's gradients `got`
    (the norm's weight folded into the receivers' projection slices)."""
    yield ("logits", graph.n_layers), got[act_name("resid_post", graph.n_layers - 1)].reshape(1, 1, -1)
    h, d = graph.n_heads, scope.config.hidden_size
    some = next(iter(got.values()))
    for l, block in enumerate(anatomy.layers(scope.model)):
        attn, norm = block.self_attn, block.self_attn_layer_norm
        per_head = some.new_empty(3 * h, some.shape[0] * some.shape[1], d)          # [q heads, k heads, v heads, b*p, d]
        for i, which in enumerate("qkv"):
            torch.bmm(got[act_name(which, l)].flatten(0, 1).transpose(0, 1),      # [h, b*p, d_head]
                      (getattr(attn, f"{which}_proj").weight * norm.weight).view(h, -1, d), out=per_head[i * h:(i + 1) * h])
        yield ("attn", l), _through_norm(norm, resid[act_name("resid_pre", l)], per_head)[:, None]
        norm = block.final_layer_norm
        fc1_in = got[act_name("mlp_pre", l)].flatten(0, 1) @ (block.fc1.weight * norm.weight)      # [b*p, d]
        yield ("mlp", l), _through_norm(norm, resid[act_name("resid_mid", l)], fc1_in[None])[:, None]


def _through_norm(norm, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[R, b*p*d]: R gradients at ``norm(x)``'s output, already times the norm's weight
    (u [R, b*p, d]), pulled back to its input x [b, p, d].

    The LayerNorm's vector-Jacobian product written out, in place on u (torch's own backward
    would also compute the weight and bias gradients, R times): with x_hat = (x - mean) / s,
    dx = (u - mean(u) - x_hat mean(u x_hat)) / s."""
    x = x.flatten(0, 1)                                                   # [b*p, d]
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    inv_std = (var + norm.eps).rsqrt()
    x_hat = (x - mean) * inv_std
    along_x_hat = torch.einsum("rnd,nd->rn", u, x_hat)[..., None] / x.shape[-1]
    u.sub_(u.mean(-1, keepdim=True)).addcmul_(x_hat, along_x_hat, value=-1).mul_(inv_std)
    return u.flatten(1)


def _shifted(shift: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """An `EdgeRouter` embed_fn moving the token embeddings by `shift` [b, p, d] (position
    embeddings are the same in the clean and the ablated run)."""
    return lambda x: x + shift.to(x)


def _width(graph: CircuitGraph, kind: str) -> int:
    return 3 * graph.n_heads if kind == "attn" else 1


@contextmanager
def _frozen(model):
    """Parameters without gradients for the block (only the receivers' inputs need them)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
