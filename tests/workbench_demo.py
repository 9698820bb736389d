"""Run the README's main-job command once per test session and hand its outputs to every test
that looks at them (the README test, the browser test, both in test_workbench_demo.py so one
process runs them when the suite is spread over several), so CI runs the demo a single time."""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands of the README's first code block (comments dropped), in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)
    assert block, "README.md has no code block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.split("#", 1)[0].strip()]


def main_job_command() -> str:
    """The README's first command: the main job."""
    return readme_commands()[0]


@dataclass(frozen=True)
class DemoRun:
    command: str
    returncode: int
    output: str
    seconds: float
    report: Path | None
    results: Path | None

    def record(self) -> dict:
        return json.loads(self.results.read_text(encoding="utf-8"))


@cache
def demo_run() -> DemoRun:
    """Run the README's main-job command exactly as written, from the repository root."""
    command = main_job_command()
    started = time.perf_counter()
    done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=None)
    seconds = time.perf_counter() - started
    output = done.stdout + done.stderr
    found = {label: Path(path.strip()) for label, path in
             re.findall(r"^\s*(report|results):\s*(\S+)\s*$", done.stdout, re.M)}
    resolve = lambda p: (p if p.is_absolute() else ROOT / p) if p else None  # noqa: E731
    return DemoRun(command, done.returncode, output, seconds, resolve(found.get("report")),
                   resolve(found.get("results")))
