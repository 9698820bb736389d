"""What a dump does with bad input: nothing of the user's is lost, and every mistake stops before
the weights load, as one line that says how to fix it.

- `--out` pointing at a folder of someone's files refuses, and the files survive byte for byte.
- A typo'd hook, an `--out` that cannot be written, bad prompts or settings are found by
  `preflight` from the model's config alone: shown with a model folder whose weights file is
  garbage, so any attempt to read the weights would fail differently.
- A truncated weights file is refused from its header before any weight is read.
- On the command line each of these is exactly one line `error: ...` on stderr and exit status 1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zarr
from transformers import OPTForCausalLM
from typer.testing import CliRunner

import microscope
from conftest import tiny_model
from microscope.activations.dump import dump, preflight
from microscope.activations.settings import DumpSettings
from microscope.cli import app
from microscope.errors import CheckpointCorruptError, PromptError, StoreError, UnknownHookError
from microscope.names import model_names, resolve
from test_store_fixtures import make_model_dir, make_prompts

HOOKS = "blocks.*.hook_resid_post"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def broken_model_dir(tmp_path_factory, model_dir) -> Path:
    """The tiny model with a valid config.json and tokenizer, and a weights file cut in half."""
    broken = tmp_path_factory.mktemp("broken") / "tiny"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return broken


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return make_prompts(tmp_path_factory.mktemp("prompts") / "p.jsonl", 6)


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """Someone's folder: a note and a subfolder with a table."""
    folder = tmp_path / "results"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("do not lose me\n")
    (folder / "sub" / "x.csv").write_bytes(b"a,b\n1,2\n")
    return folder


@pytest.fixture
def weights_never_read(monkeypatch):
    """Fail the test if anything asks transformers to load weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded")
    monkeypatch.setattr(OPTForCausalLM, "from_pretrained", refuse)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# --- nothing lost ------------------------------------------------------------------------------

def test_a_folder_of_user_files_survives_dump_out(model_dir, prompts, user_folder):
    before = snapshot(user_folder)
    with pytest.raises(StoreError, match=f"{user_folder} already holds files that are not an activation "
                                         "store.*choose an empty folder or a new path"):
        dump(str(model_dir), str(prompts), HOOKS, str(user_folder))
    result = cli("dump", "--model", str(model_dir), "--prompts", str(prompts), "--hooks", HOOKS,
                 "--out", str(user_folder))
    assert_one_line_error(result, str(user_folder), "choose an empty folder or a new path")
    assert snapshot(user_folder) == before


def test_a_zarr_store_object_over_user_files_is_refused_too(model_dir, prompts, user_folder):
    """A Store object skips the path checks; the store's creation refuses instead, deleting nothing."""
    before = snapshot(user_folder)
    with pytest.raises(StoreError, match="already holds files that are not an activation store"):
        dump(str(model_dir), str(prompts), HOOKS, zarr.storage.LocalStore(str(user_folder)))
    assert snapshot(user_folder) == before


def test_an_empty_folder_is_a_fine_out(model_dir, prompts, tmp_path):
    (tmp_path / "empty").mkdir()
    summary = dump(str(model_dir), str(prompts), HOOKS, str(tmp_path / "empty"))
    assert summary.units_run == summary.units_total > 0


# --- errors before the weights load --------------------------------------------------------------

# Each case changes one argument of a good dump ("{tmp}": the test's folder, "{user}": a folder of
# someone's files): the error it must raise, and what the message must say.
INPUT_ERRORS = [
    pytest.param({"hooks": "blocks.1.hook_resid_pots"}, UnknownHookError,
                 "did you mean blocks.1.hook_resid_post", id="typo'd hook"),
    pytest.param({"hooks": "blocks.*.hook_resdi_post"}, UnknownHookError,
                 r"did you mean blocks\.\*\.hook_resid_post", id="glob matching nothing"),
    pytest.param({"out": "{tmp}/a_file/s.zarr"}, StoreError, "a_file is a file, not a folder", id="out below a file"),
    pytest.param({"out": "{tmp}/a_file"}, StoreError, "a_file is a file; choose an empty folder or a new path",
                 id="out is a file"),
    pytest.param({"out": "{user}"}, StoreError, "already holds files that are not an activation store",
                 id="out is a user folder"),
    pytest.param({"prompts": "{tmp}/nope.txt"}, PromptError, "no prompt file", id="missing prompt file"),
    pytest.param({"prompts": "{tmp}/long.txt"}, PromptError,
                 "longer than the model.s context of 64 tokens.*--max-length", id="prompt over the context"),
    pytest.param({"dtype": "fp8"}, StoreError, "unknown dtype 'fp8'", id="unknown dtype"),
    pytest.param({"hooks": "blocks.0.attn.hook_pattern", "pattern_heads": [9]}, StoreError,
                 r"--pattern-heads \[9\]: blocks.0.attn.hook_pattern has heads 0..3", id="pattern head out of range"),
]


