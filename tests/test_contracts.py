"""The contracts between the analyses and the workbench, each with one owner:

1. a result is read only through `Result` (the runner probes nothing else);
2. a number measured on one split of the prompts is named by one rule (`split_suffix`);
3. control keys are written and read by `analysis.controls` alone;
4. the registry is the one list of steps;
5. what the studies share lives once (lens names, ablations, rounding);
6. a spec's parameter values are checked before any weights load;
7. long analyses report progress through one callback shape, drawn by one implementation.
"""

from __future__ import annotations

import ast
import re
from io import StringIO
from pathlib import Path

import pytest
import torch
from study_fixtures import needs_organism, one_thread  # noqa: F401
from test_store_fixtures import make_model_dir
from typer.testing import CliRunner

import microscope
from microscope.analysis.controls import Controlled, split_controls
from microscope.analysis.progress import counted
from microscope.analysis.registry import ANALYSES
from microscope.analysis.results import Result
from microscope.analysis.studies.base import IN_DISTRIBUTION, split_of, split_suffix
from microscope.errors import ExperimentSpecError
from microscope.prompts import Prompt
from microscope.workbench.experiments import DUMP, STEPS, load_spec, run_experiment
from microscope.workbench.params import value_problem
from microscope.workbench.progress import StepProgress

PACKAGE = Path(microscope.__file__).parent


def _tree(relative: str) -> ast.AST:
    return ast.parse((PACKAGE / relative).read_text())


