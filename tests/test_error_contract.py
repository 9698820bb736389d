"""The error contract: every failure a user can cause raises a `MicroscopeError`.

- Every error class of `microscope.errors` (and the CLI's `OptionError`) derives from
  `MicroscopeError` and from the built-in exception it stands for, so `except MicroscopeError`
  catches every user error and an older `except ValueError` still works.
- No module of `microscope` raises a built-in exception class, except the few internal invariants
  named in `ALLOWLIST` (a failure there is a bug in the package, never bad input). Re-raises
  (`raise`, `raise err` of a caught exception) are not new errors and do not count.
- Representative user errors of the public API raise a `MicroscopeError`.
"""

from __future__ import annotations

import ast
import builtins
import inspect
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import microscope
from microscope import errors
from microscope.activations.budget import parse_count
from microscope.activations.dump import dump
from microscope.analysis.head_scores import pattern_head_scores
from microscope.cli import app
from microscope.cli.errors import OptionError
from tests.conftest import tiny_model

PACKAGE = Path(microscope.__file__).parent

BUILTIN_EXCEPTIONS = frozenset(name for name, obj in vars(builtins).items()
                               if isinstance(obj, type) and issubclass(obj, BaseException))

# (module, built-in exception, function) -> why it is Python's own protocol or can only be a bug.
ALLOWLIST: dict[tuple[str, str, str], str] = {
    ("microscope.__init__", "AttributeError", "__getattr__"):
        "a module's lazy __getattr__ (PEP 562) must raise AttributeError for a name it does not "
        "export, as Python itself would: hasattr(), from-imports and pickling rely on it",
    ("microscope.analysis.__init__", "AttributeError", "__getattr__"):
        "the same lazy module __getattr__ protocol for microscope.analysis",
    ("microscope.activations.capture", "RuntimeError", "Capture.finish"):
        "the dump registers every captured hook on the model it runs, so a hook that did not fire "
        "is a bug in the dump's own plumbing, not an input",
}


class _BuiltinRaises(ast.NodeVisitor):
    """Collects (exception, qualified function) for each `raise` of a built-in exception class."""

    def __init__(self) -> None:
        self.scope: list[str] = []
        self.found: set[tuple[str, str]] = set()

    def _nested(self, node: ast.AST) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _nested

    def visit_Raise(self, node: ast.Raise) -> None:
        name = _raised_name(node.exc)
        if name in BUILTIN_EXCEPTIONS:
            self.found.add((name, ".".join(self.scope) or "<module>"))
        self.generic_visit(node)


def _raised_name(exc: ast.expr | None) -> str | None:
    """The class name a `raise` names: `ValueError` in `raise ValueError(...)` or `raise ValueError`."""
    if isinstance(exc, ast.Call):
        exc = exc.func
    if isinstance(exc, ast.Name):
        return exc.id
    if isinstance(exc, ast.Attribute):
        return exc.attr
    return None


def builtin_raises(source: str) -> set[tuple[str, str]]:
    """(exception, function) of every raise of a built-in exception class in `source`."""
    visitor = _BuiltinRaises()
    visitor.visit(ast.parse(source))
    return visitor.found


def package_builtin_raises() -> set[tuple[str, str, str]]:
    """(module, exception, function) of every raise of a built-in exception class in microscope/."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found |= {(module, exc, fn) for exc, fn in builtin_raises(path.read_text())}
    return found


def error_classes() -> list[type]:
    """Every exception class the package defines for its users."""
    defined = [obj for _, obj in inspect.getmembers(errors, inspect.isclass) if obj.__module__ == errors.__name__]
    return [*defined, OptionError]


def test_the_detector_finds_a_planted_builtin_raise():
    snippet = '''
def check(x):
    raise ValueError("x")

class Reader:
    def row(self, i):
        raise KeyError

def passes_on(err):
    try:
        check(1)
    except ValueError:
        raise
    raise err

def ours():
    raise StoreError("fine")
'''
    assert builtin_raises(snippet) == {("ValueError", "check"), ("KeyError", "Reader.row")}


def test_the_allowlist_is_short():
    assert len(ALLOWLIST) <= 5


def test_only_allowlisted_internal_invariants_raise_builtin_exceptions():
    found = package_builtin_raises()
    assert found - set(ALLOWLIST) == set(), "raise a microscope.errors class (a user error) or allowlist a bug check"
    assert set(ALLOWLIST) - found == set(), "an allowlisted raise is gone: drop it from ALLOWLIST"


@pytest.mark.parametrize("cls", error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_class_derives_from_microscope_error(cls):
    assert issubclass(cls, errors.MicroscopeError)


@pytest.mark.parametrize("cls", [c for c in error_classes() if c is not errors.MicroscopeError],
                         ids=lambda cls: cls.__name__)
def test_every_error_class_keeps_a_builtin_base(cls):
    assert issubclass(cls, (ValueError, LookupError, TypeError, OSError))


def test_an_unreadable_token_count_is_a_budget_input_error():
    with pytest.raises(errors.BudgetInputError, match="10M"):
        parse_count("ten")


def test_an_unknown_dump_setting_is_an_unknown_setting_error(tmp_path):
    with pytest.raises(errors.UnknownSettingError, match="dtype"):
        dump("random:opt-125m", ["a prompt"], "blocks.0.hook_resid_post", tmp_path / "store", dtyp="bf16")


def test_an_unknown_head_score_kind_is_an_analysis_input_error():
    torch.manual_seed(0)
    scope = microscope.load(tiny_model())
    with pytest.raises(errors.AnalysisInputError, match="previous_token"):
        pattern_head_scores(scope, torch.randint(3, 96, (1, 8)), kinds=["previous"])


@pytest.mark.parametrize("option, fix", [(["--tokens", "ten"], "write e.g. 10M"),
                                         (["--positions", "some"], "positions must be 'all' or 'last'"),
                                         (["--gpu-memory", "lots"], "write e.g. 80GB")])
def test_a_bad_plan_option_is_one_error_line(option, fix):
    result = CliRunner().invoke(app, ["plan", *option])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and fix in result.output and result.output.count("\n") == 1
