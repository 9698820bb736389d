"""The command line's one error style: a user error is one line on stderr and exit 1 (its traceback
only under --debug); any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from microscope.cli.errors import ErrorReportingGroup
from microscope.errors import MicroscopeError


def _app(exc: Exception) -> typer.Typer:
    app = typer.Typer(cls=ErrorReportingGroup)

    @app.callback()
    def main(debug: bool = typer.Option(False, "--debug")) -> None:
        """A test app."""

    @app.command()
    def fail() -> None:
        raise exc

    return app


def test_user_error_is_one_line_and_exit_1():
    result = CliRunner().invoke(_app(MicroscopeError("no such store at x")), ["fail"])
    assert result.exit_code == 1
    assert result.stderr == "error: no such store at x\n"


def test_debug_shows_the_user_errors_traceback():
    result = CliRunner().invoke(_app(MicroscopeError("boom")), ["--debug", "fail"])
    assert isinstance(result.exception, MicroscopeError)


def test_a_bug_is_not_swallowed():
    result = CliRunner().invoke(_app(ZeroDivisionError("bug")), ["fail"])
    assert isinstance(result.exception, ZeroDivisionError)


@pytest.mark.parametrize("debug", [False, True])
def test_python_dash_m_reports_a_user_error(debug, tmp_path):
    args = [sys.executable, "-m", "microscope", *(["--debug"] if debug else []), "plan", "--model", "opt-7b"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 1
    assert "valid sizes" in run.stderr
    assert ("Traceback" in run.stderr) == debug
    if not debug:
        assert run.stderr.startswith("error: unknown OPT size 'opt-7b'") and run.stderr.count("\n") == 1
