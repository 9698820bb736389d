"""The package works when installed, not only from a checkout: a wheel built from the source tree,
installed into a fresh venv, runs `microscope demo` and lists the shipped specs from an empty
folder (the shipped specs travel as package data)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; the dependencies come from this environment's
    site-packages through a .pth file (so nothing is downloaded). Returns its bin folder."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy, so the build writes nothing into the checkout
    shutil.copytree(ROOT / "microscope", source / "microscope",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
         source], cwd=tmp)
    wheel = next((tmp / "dist").glob("opt_microscope-*.whl"))
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
                .stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # appended after the wheel's
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], cwd=tmp)
    where = run([python, "-c", "import microscope; print(microscope.__file__)"], cwd=tmp).stdout.strip()
    assert Path(where).is_relative_to(site), f"microscope imported from {where}, not from the wheel"
    return venv / "bin"


def test_the_installed_package_lists_the_shipped_specs_from_an_empty_folder(installed, tmp_path):
    listed = run([installed / "microscope", "experiments", "list"], cwd=tmp_path).stdout
    assert "demo" in listed and "induction_heads" in listed


@pytest.mark.slow
def test_the_installed_package_runs_the_demo_from_an_empty_folder(installed, tmp_path):
    done = run([installed / "microscope", "demo"], cwd=tmp_path, timeout=600)
    assert "report" in done.stdout
    assert (tmp_path / "results" / "demo" / "results.json").is_file()
    assert (tmp_path / "results" / "demo" / "report.html").is_file()
