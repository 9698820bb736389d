"""Provenance: what produced a result, so that a teammate can reproduce it.

    record = provenance(scope, seed=0, command="microscope run experiments/demo.toml")

Fields: created (UTC, ISO 8601), command, seed, model (the load source), weights_hash
("sha256:..."), git_commit and git_dirty (None outside a git checkout), python, platform and
packages (the versions of the libraries that shape the numbers).
"""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = ("opt-microscope", "torch", "transformers", "accelerate", "safetensors", "tokenizers",
            "zarr", "numpy", "einops", "plotly", "pandas")
FIELDS = ("created", "command", "seed", "model", "weights_hash", "git_commit", "git_dirty",
          "python", "platform", "packages")
REPO_ROOT = Path(__file__).resolve().parents[1]


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """(commit hash, whether tracked files differ from it) of the checkout holding the code,
    or (None, None) when the code does not run from a git checkout or git is missing."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


def provenance(scope=None, *, seed: int | None = None, command: str | None = None) -> dict:
    """The provenance record (see the module docstring) of a run on `scope` (a `Scope` or None).

    command: the command line that ran; defaults to this process's own argv."""
    commit, dirty = git_state()
    info = getattr(scope, "info", None) or {}
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "seed": seed,
        "model": getattr(scope, "source", None),
        "weights_hash": info.get("weights_hash") if scope is not None else None,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
    }
