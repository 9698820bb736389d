"""The experiment library: specs load and are checked with clear errors; every shipped spec runs
and its results carry provenance. (The demo spec runs in test_workbench_demo.py, through the
README's own command, so CI runs it once.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microscope.analysis.registry import ANALYSES
from microscope.errors import ExperimentSpecError, ModelNotFoundError
from microscope.provenance import FIELDS
from microscope.workbench.experiments import (DUMP, SHIPPED_SPECS, STEPS, ExperimentSpec, check_params,
                                              find_spec, list_specs, load_spec, run_experiment, select_prompts)
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = ROOT / "experiments"
SHIPPED = sorted(p.stem for p in SPEC_DIR.glob("*.toml"))
REQUIRED = {"demo", "induction_heads", "toxicity_probe_steering", "repetition_loops", "instruction_failures",
            "arithmetic", "dump_opt_1_3b"}
# The demo runs in test_workbench_demo.py. The circuit and features specs take 40-90 s each (CI's
# budget is 15 minutes): their step functions run in test_circuits_*.py and test_features_*.py, and
# the specs' parameters are checked against those functions below.
RUN_ELSEWHERE = {"demo", "dump_opt_1_3b", "circuit_repetition", "circuit_toxicity", "features_toxicity",
                 "attribution_graph_toxicity", "attribution_graph_repetition"}   # step: test_graphs_organism.py
ORGANISM_SPECS = [name for name in SHIPPED if name not in RUN_ELSEWHERE]

GOOD = """
purpose = "A test experiment."
model = "organism"
seed = 3
prompts = "demo"
hooks = "blocks.*.hook_resid_post, blocks.0.attn.hook_pattern"
analysis = ["dump", "arithmetic"]

[params.arithmetic]
prompts = { from = "demo", where = { set = "arithmetic" } }

