"""Circuits at edge level: the head/MLP graph, exact edge patching, EAP and EAP-IG, extraction.

See docs/circuits.md. Modules: `graph` (senders, receivers, edges), `routing` (the forward pass
in which every receiver reads its own residual), `tasks` (prompt pairs and metric),
`edge_patching` (exact, the reference).
"""
