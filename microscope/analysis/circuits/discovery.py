"""Find a task's circuit: exact edge effects, EAP and EAP-IG scores, the faithfulness curve of the
EAP-IG ranking and MIB's curves (CPR, CMD), and the same on random-init models of the same shape
as the control.

    result = find_circuit(scope, repetition_task(scope), steps=5, interpolate="receivers")
    result.summary()["spearman_eap_ig"], result.summary()["faithfulness"]
    run_circuit(scope, task="repetition")          # the workbench step (`microscope run ...`)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from scipy.stats import spearmanr

from microscope.analysis.circuits.eap import Interpolation, eap_scores
from microscope.analysis.circuits.edge_patching import EdgeAblation, exact_edge_effects
from microscope.analysis.circuits.extraction import edge_grid, faithfulness_curve, minimal_circuit
from microscope.analysis.circuits.graph import CircuitGraph
from microscope.analysis.circuits.mib import mib_curves
from microscope.analysis.circuits.results import Agreement, CircuitResult, budget_edges
from microscope.analysis.circuits.tasks import CircuitTask, repetition_task, toxicity_task
from microscope.analysis.controls import DEFAULT_SEEDS, random_init_scopes
from microscope.analysis.inputs import where_present
from microscope.analysis.progress import Progress, report
from microscope.errors import AnalysisInputError
from microscope.hooks.interventions import ablate_heads, patch_from
from microscope.names import act_name

Task = Literal["repetition", "toxicity"]
TASKS: tuple[str, ...] = get_args(Task)
Ranking = Literal["eap_ig", "exact"]      # what the circuit is extracted by
RANKINGS: tuple[str, ...] = get_args(Ranking)
RANDOM_CIRCUITS = 20   # draws of as many random edges the headline circuit is held against


def agreement(exact: torch.Tensor, estimate: torch.Tensor, gap: float, *, share: float = 0.01,
              top: int = 20) -> Agreement:
    """How an estimate ranks edges against exact patching, over the edges whose exact effect
    exceeds `share` of the clean-vs-corrupt metric gap: Spearman of |values| (the ranking that
    extraction uses) and of signed values, and the overlap of the `top` edges by |value|."""
    big = exact.abs() > share * abs(gap)
    top = min(top, len(exact))
    overlap = len(set(exact.abs().topk(top).indices.tolist()) & set(estimate.abs().topk(top).indices.tolist()))
    return Agreement(spearman=float(spearmanr(exact[big].abs(), estimate[big].abs())[0]),
                     spearman_signed=float(spearmanr(exact[big], estimate[big])[0]),
                     top_overlap=overlap / top, top=top, compared=int(big.sum()))


@torch.no_grad()
def head_ablation(scope, task: CircuitTask) -> dict[str, torch.Tensor]:
    """Node-level evidence to compare the circuit's heads with, {method: [layer, head]}: the metric
    on the clean prompts minus the same with one head's output (``attn.hook_z``, every position)
    ``"zeroed"`` (`interventions.ablate_heads`) or ``"patched"`` from the corrupted prompts
    (`interventions.patch_from`, as the toxicity study finds its cue heads; the node version of
    ablating every edge the head sends)."""
    c = scope.config
    names = [act_name("z", l) for l in range(c.num_hidden_layers)]
    _, corrupt = scope.run_with_cache(task.corrupt, names=names, attention_mask=task.corrupt_attention_mask)
    if task.clean_only.any():          # positions the corrupted prompt lacks keep their clean value
        _, clean_cache = scope.run_with_cache(task.clean, names=names, attention_mask=task.mask)
        for name in names:
            corrupt[name].copy_(where_present(~task.clean_only, corrupt[name], clean_cache[name]))

    def metric(hooks=None) -> float:
        return float(task.metric(scope.run(task.clean, attention_mask=task.mask, hooks=hooks,
                                          logits_to_keep=task.positions_read)))
    clean = metric()
    return {"zeroed": torch.tensor([[clean - metric(ablate_heads([(l, h)])) for h in range(c.num_attention_heads)]
                                    for l in range(c.num_hidden_layers)]),
            "patched": torch.tensor([[clean - metric(patch_from(corrupt, names[l], heads=[h]))
                                      for h in range(c.num_attention_heads)] for l in range(c.num_hidden_layers)])}


def find_circuit(scope, task: CircuitTask, *, steps: int = 5, ablation: EdgeAblation = "corrupt",
                 target: float = 0.8, budget: float = 0.1, exact: bool = True, rank_by: Ranking = "eap_ig",
                 interpolate: Interpolation = "inputs", control_seeds: Sequence[int] = DEFAULT_SEEDS,
                 random_circuits: int = RANDOM_CIRCUITS, progress: Progress | None = None) -> CircuitResult:
    """Score every edge (EAP-IG with `steps` along the `interpolate` path, "inputs" or
    "receivers" (`eap.py`); EAP and exact patching beside it when `exact`, and then EAP-IG on
    inputs too if the path is another), extract the circuit (faithfulness curve of the ranking
    by |`rank_by`|: "eap_ig", or "exact" where one forward per edge is affordable, the EAP-IG
    ranking's curve then shown beside it; `budget`: the share of edges the headline circuit
    keeps; `target`: the faithfulness the minimal circuit must reach; MIB's CPR and CMD of each
    ranking, `mib.py`), and run the same extraction on random-init models (`control_seeds`); the
    headline circuit is also held against ``random_circuits`` draws of as many random edges of the
    same model (a random-init model has no behaviour to recover, so it alone passes any circuit).
    progress: hears each piece of work as it finishes (`analysis.progress`)."""
    if rank_by not in RANKINGS:
        raise AnalysisInputError(f"rank_by must be one of {RANKINGS}, got {rank_by!r}")
    if rank_by == "exact" and not exact:
        raise AnalysisInputError("rank_by = 'exact' needs exact = true (the exact effect of every edge)")
    graph = CircuitGraph.of(scope.model)
    ks = sorted({*edge_grid(graph.n_edges), budget_edges(graph.n_edges, budget)})

    def scored(model_scope) -> dict[str, torch.Tensor]:
        scores = {"eap_ig": eap_scores(model_scope, graph, task, steps=steps, ablation=ablation,
                                       interpolate=interpolate)}
        if exact:
            scores["exact"] = exact_edge_effects(model_scope, graph, task, ablation=ablation)
        return scores

    scores = scored(scope)
    report(progress, "edge scores")
    curves = {name: faithfulness_curve(scope, graph, task, values, ks=ks, ablation=ablation)
              for name, values in scores.items()}
    mib = {name: mib_curves(scope, graph, task, values, ablation=ablation) for name, values in scores.items()}
    report(progress, "faithfulness curves")
    curve = curves.pop(rank_by)
    gap = curve.clean - curve.corrupt
    g = torch.Generator().manual_seed(0)
    random_edges = [faithfulness_curve(scope, graph, task, torch.rand(graph.n_edges, generator=g),
                                       ks=[budget_edges(graph.n_edges, budget)], ablation=ablation).faithfulness[0]
                    for _ in range(random_circuits)]
    eap = eap_scores(scope, graph, task, steps=1, ablation=ablation) if exact else None
    on_inputs = (eap_scores(scope, graph, task, steps=steps, ablation=ablation)
                 if exact and interpolate != "inputs" else None)
    report(progress, "estimates for comparison")
    control_scores, controls, control_mib = [], [], []
    for control in random_init_scopes(scope, control_seeds, progress=progress):
        control_scores.append(scored(control)[rank_by])
        controls.append(faithfulness_curve(control, graph, task, control_scores[-1], ks=ks, ablation=ablation))
        control_mib.append(mib_curves(control, graph, task, control_scores[-1], ablation=ablation))
    return CircuitResult(
        task=task.name, graph=graph, eap_ig=scores["eap_ig"], curve=curve, controls=controls,
        control_scores=control_scores, head_ablation=head_ablation(scope, task), target=target, budget=budget,
        minimal=minimal_circuit(curve, target), steps=steps, rank_by=rank_by, interpolate=interpolate,
        other_curves=curves, exact=scores.get("exact"), eap=eap, eap_ig_inputs=on_inputs,
        agreement_eap_ig=agreement(scores["exact"], scores["eap_ig"], gap) if exact else None,
        agreement_eap=agreement(scores["exact"], eap, gap) if exact else None,
        agreement_eap_ig_inputs=None if on_inputs is None else agreement(scores["exact"], on_inputs, gap),
        mib=mib, control_mib=control_mib, random_edge_faithfulness=random_edges)


def run_circuit(scope, task: Task = "repetition", *, n_prompts: int = 32, span: int = 10, shown: int = 5,
                words: Sequence[str] | None = None, prompts: str = "toxicity", good: Sequence[str] | None = None,
                bad: Sequence[str] | None = None, seed: int = 0, steps: int = 5, ablation: EdgeAblation = "corrupt",
                target: float = 0.8, budget: float = 0.1, exact: bool = True, rank_by: Ranking = "eap_ig",
                interpolate: Interpolation = "inputs", control_seeds: Sequence[int] = DEFAULT_SEEDS,
                progress: Progress | None = None) -> CircuitResult:
    """The workbench step: build the named task from its parameters (repetition: n_prompts, span,
    shown, words, seed; toxicity: prompts, good, bad -- the words default to the prompt set's
    task) and `find_circuit` on it."""
    if task == "repetition":
        built = repetition_task(scope, n_prompts=n_prompts, span=span, shown=shown, seed=seed, words=words)
    elif task == "toxicity":
        built = toxicity_task(scope, prompts, good=good, bad=bad)
    else:
        raise AnalysisInputError(f"task must be one of {TASKS}, got {task!r}")
    return find_circuit(scope, built, steps=steps, ablation=ablation, target=target, budget=budget, exact=exact,
                        rank_by=rank_by, interpolate=interpolate, control_seeds=control_seeds, progress=progress)