[outputs]
dir = "out/x"
store = "out/x.zarr"
"""


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- loading and checking -------------------------------------------------------------------

def test_the_library_ships_every_required_experiment_each_with_a_one_line_purpose():
    specs = {spec.name: spec for spec in list_specs(SPEC_DIR)}
    assert REQUIRED <= set(specs)
    for spec in specs.values():
        assert spec.purpose and "\n" not in spec.purpose and len(spec.purpose) < 140


def test_a_good_spec_loads_with_every_field(tmp_path):
    spec = load_spec(write(tmp_path, GOOD, "my_exp.toml"))
    assert isinstance(spec, ExperimentSpec)
    assert spec.name == "my_exp" and spec.model == "organism" and spec.seed == 3
    assert spec.hooks == ("blocks.*.hook_resid_post", "blocks.0.attn.hook_pattern")
    assert spec.analysis == ("dump", "arithmetic")
    assert spec.out_dir == Path("out/x") and spec.store == Path("out/x.zarr") and spec.report is True


def test_defaults_output_folder_from_the_file_name(tmp_path):
    spec = load_spec(write(tmp_path, 'purpose = "p"\nmodel = "organism"\nanalysis = ["arithmetic"]\n', "abc.toml"))
    assert spec.out_dir == Path("results/abc") and spec.seed == 0 and spec.store is None


@pytest.mark.parametrize("text, message", [
    ('purpose = "p"\nmodel = "organism"\n', "missing required key 'analysis'"),
    ('purpose = "p"\nmodel = "organism"\nanalysis = ["telepathy"]\n', "unknown analysis 'telepathy'"),
    ('purpose = "p"\nmodel = "organism"\nanalysis = []\n', "non-empty list"),
    ('purpose = "p"\nmodel = "organism"\nanalysis = ["arithmetic"]\nmodle = 1\n', "unknown key(s) ['modle']"),
    ('purpose = ""\nmodel = "organism"\nanalysis = ["arithmetic"]\n', "'purpose' must be one non-empty line"),
    ('purpose = "p"\nmodel = 3\nanalysis = ["arithmetic"]\n', "'model' must be a string"),
    ('purpose = "p"\nmodel = "organism"\nseed = "zero"\nanalysis = ["arithmetic"]\n', "'seed' must be an integer"),
    ('purpose = "p"\nmodel = "organism"\nanalysis = ["dump"]\n', "the 'dump' step needs"),
    ('purpose = "p"\nmodel = "organism"\nanalysis = ["arithmetic"]\n[params.toxicity]\nx = 1\n',
     "[params.toxicity] is for a step not in 'analysis'"),
    ('purpose = "p"\nmodel = "organism"\nanalysis = ["arithmetic"]\n[outputs]\nfolder = "x"\n',
     "unknown [outputs] key(s) ['folder']"),
    ('purpose = "p"\nmodel = "organism"\nanalysis = ["arithmetic"]\n[params.arithmetic]\nprompts = { set = 1 }\n',
     "prompts as a table must be"),
    ('purpose = "p"\nmodel = [\n', "not valid TOML"),
])
def test_a_bad_spec_is_refused_naming_the_file_and_the_fix(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ExperimentSpecError) as err:
        load_spec(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_team_library_is_listed_with_the_shipped_specs_and_shadows_them(tmp_path, monkeypatch):
    team = tmp_path / "team"
    team.mkdir()
    write(team, 'purpose = "Ours."\nmodel = "organism"\nanalysis = ["arithmetic"]\n', "ours.toml")
    write(team, 'purpose = "Our demo."\nmodel = "organism"\nanalysis = ["arithmetic"]\n', "demo.toml")
    for given in (team, None):
        if given is None:
            monkeypatch.setenv("MICROSCOPE_EXPERIMENTS", str(team))
        specs = {spec.name: spec for spec in list_specs(given)}
        assert set(SHIPPED) | {"ours"} == set(specs)
        assert specs["demo"].purpose == "Our demo." and specs["arithmetic"].path.parent == SHIPPED_SPECS
        assert find_spec("ours", given) == team / "ours.toml"
    monkeypatch.delenv("MICROSCOPE_EXPERIMENTS")
    monkeypatch.chdir(tmp_path)  # no ./experiments here: the shipped specs alone
    assert {spec.name for spec in list_specs()} == set(SHIPPED)
    assert find_spec("induction_heads") == SHIPPED_SPECS / "induction_heads.toml"
    with pytest.raises(ExperimentSpecError, match="no experiment named 'nope'.*microscope experiments list"):
        find_spec("nope")
    with pytest.raises(ExperimentSpecError, match="no experiment folder at"):
        list_specs(tmp_path / "missing")


def test_a_missing_spec_file_says_how_to_list_the_library(tmp_path):
    with pytest.raises(ExperimentSpecError, match="microscope experiments list"):
        load_spec(tmp_path / "nope.toml")


def test_params_are_checked_against_the_analysis_function_before_any_model_loads(tmp_path):
    spec = load_spec(write(tmp_path, 'purpose = "p"\nmodel = "organism"\nanalysis = ["arithmetic"]\n'
                                     '[params.arithmetic]\nn_prompts = 4\n'))

    def run_arithmetic(scope, prompts="arithmetic", *, split=None):
        """Same arguments as the real study: the check reads the signature."""

    with pytest.raises(ExperimentSpecError, match=r"'n_prompts' is not an argument .* takes \['prompts', 'split'\]"):
        check_params(spec, "arithmetic", run_arithmetic)
    with pytest.raises(ExperimentSpecError, match="n_prompts"):
        run_experiment(spec, out_dir=tmp_path / "out", progress=False)


@pytest.mark.parametrize("name", sorted(RUN_ELSEWHERE - {"demo", "dump_opt_1_3b"}))
def test_the_specs_run_elsewhere_name_only_arguments_their_steps_take(name):
    from microscope.workbench.experiments import resolve_analysis

    spec = load_spec(SPEC_DIR / f"{name}.toml")
    for step in spec.analysis:
        if step != DUMP:
            check_params(spec, step, resolve_analysis(step))


def test_every_analysis_step_resolves_to_an_importable_function():
    from microscope.workbench.experiments import resolve_analysis

    assert set(STEPS) == {"dump", *ANALYSES}
    for step in ANALYSES:
        assert callable(resolve_analysis(step))


def test_a_prompt_selection_keeps_exactly_the_matching_prompts_of_the_set():
    from microscope.prompts import load_prompts

    chosen = select_prompts({"from": "demo", "where": {"set": "arithmetic"}})
    expected = [p for p in load_prompts("demo") if p.metadata["set"] == "arithmetic"]
    assert chosen == expected and len(chosen) > 0


# --- running ------------------------------------------------------------------------------

def check_results_file(path: Path, spec: ExperimentSpec) -> dict:
    record = json.loads(path.read_text())
    prov = record["provenance"]
    assert set(FIELDS) <= set(prov), f"missing provenance fields {set(FIELDS) - set(prov)}"
    assert prov["seed"] == spec.seed and prov["model"] == spec.model
    assert prov["weights_hash"].startswith("sha256:")
    assert prov["packages"]["torch"] and prov["packages"]["opt-microscope"]
    assert prov["command"]
    if (ROOT / ".git").exists():
        assert len(prov["git_commit"] or "") == 40
    assert record["experiment"] == spec.name and record["purpose"] == spec.purpose
    assert record["headline"], "no headline numbers"
    return record


@pytest.mark.parametrize("name", ORGANISM_SPECS)
def test_every_shipped_organism_experiment_runs_and_records_provenance(tmp_path, name):
    spec = load_spec(SPEC_DIR / f"{name}.toml")
    run = run_experiment(spec, out_dir=tmp_path, command=f"pytest {name}", progress=False)
    record = check_results_file(tmp_path / "results.json", spec)
    assert record["provenance"]["command"] == f"pytest {name}"
    for step in spec.analysis:
        assert step == DUMP or (tmp_path / f"{step}.csv").stat().st_size > 0   # a dump writes a store
    assert set(run.results) == set(spec.analysis)
    shown = run._repr_html_()  # what a notebook cell shows
    assert spec.name in shown and "results.json" in shown
    for step in spec.analysis:
        assert step in shown
        results = run.results[step]
        for result in (results.values() if isinstance(results, dict) else [results]):
            assert "<table" in result._repr_html_()
    if spec.report:
        html = (tmp_path / "report.html").read_text()
        assert html.count("class=\"plotly-graph-div\"") == len(record["figures"]) > 0


def real_weights_cached(repo_id: str) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError:
        return False
    return True


def test_the_real_opt_dump_fails_at_once_with_the_missing_weights_error(tmp_path):
    """Runs for real where facebook/opt-1.3b is in the HF cache; without it, the error names the fix."""
    spec = load_spec(SPEC_DIR / "dump_opt_1_3b.toml")
    if real_weights_cached(spec.model):
        run = run_experiment(ExperimentSpec(**{**spec.__dict__, "store": tmp_path / "store.zarr"}),
                             out_dir=tmp_path, progress=False)
        check_results_file(tmp_path / "results.json", spec)
        assert run.results["dump"].n_prompts > 0
        return
    result = subprocess.run([sys.executable, "-m", "microscope", "run", str(spec.path), "--out", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "facebook/opt-1.3b is not in the local Hugging Face cache" in message
    assert "download facebook/opt-1.3b" in message and "Traceback" not in result.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("layout", ["pre_ln", "post_ln"])
def test_model_points_a_spec_at_another_checkpoint_and_random_weights_name_no_head(
        tmp_path, monkeypatch, opt_bpe_checkpoints, layout):
    monkeypatch.chdir(tmp_path)
    folder = opt_bpe_checkpoints[layout]
    run = run_experiment("induction_heads", model=str(folder), progress=False)
    assert run.out_dir == Path(f"results/induction_heads-opt-random-{layout}")
    record = json.loads((run.out_dir / "results.json").read_text())
    assert record["provenance"]["model"] == str(folder)
    for kind, scores in run.results["head_scores"].items():
        assert scores.summary()["named_heads"] == "none", kind
        assert not scores.summary()["top_score_clears_control"], kind


def test_experiments_list_shows_every_spec_with_its_purpose():
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "microscope", "experiments", "list"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for spec in list_specs(SPEC_DIR):
        assert spec.name in result.stdout and spec.purpose in result.stdout
