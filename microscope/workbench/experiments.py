"""The experiment library: one TOML spec per experiment, loaded, checked and run with provenance.

A spec (``<library>/<name>.toml``; the name is the file's stem)::

    purpose  = "One line: what this experiment shows."          # required
    model    = "organism"               # any `microscope.load` source          (required)
    device   = "cpu"                    # optional, passed to `load` (so is dtype)
    seed     = 0                        # set before every step; recorded
    prompts  = "demo"                   # the dump's prompts: a built-in set name or a file
    hooks    = ["blocks.*.hook_resid_post"]                     # the dump's hooks
    analysis = ["dump", "toxicity", "repetition"]               # steps, run in this order (required)

    [params.toxicity]                   # keyword arguments of that step's function
    max_new_tokens = 8
    prompts = { from = "demo", where = { set = "toxicity" } }   # a subset of a prompt set

    [outputs]
    dir    = "results/demo"             # results.json, one CSV per analysis, report.html
    store  = "activations/demo.zarr"    # where the "dump" step writes
    report = true                       # write report.html

Steps: ``dump`` (`microscope.activations.dump.dump` of prompts x hooks into outputs.store; later
steps whose function takes a ``store`` argument receive the opened store) and the analyses of
`microscope.analysis.registry.ANALYSES`, each a function ``fn(scope, **params)`` returning an
analysis `Result` (or a dict of them); one that takes ``progress`` gets the run's progress display.
Every parameter is checked before the model loads (`preflight`): its name against the function's
signature, its value against the annotation (`workbench.params`). A ``prompts`` parameter given as
``{ from = SET, where = { FIELD = VALUE } }`` becomes the list of that set's prompts whose metadata
match (so the studies can run on exactly the prompts the dump stored). Relative paths are relative
to the working directory.

Libraries: the specs shipped in the package (``microscope/workbench/specs``, which the
repository's top-level ``experiments/`` links to) plus a team's own folder, given by ``--dir``, by
the ``MICROSCOPE_EXPERIMENTS`` environment variable, or else ``./experiments`` when it exists. A
team's spec shadows a shipped one of the same name. `find_spec` takes a path or a name.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import sys
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from microscope.analysis.registry import ANALYSES
from microscope.errors import ExperimentSpecError, StoreError
from microscope.workbench.params import value_problem

DUMP = "dump"
DUMP_FUNCTION = "microscope.activations.dump:dump"
DUMP_PURPOSE = "Activations of the spec's prompts x hooks into [outputs] store (later steps may read it)."
STEPS = (DUMP, *ANALYSES)
RUNNER_ARGS = ("store", "progress")   # analysis arguments the runner passes itself
TOP_KEYS = {"purpose", "model", "device", "dtype", "seed", "prompts", "hooks", "analysis", "params", "outputs"}
OUTPUT_KEYS = {"dir", "store", "report"}
SHIPPED_SPECS = Path(__file__).resolve().parent / "specs"
LIBRARY_ENV = "MICROSCOPE_EXPERIMENTS"
TEAM_LIBRARY = "experiments"


@dataclass(frozen=True)
class ExperimentSpec:
    """A checked experiment spec (see the module docstring for the meaning of each field)."""

    name: str
    path: Path
    purpose: str
    model: str
    analysis: tuple[str, ...]
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    prompts: str | None = None
    hooks: tuple[str, ...] = ()
    params: Mapping[str, Mapping] = field(default_factory=dict)
    out_dir: Path = Path("results")
    store: Path | None = None
    report: bool = True


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and check one spec file; a bad spec raises `ExperimentSpecError` naming key and fix.
    Cheap: imports nothing heavy (so `microscope experiments list` stays fast)."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentSpecError(f"no experiment spec at {path}; list the shipped ones with "
                                  f"`microscope experiments list`")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ExperimentSpecError(f"{path}: not valid TOML ({err})") from None

    def fail(message: str):
        raise ExperimentSpecError(f"{path}: {message}")

    unknown = set(raw) - TOP_KEYS
    if unknown:
        fail(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    for key in ("purpose", "model", "analysis"):
        if key not in raw:
            fail(f"missing required key {key!r}")
    purpose = raw["purpose"]
    if not isinstance(purpose, str) or not purpose.strip() or "\n" in purpose.strip():
        fail("'purpose' must be one non-empty line of text")
    for key in ("model", "device", "dtype", "prompts"):
        if key in raw and not isinstance(raw[key], str):
            fail(f"{key!r} must be a string, got {type(raw[key]).__name__}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        fail(f"'seed' must be an integer, got {seed!r}")

    analysis = raw["analysis"]
    if isinstance(analysis, str):
        analysis = [analysis]
    if not isinstance(analysis, list) or not analysis or not all(isinstance(a, str) for a in analysis):
        fail(f"'analysis' must be a non-empty list of step names from {list(STEPS)}")
    for step in analysis:
        if step not in STEPS:
            fail(f"unknown analysis {step!r}; known: {list(STEPS)}")
    if len(set(analysis)) != len(analysis):
        fail("'analysis' lists a step twice")

    hooks = raw.get("hooks", [])
    if isinstance(hooks, str):
        hooks = [h.strip() for h in hooks.split(",") if h.strip()]
    if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
        fail("'hooks' must be a list of hook names or glob patterns")

    params = raw.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        fail("'params' must hold one table per step, e.g. [params.toxicity]")
    stray = set(params) - set(analysis)
    if stray:
        fail(f"[params.{sorted(stray)[0]}] is for a step not in 'analysis' {analysis}; add it there or remove it")
    for step, table in params.items():
        selection = table.get("prompts")
        if isinstance(selection, dict) and (set(selection) - {"from", "where"} or "from" not in selection
                                            or not isinstance(selection.get("where", {}), dict)):
            fail(f"[params.{step}] prompts as a table must be {{ from = SET, where = {{ FIELD = VALUE }} }}")

    outputs = raw.get("outputs", {})
    if not isinstance(outputs, dict):
        fail("'outputs' must be a table: [outputs] dir = ..., store = ..., report = true")
    unknown = set(outputs) - OUTPUT_KEYS
    if unknown:
        fail(f"unknown [outputs] key(s) {sorted(unknown)}; allowed: {sorted(OUTPUT_KEYS)}")
    report = outputs.get("report", True)
    if not isinstance(report, bool):
        fail("[outputs] report must be true or false")
    if DUMP in analysis:
        if "prompts" not in raw or not hooks or "store" not in outputs:
            fail("the 'dump' step needs 'prompts', 'hooks' and [outputs] store")

    return ExperimentSpec(
        name=path.stem, path=path, purpose=purpose.strip(), model=raw["model"], analysis=tuple(analysis),
        seed=seed, device=raw.get("device"), dtype=raw.get("dtype"), prompts=raw.get("prompts"),
        hooks=tuple(hooks), params=params, out_dir=Path(outputs.get("dir", f"results/{path.stem}")),
        store=Path(outputs["store"]) if "store" in outputs else None, report=report)


def library_dirs(directory: str | Path | None = None) -> list[Path]:
    """The spec folders searched, team library first: `directory`, else $MICROSCOPE_EXPERIMENTS,
    else ./experiments when it exists; then the shipped specs (each folder once)."""
    given = directory if directory is not None else os.environ.get(LIBRARY_ENV)
    if given is not None and not Path(given).is_dir():
        raise ExperimentSpecError(f"no experiment folder at {given}; give an existing folder with --dir "
                                  f"or ${LIBRARY_ENV}")
    team = Path(given) if given is not None else Path(TEAM_LIBRARY)
    folders = [team] if team.is_dir() and team.resolve() != SHIPPED_SPECS else []
    return folders + [SHIPPED_SPECS]


def spec_files(directory: str | Path | None = None) -> dict[str, Path]:
    """Every spec file of the libraries by name (a team's spec shadows a shipped one), sorted."""
    files: dict[str, Path] = {}
    for folder in library_dirs(directory):
        for path in sorted(folder.glob("*.toml")):
            files.setdefault(path.stem, path)
    return dict(sorted(files.items()))


def list_specs(directory: str | Path | None = None) -> list[ExperimentSpec]:
    """Every spec of the libraries (see `library_dirs`), sorted by name."""
    return [load_spec(p) for p in spec_files(directory).values()]


def find_spec(spec: str | Path, directory: str | Path | None = None) -> Path:
    """The file of `spec`: a path to a spec file, or the name of one in the libraries."""
    path = Path(spec)
    if path.is_file() or path.suffix == ".toml" or len(path.parts) > 1:
        return path  # a path: load_spec names it when it is missing
    files = spec_files(directory)
    if str(spec) not in files:
        raise ExperimentSpecError(f"no experiment named {str(spec)!r} in "
                                  f"{', '.join(str(d) for d in library_dirs(directory))}; known: {list(files)} "
                                  f"(`microscope experiments list`)")
    return files[str(spec)]


def resolve_analysis(step: str) -> Callable:
    """The function behind an analysis step name (imports its module)."""
    try:
        return ANALYSES[step].load()
    except (ImportError, AttributeError) as err:
        raise ExperimentSpecError(f"analysis {step!r} needs {ANALYSES[step].function}, which is not available "
                                  f"in this installation ({err})") from None


# dump() arguments the spec sets through its own keys, not through [params.dump]
DUMP_OWN_ARGS = ("model", "prompts", "hooks", "out", "seed", "command_line", "on_progress")


def check_params(spec: ExperimentSpec, step: str, fn: Callable, reserved: tuple[str, ...] = RUNNER_ARGS) -> None:
    """Raise `ExperimentSpecError` when [params.<step>] names an argument `fn` does not take (its
    first argument, the scope, and `reserved` ones are not settable) or gives a value its
    annotation does not allow (`workbench.params.value_problem`)."""
    signature = inspect.signature(fn)
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        accepted = [n for n in list(signature.parameters)[1:] if n not in reserved]
        for key in spec.params.get(step, {}):
            if key not in accepted:
                where = ANALYSES[step].function if step in ANALYSES else DUMP_FUNCTION
                raise ExperimentSpecError(f"{spec.path}: [params.{step}] {key!r} is not an argument of "
                                          f"{where}; it takes {accepted}")
    hints = typing.get_type_hints(fn)
    for key, value in spec.params.get(step, {}).items():
        problem = value_problem(value, hints[key]) if key in hints else None
        if problem:
            raise ExperimentSpecError(f"{spec.path}: [params.{step}] {key}: {problem}")


def preflight(spec: ExperimentSpec) -> dict[str, Callable]:
    """Every check that can fail before the weights load; returns each analysis step's function.
    A spec that passes it fails later only for reasons no spec check can see."""
    functions = {}
    for step in spec.analysis:
        if step == DUMP:
            from microscope.activations.dump import dump
            from microscope.activations.dump import preflight as dump_preflight
            from microscope.activations.schema import check_store_path
            from microscope.activations.settings import DumpSettings
            check_params(spec, step, dump, reserved=DUMP_OWN_ARGS)
            try:                                         # the run replaces only a store a dump made
                check_store_path(spec.store, resume=True)
            except StoreError as err:
                raise ExperimentSpecError(f"{spec.path}: [outputs] store: {err}") from None
            dump_preflight(spec.model, spec.prompts, list(spec.hooks), None,
                           DumpSettings().but(**spec.params.get(DUMP, {})))
        else:
            functions[step] = resolve_analysis(step)
            check_params(spec, step, functions[step])
    return functions


@dataclass
class ExperimentRun:
    """What `run_experiment` produced: results by step, the files written, headline numbers."""

    spec: ExperimentSpec
    out_dir: Path
    results: dict            # step -> its Result (the dump's: the opened ActivationStore)
    headline: dict           # report section -> its headline numbers
    provenance: dict
    files: dict[str, Path]
    seconds: float

    def __repr__(self) -> str:
        return f"<ExperimentRun {self.spec.name}: {', '.join(self.results)} -> {self.out_dir} ({self.seconds:.0f} s)>"

    def _repr_html_(self) -> str:
        import html

        rows = "".join(f"<tr><td>{html.escape(step)}</td><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                       for step, numbers in self.headline.items() for k, v in numbers.items()
                       if not isinstance(v, (dict, list)))
        files = "".join(f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>" for k, v in self.files.items())
        return (f"<div><b>ExperimentRun</b> {html.escape(self.spec.name)}: {html.escape(self.spec.purpose)} "
                f"({self.seconds:.0f} s)<table><tr><th>step</th><th>number</th><th>value</th></tr>{rows}</table>"
                f"<ul>{files}</ul></div>")


def parse_param(text: str) -> tuple[str, str, object]:
    """``"toxicity.seeds=[1, 2]"`` -> ``("toxicity", "seeds", [1, 2])``: a step, one of its
    parameters and a TOML value (a bare word that is not TOML is a string: ``prompts=mine``)."""
    target, sep, value = text.partition("=")
    step, dot, key = target.strip().partition(".")
    if not sep or not dot or not step or not key:
        raise ExperimentSpecError(f"--param {text!r}: write STEP.KEY=VALUE, e.g. toxicity.seeds=[1, 2]")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return step, key.strip(), parsed


def with_params(spec: ExperimentSpec, overrides: Mapping[str, Mapping]) -> ExperimentSpec:
    """`spec` with ``overrides`` ({step: {parameter: value}}) written over its [params.STEP]
    tables; a step the spec does not run is an error (its parameters are checked by `preflight`)."""
    stray = [step for step in overrides if step not in spec.analysis]
    if stray:
        raise ExperimentSpecError(f"{spec.path}: --param {stray[0]}.…: {stray[0]!r} is not a step of this spec "
                                  f"{list(spec.analysis)}")
    params = {step: dict(table) for step, table in spec.params.items()}
    for step, table in overrides.items():
        params.setdefault(step, {}).update(table)
    return replace(spec, params=params)


def run_experiment(spec: ExperimentSpec | str | Path, *, out_dir: str | Path | None = None,
                   command: str | None = None, progress: bool = True,
                   library: str | Path | None = None, model: str | None = None,
                   params: Mapping[str, Mapping] | None = None) -> ExperimentRun:
    """Run every step of `spec` (a spec, a spec file, or a name found in the libraries, see
    `find_spec`) on its model and write results.json (+ CSVs, report.html).

    out_dir overrides [outputs] dir; library: the team's spec folder searched by name; model: any
    `microscope.load` source run instead of the spec's (results then default to
    ``<[outputs] dir>-<model>``, so runs on different models do not share a folder); params:
    {step: {parameter: value}} over the spec's [params.STEP] (`with_params`). command:
    recorded in the provenance (default: this process's argv). progress: show the steps' progress
    (`workbench.progress`: a live bar in a terminal or notebook, plain lines in a batch log).
    Spec, argument and model problems raise `MicroscopeError`s before any long work starts."""
    import microscope
    from microscope.provenance import provenance
    from microscope.workbench.progress import step_progress
    from microscope.workbench.report import write_headline_json, write_report

    if not isinstance(spec, ExperimentSpec):
        spec = load_spec(find_spec(spec, library))
    if model is not None and model != spec.model:
        name = Path(model).name if Path(model).is_dir() else model      # a folder by its own name
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip("/")).strip("-")
        spec = replace(spec, model=model, out_dir=spec.out_dir.with_name(f"{spec.out_dir.name}-{slug}"))
    if params:
        spec = with_params(spec, params)
    functions = preflight(spec)
    out = Path(out_dir) if out_dir is not None else spec.out_dir
    started = time.perf_counter()
    _seed_everything(spec.seed)
    scope = microscope.load(spec.model, device=spec.device, dtype=spec.dtype)
    record = provenance(scope, seed=spec.seed, command=command)
    record["experiment"] = str(spec.path)

    results, sections, store = {}, [], None
    with step_progress(spec.name, len(spec.analysis), enabled=progress) as bar:
        for step in spec.analysis:
            bar.start(step)
            _seed_everything(spec.seed)
            if step == DUMP:
                store, section = _run_dump(spec, scope, record["command"],
                                           on_progress=lambda state: bar("tokens", state["tokens"], state["total"]))
                results[step] = store
                sections.append(section)
            else:
                kwargs = {k: select_prompts(v) if k == "prompts" and isinstance(v, dict) else v
                          for k, v in spec.params.get(step, {}).items()}
                accepted = inspect.signature(functions[step]).parameters
                if store is not None and "store" in accepted:
                    kwargs["store"] = store
                if "progress" in accepted:
                    kwargs["progress"] = bar
                result = functions[step](scope, **kwargs)
                results[step] = result
                sections.extend(_sections(step, result))
            bar.advance()

    out.mkdir(parents=True, exist_ok=True)
    files = {"results": out / "results.json"}
    for step, result in results.items():
        if step != DUMP:
            files[f"{step}.csv"] = out / f"{step}.csv"
            _frame(result).to_csv(files[f"{step}.csv"], index=False)
    if spec.report:
        files["report"] = write_report(out / "report.html", f"OPT Microscope · {spec.name}", sections,
                                       provenance=record, subtitle=spec.purpose)
    if spec.store is not None and DUMP in spec.analysis:
        files["store"] = spec.store
    seconds = time.perf_counter() - started
    write_headline_json(files["results"], spec.name, sections, provenance=record,
                        extra={"purpose": spec.purpose, "seconds": round(seconds, 2),
                               "files": {k: str(v) for k, v in files.items()}})
    return ExperimentRun(spec, out, results, {s.title: dict(s.numbers) for s in sections}, record, files,
                         seconds)


def select_prompts(selection: Mapping) -> list:
    """The prompts of set ``selection["from"]`` whose metadata hold every ``selection["where"]``
    field with that value (a `microscope.prompts.PromptSet`, with the whole set's task)."""
    from microscope.errors import PromptError
    from microscope.prompts import PromptSet, load_prompts

    where = dict(selection.get("where", {}))
    whole = load_prompts(selection["from"])
    chosen = [p for p in whole if all(p.metadata.get(k) == v for k, v in where.items())]
    if not chosen:
        raise PromptError(f"no prompt of {selection['from']!r} has metadata {where}")
    return PromptSet(chosen, whole.task)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _run_dump(spec: ExperimentSpec, scope, command: str, on_progress):
    """Dump the spec's prompts x hooks into a fresh store; (opened store, report section)."""
    from microscope.activations.dump import dump
    from microscope.activations.reader import open_store
    from microscope.activations.schema import check_store_path
    from microscope.workbench.report import Section

    if spec.store.exists():  # a fresh dump each run, but only over a store a dump made
        check_store_path(spec.store, resume=True)
        shutil.rmtree(spec.store)
    kwargs = dict(spec.params.get(DUMP, {}))
    summary = dump(scope, spec.prompts, list(spec.hooks), str(spec.store), seed=spec.seed,
                   command_line=command, on_progress=on_progress, **kwargs)
    store = open_store(str(spec.store))
    numbers = {"store": str(spec.store), "prompts": summary.n_prompts, "tokens": summary.n_tokens,
               "hooks": len(summary.hooks), "dtype": summary.dtype, "MB written": summary.bytes_written / 1e6,
               "seconds": summary.seconds, "tokens/s": summary.tokens_per_s}
    return store, Section("activation dump", numbers=numbers,
                          notes=f"{spec.prompts} prompts x {', '.join(spec.hooks)} from {spec.model}, "
                                f"read back with microscope.open_store({str(spec.store)!r}).")


def _sections(step: str, result) -> list:
    """Report sections of one step's result (a dict of results gives one section per entry)."""
    from microscope.workbench.report import Section

    if isinstance(result, Mapping):
        return [s for key, item in result.items() for s in _sections(f"{step}: {key}", item)]
    return [Section(step, figures=list(result.figures()), numbers=result.summary(), notes=result.title,
                    html=result.report_html(), findings=result.findings())]


def _frame(result):
    """One table of a step's result (the entries of a dict of results stacked, keyed by "entry")."""
    import pandas as pd

    if isinstance(result, Mapping):
        return pd.concat([_frame(item).assign(entry=key) for key, item in result.items()], ignore_index=True)
    return result.to_frame()


def results_json(path: str | Path) -> dict:
    """Read a results.json written by `run_experiment`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
