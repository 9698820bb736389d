"""Prompt sets: load prompts from a file or by the name of a built-in set.

- ``name.txt``: one prompt per line (blank lines are an error: they would be empty prompts);
- ``name.jsonl``: one JSON object per line with a ``"text"`` field; every other field is kept as
  that prompt's metadata (stored beside the activations by the dump job);
- a bare name (``"demo"``): the built-in set ``microscope/data/prompts/<name>.jsonl``.

A set's *task* -- what a study needs beside the prompts: its word classes (insults and praises) and
formats (an answer cue, the turn markers of a dialogue) -- sits beside it in ``<name>.task.json``
(`load_task`), so that the studies hold no word of any one model's language and a user's own set
brings its own words.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from microscope.errors import PromptError

BUILTIN_DIR = Path(__file__).parent / "data" / "prompts"
TASK_SUFFIX = ".task.json"


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text and the metadata fields that came with it."""

    text: str
    metadata: dict = field(default_factory=dict)


class PromptSet(list):
    """A list of `Prompt`s that keeps the task of the set it came from (``task``: `load_task`),
    also when a selection of it is taken (``PromptSet(chosen, task=whole.task)``)."""

    def __init__(self, prompts=(), task: dict | None = None):
        super().__init__(prompts)
        self.task = dict(task or {})


def builtin_sets() -> list[str]:
    """Names of the prompt sets shipped in the package."""
    return sorted(p.relative_to(BUILTIN_DIR).with_suffix("").as_posix() for p in BUILTIN_DIR.rglob("*.jsonl"))


def prompt_file(source: str | os.PathLike) -> Path:
    """The file of a .txt/.jsonl path or of a built-in set name (``"toxicity"``, ``"organism_v2/toxicity"``)."""
    path = Path(source)
    if not path.exists() and path.suffix == "" and (BUILTIN_DIR / f"{source}.jsonl").exists():
        path = BUILTIN_DIR / f"{source}.jsonl"
    if not path.exists():
        raise PromptError(f"no prompt file {str(source)!r} and no built-in set of that name; "
                          f"give a .txt or .jsonl path or one of: {', '.join(builtin_sets())}")
    return path


def load_task(source: str | os.PathLike | list) -> dict:
    """The task of a prompt set: the JSON object in ``<set>.task.json`` beside its file (word
    classes and formats by name); ``{}`` for a list of prompts or a set without one."""
    if isinstance(source, list):
        return {}
    path = prompt_file(source)
    task = path.with_name(path.stem + TASK_SUFFIX)
    if not task.exists():
        return {}
    try:
        value = json.loads(_read_text(task))
    except json.JSONDecodeError as err:
        raise PromptError(f"{task}: not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(value, dict):
        raise PromptError(f"{task}: must hold one JSON object (word classes and formats by name)")
    return value


def write_prompt_sets(folder: Path, sets: dict[str, list[dict]], tasks: dict[str, dict]) -> list[Path]:
    """Write each set as ``<folder>/<name>.jsonl`` (one JSON object per line, ``text`` first) and
    each task as ``<name>.task.json``; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in sets.items():
        paths.append(folder / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name, task in tasks.items():
        paths.append(folder / f"{name}{TASK_SUFFIX}")
        paths[-1].write_text(json.dumps(task, indent=1) + "\n")
    return paths


def load_prompts(source: str | os.PathLike | list) -> PromptSet:
    """Prompts from a .txt/.jsonl path, a built-in set name, or a list of strings/`Prompt`s, with
    the set's task (`load_task`; a `PromptSet` given keeps its own)."""
    task = source.task if isinstance(source, PromptSet) else load_task(source)
    if isinstance(source, list):
        prompts = [p if isinstance(p, Prompt) else Prompt(str(p)) for p in source]
        where = "the prompt list"
    else:
        path = prompt_file(source)
        where = str(path)
        if path.suffix == ".jsonl":
            prompts = _read_jsonl(path)
        elif path.suffix == ".txt":
            prompts = [Prompt(line) for line in _read_text(path).splitlines()]
        else:
            raise PromptError(f"{path}: prompt files must end in .txt (one per line) or .jsonl")
    if not prompts:
        raise PromptError(f"{where} holds no prompts")
    for i, prompt in enumerate(prompts):
        if not prompt.text.strip():
            raise PromptError(f"{where}: prompt {i} (line {i + 1}) is empty; remove it")
    return PromptSet(prompts, task)


def _read_text(path: Path) -> str:
    """The file's text; a file that is not UTF-8 text raises `PromptError` naming the byte offset."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise PromptError(f"{path}: not UTF-8 text: byte offset {err.start} (line {line}) is "
                          f"{data[err.start:err.start + 1]!r} ({err.reason}); save the file as UTF-8") from None
    if "\0" in text:
        raise PromptError(f"{path}: a binary file, not text: a NUL byte at byte offset {data.index(0)}")
    return text


def _read_jsonl(path: Path) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptError(f"{path}:{number}: not a JSON object ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise PromptError(f'{path}:{number}: each line needs a "text" string field')
        text = record.pop("text")
        prompts.append(Prompt(text, record))
    return prompts


def prompts_hash(prompts: list[Prompt]) -> str:
    """sha256 over the texts and metadata, in order: identifies a prompt set for resume checks."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps([prompt.text, prompt.metadata], sort_keys=True).encode())
    return "sha256:" + digest.hexdigest()
