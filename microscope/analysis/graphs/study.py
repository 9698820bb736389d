"""The attribution-graph step of an experiment: transcoders from the store, one prompt's graph,
its scores, the interventions that test it and the random-init control.

    result = run_attribution_graph(scope, store, prompt='Laura was bitter. ... "You are such a',
                                   target_set="toxicity", cue="bitter", out="results/graph")
    result.summary()   # replacement_score, completeness (+ random-init controls), intervention_spearman, ...

Recipe: train one transcoder per block on `store` (`transcoders.train_transcoders`; or load the
folder `transcoders`), build the replacement model and the graph of `prompt` toward the target
logits (the first tokens of `targets` words, of the `target_key` words of prompt set
`target_set`'s task, or circuit-tracer's salient logits), prune it, and write circuit-tracer's
JSON into `out/<slug>.json`. Then: ablate the `interventions` feature nodes of largest influence
in the replacement model against the graph's prediction (`graphs.interventions`); the strongest
kept path from the `cue` word's token to a logit (`graphs.paths`); the copy edge when the top
target occurs earlier in the prompt (`graphs.copying`); feature labels from the store's
dashboards. The control: random-init models of the same shape (`controls.random_init_scopes`),
each with its own store of the same prompts and its own transcoders trained the same way, give
the probability of the targets (the premise every claim rests on; when the targets are chosen by
salience, each model's own salient targets), and the replacement and completeness of their own
graphs of the same prompt and targets.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from microscope.activations.dump import dump
from microscope.activations.reader import ActivationStore, open_store
from microscope.analysis.controls import DEFAULT_SEEDS, random_init_scopes
from microscope.analysis.features.study import store_prompts
from microscope.analysis.features.train import TrainSettings
from microscope.analysis.graphs.attribution import attribute
from microscope.analysis.graphs.copying import copying
from microscope.analysis.graphs.export import write_graph_files
from microscope.analysis.graphs.interventions import check_interventions
from microscope.analysis.graphs.labels import feature_labels
from microscope.analysis.graphs.paths import strongest_path
from microscope.analysis.graphs.pruning import graph_scores, prune
from microscope.analysis.graphs.replacement import ReplacementModel
from microscope.analysis.graphs.result import ControlGraph, GraphResult
from microscope.analysis.graphs.transcoders import Transcoders, load_transcoders, mlp_hooks, train_transcoders
from microscope.analysis.inputs import first_token_id, task_value, word_class_ids
from microscope.analysis.progress import Progress, report
from microscope.errors import AnalysisInputError
from microscope.names import every_layer


def target_ids(scope, targets: list[str] | None, target_set: str | None, target_key: str) -> torch.Tensor | None:
    """The target logits' token ids: the first token of each word of `targets`, or of the
    `target_key` words of prompt set `target_set`'s task; None when neither is given."""
    if targets is None and target_set is None:
        return None
    words = task_value(target_set, target_key, targets, parameter="targets")
    return word_class_ids(scope, words, parameter="targets", prompts=target_set)


def cue_position(scope, ids: torch.Tensor, cue: str) -> int:
    """The last position before the final token holding the first token of the word `cue`."""
    token = first_token_id(scope, cue)
    found = (ids[:-1] == token).nonzero()[:, 0]
    if not len(found):
        raise AnalysisInputError(f"the cue {cue!r} (token {token}) is not in the prompt's tokens before the last; "
                                 "give a word of the prompt as it follows a space")
    return int(found[-1])


def run_attribution_graph(scope, store: ActivationStore | None = None, *, prompt: str,
                          targets: list[str] | None = None, target_set: str | None = None,
                          target_key: str = "insults", cue: str | None = None, transcoders: str | None = None,
                          out: str = "results/graph", slug: str = "graph", steps: int = 300,
                          batch_size: int = 512, k: int = 16, expansion_factor: int = 8,
                          dead_tokens: int = 20_000, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                          max_n_logits: int = 10, desired_logit_prob: float = 0.95, interventions: int = 20,
                          intervention_draws: int = 5, copy_draws: int = 5,
                          control_seeds: tuple[int, ...] | list[int] = DEFAULT_SEEDS,
                          seed: int = 0,
                          progress: Progress | None = None) -> GraphResult:
    """See the module docstring. transcoders: a folder of trained transcoders (default: train them
    from `store` into ``out/transcoders``); control_seeds: the random-init models (they need the
    store: its prompts are dumped through each and train its transcoders)."""
    if transcoders is None and store is None:
        raise AnalysisInputError(f"give a store to train transcoders from (the experiment's dump of "
                                 f"{every_layer('resid_mid')} and {every_layer('mlp_out')}) or a transcoders folder")
    if control_seeds and store is None:
        raise AnalysisInputError("the random-init controls train their transcoders on the store's prompts: give the "
                                 "store, or control_seeds=[]")
    out_dir = Path(out)
    settings = TrainSettings(steps=steps, batch_size=batch_size, k=k, expansion_factor=expansion_factor,
                             dead_tokens=dead_tokens, seed=seed, checkpoint_every=steps)
    tcs = (load_transcoders(transcoders) if transcoders is not None
           else train_transcoders(store, out_dir / "transcoders", settings=settings, resume=False, progress=progress))
    wanted = target_ids(scope, targets, target_set, target_key)
    rm = ReplacementModel(scope, tcs, prompt)
    graph = attribute(rm, wanted, max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob)
    pruned = prune(graph, node_threshold, edge_threshold)
    replacement, completeness = graph_scores(graph)
    report(progress, "attribution graph")
    check = (check_interventions(rm, graph, pruned.node_influence, n=interventions, draws=intervention_draws, seed=seed)
             if interventions else None)
    path = strongest_path(graph, pruned, graph.token_start + cue_position(scope, rm.input_ids, cue)) if cue else None
    labels = {}
    if store is not None:
        kept = pruned.node_mask[:graph.n_features].nonzero()[:, 0]
        labels = feature_labels(tcs, store, [(int(graph.features[i, 0]), int(graph.features[i, 2])) for i in kept],
                                scope=scope)
    json_path = write_graph_files(graph, pruned, out_dir, slug=slug, labels=labels)
    report(progress, "interventions, paths, labels")
    controls = []
    for control, i in zip(random_init_scopes(scope, control_seeds, progress=progress), control_seeds):
        path_i = out_dir / f"control_{i}.zarr"
        shutil.rmtree(path_i, ignore_errors=True)
        dump(control, store_prompts(store), [h for layer in range(len(tcs)) for h in mlp_hooks(layer)], str(path_i),
             seed=seed)
        control_tcs: Transcoders = train_transcoders(open_store(str(path_i)), out_dir / f"control_{i}",
                                                     settings=settings, resume=False)
        # targets given: the same tokens; chosen by salience: each model's own salient logits (the
        # probability of tokens picked from this model's own top logits would favour it by construction)
        control_graph = attribute(ReplacementModel(control, control_tcs, prompt),
                                  graph.logit_tokens if wanted is not None else None,
                                  max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob)
        controls.append(ControlGraph(*graph_scores(control_graph), float(control_graph.logit_probabilities.sum())))
    return GraphResult(graph=graph, pruned=pruned, replacement_score=replacement, completeness=completeness,
                       labels=labels, interventions=check, controls=controls,
                       control_name=f"random init, own transcoders (seeds {list(control_seeds)})",
                       cue_path=path, copy=copying(rm, graph, draws=copy_draws, seed=seed),
                       json_path=str(json_path))
