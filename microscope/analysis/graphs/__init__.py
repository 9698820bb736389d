"""Attribution graphs (Ameisen et al. 2025, "circuit tracing"; circuit-tracer 0.5) on OPT, both layouts.

    from microscope.analysis.graphs import (train_transcoders, load_transcoders, ReplacementModel,
                                            attribute, prune, graph_scores, write_graph_files)
    tcs = train_transcoders(store, "results/transcoders", steps=300, k=16)
    rm = ReplacementModel(scope, tcs, prompt)        # MLPs -> transcoders; attention and norms frozen
    graph = attribute(rm, targets)                   # the adjacency, by batched backward passes
    pruned = prune(graph); graph_scores(graph)       # circuit-tracer's pruning, replacement, completeness

See docs/graphs.md. Modules, bottom up: `transcoders` (one per MLP, from one store), `replacement`
(the frozen replacement model of one prompt), `attribution` (nodes, edges, `Graph`), `pruning`
(influence, thresholds, scores), `paths` (strongest path), `copying` (a copy edge through frozen
attention), `interventions` (predicted against measured ablations), `labels` (from dashboards),
`export` (circuit-tracer's JSON), `result` (`GraphResult`), `study` (the workbench step `graph`).
"""

from microscope.analysis.graphs.attribution import Graph, attribute
from microscope.analysis.graphs.export import graph_json, write_graph_files
from microscope.analysis.graphs.pruning import Pruned, graph_scores, prune
from microscope.analysis.graphs.replacement import ReplacementModel
from microscope.analysis.graphs.transcoders import Transcoders, load_transcoders, train_transcoders

__all__ = ["Graph", "attribute", "graph_json", "write_graph_files", "Pruned", "graph_scores", "prune",
           "ReplacementModel", "Transcoders", "load_transcoders", "train_transcoders"]
