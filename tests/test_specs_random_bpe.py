"""Every shipped spec runs on any OPT checkpoint: pointed with ``--model`` at random weights of both
OPT layouts with OPT's byte-level BPE (the GPT-2 stand-in tokenizer, a 50k vocabulary: words of
several tokens, leading-space tokens, pairs of unequal token length), each exits 0 and names
nothing. A random model has nothing to find: no control cleared, no head, layer, latent,
mechanism or patch site named.

The controls are cut with ``--param`` to what a CI core affords (two random-init models, a few
random heads and directions, 5-step tuned lenses, 20-step dictionaries); the rule a claim must
pass is the one every run uses (`analysis.controls.Controlled`: past the null's max by a margin
and past the bound where one more draw of the null lands 1% of the time, wide on two draws).
`test_the_claim_detector_sees_a_claim` shows the detector is not blind; on the organism the same
studies do claim (tests/test_studies_v3.py). The demo spec, which runs the four studies their own
specs run here on both layouts, runs on the post-LN layout only. The post-LN runs are in
tests/test_specs_random_bpe_post_ln.py (one file per layout: the test workers share them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from microscope.cli import app
from microscope.workbench.experiments import SHIPPED_SPECS, list_specs

CHEAP = {   # step -> --param values
    "toxicity": dict(seeds="[1, 2]", lens_steps=5, n_random_directions=3, n_random_heads=3, strengths="[0.0, 2.0]"),
    "repetition": dict(seeds="[1, 2]", n_random_half_loss=5),
    "instructions": dict(seeds="[1, 2]", lens_steps=5),
    "arithmetic": dict(seeds="[1, 2]", lens_steps=5),
    "circuit": dict(control_seeds="[1, 2]"),
    "features": dict(steps=20, control_seeds="[1, 2]"),
    "graph": dict(steps=20, control_seeds="[1, 2]", intervention_draws=2, copy_draws=2),
}
NAMING_WORDS = ("heads", "layer_name", "probe_layer", "read_layer", "mechanism", "site", "latent", "edges",
                "components")
SPECS = sorted(spec.name for spec in list_specs(SHIPPED_SPECS))
# the demo runs the four studies that their own specs run on both layouts, then the report: once,
# on the post-LN layout (tests/test_specs_random_bpe_post_ln.py), keeps CI's budget
ON_BOTH_LAYOUTS = [name for name in SPECS if name != "demo"]


def claims(summary: dict) -> dict:
    """Every claim a summary makes: controls it clears, and components, layers or latents it names
    (a name is text, a list holding text or records, or a latent's index; "none"/"other" name
    nothing, and a list of numbers, such as edge counts, names nothing)."""
    def names(key: str, value) -> bool:
        if isinstance(value, list):
            return any(isinstance(item, (str, dict)) for item in value)
        return isinstance(value, str) and value not in ("none", "other") or key.endswith("latent") and type(value) is int
    cleared = {k: v for k, v in summary.items() if k.endswith("_clears_control") and v is True}
    named = {k: v for k, v in summary.items()
             if any(w in k for w in NAMING_WORDS) and "control" not in k and names(k, v)}
    return {**cleared, **named}


def run_spec_and_check_it_names_nothing(name: str, folder: Path) -> None:
    """`microscope run NAME --model FOLDER --param ...` (the cheap controls) in the current folder:
    exits 0, and no section of its headline makes a claim."""
    spec = next(s for s in list_specs(SHIPPED_SPECS) if s.name == name)
    params = [f"--param={step}.{key}={value}" for step in spec.analysis for key, value in CHEAP.get(step, {}).items()]
    result = CliRunner().invoke(app, ["run", name, "--model", str(folder), *params])
    assert result.exit_code == 0, result.output
    record = json.loads((Path("results") / f"{spec.out_dir.name}-{folder.name}" / "results.json").read_text())
    made = {section: claims(numbers) for section, numbers in record["headline"].items()}
    assert not any(made.values()), made


@pytest.mark.parametrize("name", ON_BOTH_LAYOUTS)
def test_every_shipped_spec_runs_on_random_pre_ln_weights_and_names_nothing(tmp_path, monkeypatch,
                                                                            opt_bpe_checkpoints, name):
    monkeypatch.chdir(tmp_path)
    run_spec_and_check_it_names_nothing(name, opt_bpe_checkpoints["pre_ln"])


def test_the_claim_detector_sees_a_claim():
    assert claims({"cue_heads": ["L0H1"], "x_clears_control": True, "probe_layer": None, "hostile_latent": 7,
                   "y_clears_control": False, "wrong_answer_mechanism": "other", "strongest_patch_site": "L1.mlp",
                   "circuit_heads": [], "patched_heads_in_circuit": True, "minimal_edges_random_init": [23, 171],
                   "exact_top_edges": [{"edge": "MLP0->L1H0.q", "share": 0.4}]}) == \
        {"cue_heads": ["L0H1"], "x_clears_control": True, "strongest_patch_site": "L1.mlp", "hostile_latent": 7,
         "exact_top_edges": [{"edge": "MLP0->L1H0.q", "share": 0.4}]}


def test_a_param_override_reaches_the_step_and_a_stray_one_is_refused(tmp_path, monkeypatch, opt_bpe_checkpoints):
    monkeypatch.chdir(tmp_path)
    folder = str(opt_bpe_checkpoints["pre_ln"])
    bad = CliRunner().invoke(app, ["run", "induction_heads", "--model", folder, "--param", "toxicity.seeds=[1]"])
    assert bad.exit_code != 0 and "'toxicity' is not a step of this spec" in " ".join(bad.output.split())
    unknown = CliRunner().invoke(app, ["run", "induction_heads", "--model", folder, "--param", "head_scores.nope=1"])
    assert unknown.exit_code != 0 and "nope" in unknown.output
    malformed = CliRunner().invoke(app, ["run", "induction_heads", "--model", folder, "--param", "kinds"])
    assert malformed.exit_code != 0 and "STEP.KEY=VALUE" in malformed.output
    run = CliRunner().invoke(app, ["run", "induction_heads", "--model", folder, "--param", 'head_scores.kinds=["induction"]'])
    assert run.exit_code == 0, run.output
    record = json.loads(next(Path("results").glob("induction_heads-*/results.json")).read_text())
    assert [k for k in record["headline"] if "induction" in k] and not [k for k in record["headline"] if "previous" in k]