def _strings(relative: str) -> list[str]:
    """Every string constant of a package module (f-string parts included)."""
    return [n.value for n in ast.walk(_tree(relative)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _modules(folder: str = "") -> list[str]:
    return sorted(str(p.relative_to(PACKAGE)) for p in (PACKAGE / folder).rglob("*.py"))


# --- 1. one result contract -------------------------------------------------------------------

def test_the_runner_probes_no_result_with_getattr_or_hasattr():
    calls = [n.func.id for n in ast.walk(_tree("workbench/experiments.py"))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("getattr", "hasattr")]
    assert calls == []


def test_every_part_of_a_result_the_workbench_reads_is_declared_by_result():
    read = {n.attr for module in ("workbench/experiments.py", "workbench/report.py")
            for n in ast.walk(_tree(module))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "result"}
    read.discard("items")      # a step may return a dict of results: each entry is read the same way
    assert read and read <= set(dir(Result)), read - set(dir(Result))


def test_a_result_has_a_title_and_no_html_of_its_own_unless_it_says_so():
    class Bare(Result):
        def summary(self): return {}
        def figures(self): return []
        def to_frame(self): return None

    assert Bare().title and Bare().report_html() == ""


# --- 2. one rule for split suffixes -----------------------------------------------------------

def test_the_in_distribution_split_has_no_suffix_and_every_other_split_its_name():
    assert split_suffix(IN_DISTRIBUTION) == ""
    assert split_suffix("ood") == "_ood" and split_suffix("train") == "_train"
    assert split_of(Prompt("x", {})) == IN_DISTRIBUTION and split_of(Prompt("x", {"split": "ood"})) == "ood"


def test_split_keys_do_not_depend_on_the_order_prompts_come_in():
    from microscope.analysis.studies.arithmetic import accuracies
    from microscope.analysis.studies.instructions import rates_by_split

    labels, cued, splits = ["dialogue", "execution", "other", "dialogue"], [False, True, False, True], \
        ["ood", "ood", IN_DISTRIBUTION, IN_DISTRIBUTION]
    forward, backward = rates_by_split(labels, cued, splits), rates_by_split(labels[::-1], cued[::-1], splits[::-1])
    assert forward == backward and "bare_dialogue_rate" in forward and "bare_dialogue_rate_ood" in forward
    ops, answers = ["+", "-", "+", "-"], torch.tensor([3, 1, 5, 2])
    said = [str(int(a)) for a in answers]
    first = accuracies(ops, splits, answers, said)
    assert first == accuracies(ops[::-1], splits[::-1], answers.flip(0), said[::-1])
    assert {"addition_accuracy", "addition_accuracy_ood", "subtraction_sign_error_rate_ood"} <= set(first)


def test_only_the_shared_module_names_the_in_distribution_split():
    owners = [m for m in _modules("analysis") if IN_DISTRIBUTION in _strings(m)]
    assert owners == ["analysis/studies/base.py"], owners


# --- 3. control keys: one writer, one reader --------------------------------------------------

def test_controlled_numbers_read_back_as_one_row_each_beside_their_control():
    numbers = {**Controlled(0.91, (0.05, 0.11, 0.08, 0.07, 0.09), "random init x5").headline("top_induction_score"),
               **Controlled(0.3, (0.2, 0.4), "random directions x2", higher_is_claim=False).headline("cost"),
               **Controlled(2.0, (0.1, 0.2, 0.3), "random heads x3", unmet="cue_gap").headline("drop"),
               "loop_rate": 0.5}
    assert split_controls(numbers) == [
        ("top_induction_score", 0.91,
         "random init x5: 5 draws, mean 0.08, sd 0.02236, max 0.11, needs a gap of 0.091 · clears"),
        ("cost", 0.3, "random directions x2: 2 draws, mean 0.3, sd 0.1414, min 0.2, needs a gap of 5.411 · does NOT clear"),
        ("drop", 2.0, "random heads x3: 3 draws, mean 0.2, sd 0.1, max 0.3, needs a gap of 0.7042 · does NOT clear "
                      "(it rests on cue_gap, which does not clear)"),
        ("loop_rate", 0.5, "")]


def test_only_controls_spells_the_control_suffixes():
    suffixes = ("_control_mean", "_control_max", "_control_min", "_clears_control")
    spelled = [m for m in _modules() if any(s.endswith(suffixes) for s in _strings(m))]
    assert spelled == ["analysis/controls.py"], spelled


# --- 4. one registry ------------------------------------------------------------------------

def test_the_workbench_steps_and_the_studies_derive_from_the_registry():
    from microscope.analysis.studies import STUDIES

    assert STEPS == (DUMP, *ANALYSES)
    assert list(STUDIES) == [name for name, a in ANALYSES.items() if a.study]
    assert {"toxicity", "repetition", "instructions", "arithmetic", "head_scores", "logit_lens",
            "induction_patterns", "circuit", "features", "graph"} == set(ANALYSES)
    for name, analysis in ANALYSES.items():
        assert analysis.name == name and callable(analysis.load())
        assert analysis.purpose and "\n" not in analysis.purpose


def test_no_module_but_the_registry_names_an_analysis_function():
    function_names = re.compile(r"^microscope\.[\w.]+:\w+$")
    holders = {m: [s for s in _strings(m) if function_names.match(s)] for m in _modules()}
    holders = {m: found for m, found in holders.items() if found}
    assert set(holders) == {"analysis/registry.py", "workbench/experiments.py"}, holders
    assert holders["workbench/experiments.py"] == ["microscope.activations.dump:dump"]


def test_microscope_experiments_steps_lists_every_step():
    from microscope.cli import app

    result = CliRunner().invoke(app, ["experiments", "steps"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for step in STEPS:
        assert step in result.output


# --- 5. one home for what the studies share ---------------------------------------------------

def test_no_study_redefines_what_the_studies_share():
    shared = {"ABLATIONS", "LENSES", "IN_DISTRIBUTION", "_r", "_rounded", "rounded", "round_headline", "rows_of",
              "first_clearing", "first_layer_from"}
    owners = {"ABLATIONS": "hooks/interventions.py", "LENSES": "analysis/studies/layers.py",
              "rounded": "analysis/results.py", "round_headline": "analysis/results.py",
              "IN_DISTRIBUTION": "analysis/studies/base.py", "rows_of": "analysis/studies/base.py",
              "first_layer_from": "analysis/studies/base.py", "first_clearing": "analysis/studies/layers.py"}
    defined: dict[str, list[str]] = {}
    for module in _modules("analysis") + ["hooks/interventions.py"]:
        for node in ast.walk(_tree(module)):
            names = ([node.name] if isinstance(node, ast.FunctionDef) else
                     [t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else
                     [node.target.id] if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) else [])
            for name in set(names) & shared:
                defined.setdefault(name, []).append(module)
    assert defined == {name: [module] for name, module in owners.items()}, defined


# --- 6. parameter values checked before the weights load ---------------------------------------

def test_a_value_is_checked_against_its_annotation():
    from collections.abc import Sequence
    from typing import Literal

    kinds = Sequence[Literal["previous_token", "duplicate_token", "induction"]]
    assert value_problem(["induction"], kinds) is None
    assert value_problem(["inductoin"], kinds) == ("'inductoin' is not one of ['previous_token', 'duplicate_token', "
                                                   "'induction']; did you mean 'induction'?")
    assert value_problem(3, int) is None and value_problem(True, int) == "True is not an integer"
    assert value_problem(1, float) is None and value_problem("x", float) == "'x' is not a number"
    assert value_problem("yes", bool) == "'yes' is not true or false"
    assert value_problem(7, int | Literal["all", "last"]) is None
    assert value_problem([1, 2], tuple[int, ...] | list[int]) is None
    assert value_problem({"from": "demo"}, Sequence[Prompt] | str) is None   # not a type the runner checks


@pytest.fixture
def broken_model_spec(tmp_path) -> Path:
    """A spec whose model folder has a valid config.json beside a truncated model.safetensors, and
    a misspelt head_scores kind."""
    folder = make_model_dir(tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    spec = tmp_path / "typo.toml"
    spec.write_text(f'purpose = "A typo."\nmodel = "{folder}"\nanalysis = ["head_scores"]\n'
                    f'[params.head_scores]\nkinds = ["inductoin"]\n[outputs]\ndir = "{tmp_path / "out"}"\n')
    return spec


def test_a_bad_parameter_value_stops_the_run_before_the_weights_load(broken_model_spec):
    with pytest.raises(Exception):         # the control: these weights cannot load
        microscope.load(str(broken_model_spec.parent / "model"))
    with pytest.raises(ExperimentSpecError) as err:
        run_experiment(load_spec(broken_model_spec), progress=False)
    assert str(err.value) == (f"{broken_model_spec}: [params.head_scores] kinds: 'inductoin' is not one of "
                              f"['previous_token', 'duplicate_token', 'induction']; did you mean 'induction'?")
    assert not (broken_model_spec.parent / "out").exists()


def test_the_command_line_prints_one_error_line_for_a_bad_value(broken_model_spec):
    from microscope.cli import app

    result = CliRunner().invoke(app, ["run", str(broken_model_spec)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "did you mean 'induction'?" in result.stderr


# --- 7. progress: one callback shape, one drawing -----------------------------------------------

def test_nothing_in_analysis_draws():
    imported = {alias.name.split(".")[0] for m in _modules("analysis") for n in ast.walk(_tree(m))
                for alias in (n.names if isinstance(n, ast.Import) else [])} | \
               {n.module.split(".")[0] for m in _modules("analysis") for n in ast.walk(_tree(m))
                if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"rich", "tqdm"}


def test_counted_reports_before_each_item_and_once_all_are_done():
    calls = []
    assert list(counted("ab", 2, "letters", lambda *report: calls.append(report))) == ["a", "b"]
    assert calls == [("letters", 0, 2), ("letters", 1, 2), ("letters", 2, 2)]


@needs_organism
def test_a_study_reports_its_work_with_counts_that_only_grow():
    from microscope.analysis.studies.arithmetic import run_arithmetic
    from microscope.prompts import load_prompts

    calls = []
    run_arithmetic(microscope.load("organism"), load_prompts("arithmetic")[::4], seeds=(0, 1),
                   progress=lambda *report: calls.append(report))
    assert calls
    for step in dict.fromkeys(step for step, _, _ in calls):
        counts = [(done, total) for s, done, total in calls if s == step]
        assert [d for d, _ in counts] == sorted(d for d, _ in counts) and counts[-1][0] == counts[-1][1]
    assert ("random-init controls", 2, 2) in calls


def test_outside_a_terminal_each_report_is_one_plain_line():
    log = StringIO()
    with StepProgress("demo", 2, stream=log, interval=0) as bar:
        bar.start("toxicity")
        for done in range(3):
            bar("random-init controls", done, 2)
        bar.advance()
    assert not bar.live
    lines = log.getvalue().splitlines()
    assert lines[0] == "[demo] toxicity (step 1 of 2)"
    assert [re.sub(r"\(\d+ s\)", "(t)", line) for line in lines[1:]] == [
        f"[toxicity] random-init controls {done}/2 (t)" for done in range(3)]


def test_a_batch_log_gets_the_start_and_end_of_quick_work_only():
    log = StringIO()
    bar = StepProgress("run", stream=log)
    for done in range(6):
        bar("training", done, 5)
    assert [line.split(" (")[0] for line in log.getvalue().splitlines()] == ["[run] training 0/5", "[run] training 5/5"]
