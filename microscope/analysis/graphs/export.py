"""The pruned graph as circuit-tracer's frontend reads it: the JSON its `create_graph_files` writes.

    data = graph_json(graph, pruned, slug="toxicity", labels=labels)
    path = write_graph_files(graph, pruned, "results/graphs", slug="toxicity", labels=labels)
    # results/graphs/toxicity.json and results/graphs/graph-metadata.json (the frontend's index)

Fields as circuit-tracer 0.5 (``circuit_tracer/frontend/graph_models.py``; a test validates the
output with its pydantic `Model`): ``metadata`` (slug, scan, transcoder_list, prompt_tokens,
prompt, node_threshold, schema_version), ``qParams``, ``nodes`` (node_id, feature, layer, ctx_idx,
feature_type, token_prob, is_target_logit, run_idx, reverse_ctx_idx, jsNodeId, clerp, influence,
activation) and ``links`` (source, target, weight). Node ids follow circuit-tracer: a feature
``{layer}_{latent}_{pos}`` (its ``feature`` the Cantor pairing of layer and latent), an error
``0_{layer}_{pos}``, an input ``E_{token id}_{pos}``, a logit ``{layers + 1}_{token id}_{pos}``;
``influence`` is the node's cumulative share of influence in descending order. Only kept nodes
joined by a kept edge are written, and every input and logit node.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from microscope.analysis.graphs.attribution import Graph
from microscope.analysis.graphs.pruning import Pruned

METADATA_FILE = "graph-metadata.json"
FEATURE_TYPE = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "token": "embedding",
                "logit": "logit"}       # circuit-tracer's names (it calls every transcoder feature so)


def cantor(x: int, y: int) -> int:
    """Cantor's pairing of two non-negative integers (circuit-tracer's feature number)."""
    return (x + y) * (x + y + 1) // 2 + y


def scan_name(scan: str | list[str]) -> tuple[str, list[str]]:
    """(scan, transcoder_list): a list of transcoders is named ``custom-<sha256 prefix>``."""
    if isinstance(scan, str):
        return scan, []
    return "custom-" + hashlib.sha256("-".join(scan).encode()).hexdigest()[:16], list(scan)


def node_record(graph: Graph, i: int, pruned: Pruned, labels: Mapping[tuple[int, int], str]) -> dict:
    """The JSON node of node i (see the module docstring)."""
    kind, influence = graph.kind(i), float(pruned.cumulative[i])
    common = dict(feature_type=FEATURE_TYPE[kind], token_prob=0.0, is_target_logit=False, run_idx=0,
                  reverse_ctx_idx=0, clerp="", influence=influence, activation=None)
    if kind == "feature":
        layer, pos, latent = graph.features[i].tolist()
        return {**common, "node_id": f"{layer}_{latent}_{pos}", "feature": cantor(layer, latent), "layer": str(layer),
                "ctx_idx": pos, "jsNodeId": f"{layer}_{latent}-0", "clerp": labels.get((layer, latent), ""),
                "activation": float(graph.activations[i])}
    if kind == "error":
        layer, pos = divmod(i - graph.error_start, graph.n_pos)
        return {**common, "node_id": f"0_{layer}_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
                "jsNodeId": f"{layer}_{pos}-0"}
    if kind == "token":
        pos = i - graph.token_start
        token = int(graph.input_ids[pos])
        return {**common, "node_id": f"E_{token}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                "jsNodeId": f"E_{token}-{pos}"}
    k = i - graph.logit_start
    token, layer, pos = int(graph.logit_tokens[k]), str(graph.n_layers + 1), graph.n_pos - 1
    prob = float(graph.logit_probabilities[k])
    return {**common, "node_id": f"{layer}_{token}_{pos}", "feature": token, "layer": layer, "ctx_idx": pos,
            "jsNodeId": f"L_{token}-{pos}", "token_prob": prob, "is_target_logit": k == 0,
            "clerp": f'Output "{graph.logit_labels[k]}" (p={prob:.3f})', "influence": influence}


def graph_json(graph: Graph, pruned: Pruned, *, slug: str, scan: str | list[str] | None = None,
               labels: Mapping[tuple[int, int], str] | None = None) -> dict:
    """The circuit-tracer JSON of the pruned graph. scan: the transcoders' name (default: the
    graph's transcoder list); labels: {(layer, latent): text} shown as each feature's ``clerp``."""
    kept = pruned.node_mask.nonzero()[:, 0].tolist()
    nodes = {i: node_record(graph, i, pruned, labels or {}) for i in kept}
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in nodes and t in nodes]
    joined = {link["source"] for link in links} | {link["target"] for link in links}
    used = [n for n in nodes.values() if n["node_id"] in joined or n["feature_type"] in ("embedding", "logit")]
    scan, transcoder_list = scan_name(scan if scan is not None else graph.scan)
    metadata = {"slug": slug, "scan": scan, "transcoder_list": transcoder_list, "prompt_tokens": list(graph.tokens),
                "prompt": graph.prompt, "node_threshold": pruned.node_threshold, "schema_version": 1}
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": used, "links": links}


def write_graph_files(graph: Graph, pruned: Pruned, out: str | Path, *, slug: str,
                      scan: str | list[str] | None = None, labels: Mapping[tuple[int, int], str] | None = None) -> Path:
    """Write ``out/<slug>.json`` and add its metadata to ``out/graph-metadata.json`` (replacing an
    entry of the same slug), as circuit-tracer's `create_graph_files` does; returns the JSON's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = graph_json(graph, pruned, slug=slug, scan=scan, labels=labels)
    path = out / f"{slug}.json"
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    index = out / METADATA_FILE
    listing = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {"graphs": []}
    listing["graphs"] = [g for g in listing["graphs"] if g.get("slug") != slug] + [data["metadata"]]
    index.write_text(json.dumps(listing, indent=2) + "\n", encoding="utf-8")
    return path