@pytest.mark.parametrize("change,error,message", INPUT_ERRORS)
def test_input_errors_stop_before_the_weights_load(change, error, message, broken_model_dir, prompts,
                                                   user_folder, tmp_path):
    """The weights file is garbage: had the dump tried to read it, the error would be a
    CheckpointCorruptError; each mistake is reported as itself instead."""
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "long.txt").write_text(" ".join(["w5"] * 80) + "\n")   # 81 tokens > 64 positions
    args = {"prompts": str(prompts), "hooks": HOOKS, "out": str(tmp_path / "new.zarr")}
    args.update({k: v.format(tmp=tmp_path, user=user_folder) if isinstance(v, str) else v
                 for k, v in change.items()})
    with pytest.raises(error, match=message):
        dump(str(broken_model_dir), **args)


def test_a_truncated_weights_file_is_refused_from_its_header(broken_model_dir, prompts, tmp_path,
                                                             weights_never_read):
    with pytest.raises(CheckpointCorruptError, match=r"model.safetensors is truncated or corrupt.*re-download"):
        dump(str(broken_model_dir), str(prompts), HOOKS, str(tmp_path / "s.zarr"))
    assert not (tmp_path / "s.zarr").exists()


def test_a_missing_shard_is_refused_before_any_weight_is_read(tmp_path, weights_never_read):
    tiny_model().save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointCorruptError, match=f"lacks {shards[-1].name}, named in model.safetensors.index.json"):
        microscope.load(str(tmp_path / "sharded"))


def test_dump_runs_preflight_before_loading(model_dir, prompts, tmp_path, weights_never_read):
    """Counted on a healthy folder: a typo'd hook never reaches the weights."""
    with pytest.raises(UnknownHookError):
        dump(str(model_dir), str(prompts), "blocks.1.hook_resid_pots", str(tmp_path / "s.zarr"))


def test_preflight_reads_only_the_config_even_of_a_66b_model(tmp_path):
    checked = preflight("random:opt-66b", ["The cat sat"], HOOKS, tmp_path / "s.zarr")
    assert checked.hooks == [f"blocks.{i}.hook_resid_post" for i in range(64)]
    assert [p.text for p in checked.prompts] == ["The cat sat"]
    assert not (tmp_path / "s.zarr").exists()


def test_preflight_of_a_built_scope_uses_its_config(model_dir, prompts, tmp_path):
    scope = microscope.load(str(model_dir))
    checked = preflight(scope, str(prompts), "blocks.0.attn.hook_*", tmp_path / "s.zarr", DumpSettings())
    assert checked.hooks == [f"blocks.0.attn.hook_{s}" for s in ("q", "k", "v", "pattern", "z")]


def test_a_glob_that_matches_nothing_suggests_globs():
    names = model_names(12)
    with pytest.raises(UnknownHookError, match=r"did you mean blocks\.\*\.attn\.hook_z or"):
        resolve("blocks.*.attn.hook_zz", names)
    with pytest.raises(UnknownHookError, match=r"globs look like blocks\.\*\.hook_resid_post or blocks\.\*\.attn\.hook_\*"):
        resolve("blocks.*.hook_resdi_post", names)


# --- one line on the command line ----------------------------------------------------------------

@pytest.mark.parametrize("hooks,out,expected", [
    pytest.param("blocks.*.hook_resdi_post", "{tmp}/s.zarr", "blocks.*.hook_resid_post", id="typo'd hook"),
    pytest.param(HOOKS, "{tmp}/a_file/s.zarr", "is a file, not a folder", id="out below a file"),
    pytest.param(HOOKS, "{user}", "choose an empty folder or a new path", id="out is a user folder"),
    pytest.param(HOOKS, "{tmp}/s.zarr", "truncated or corrupt", id="truncated weights"),
])
def test_each_cli_failure_is_one_line_on_stderr(hooks, out, expected, broken_model_dir, prompts, user_folder,
                                                tmp_path):
    (tmp_path / "a_file").write_text("not a folder\n")
    result = cli("dump", "--model", str(broken_model_dir), "--prompts", str(prompts), "--hooks", hooks,
                 "--out", out.format(tmp=tmp_path, user=user_folder))
    assert_one_line_error(result, expected)
