"""Circuits at edge level: the head/MLP graph, exact edge patching, EAP and EAP-IG, extraction.

See docs/circuits.md. Modules, bottom up: `graph` (senders, receivers, edges), `routing` (the
forward pass in which every receiver reads its own residual), `tasks` (prompt pairs and metric),
`edge_patching` (exact, the reference), `eap` (EAP, EAP-IG), `extraction` (faithfulness curve,
minimal circuit), `mib` (MIB's CPR and CMD), `results` (`CircuitResult`), `discovery`
(`find_circuit`, the workbench step `run_circuit`).
"""
