"""The dump job in one process: what it stores equals what the model computes in memory, and bad
input or a mismatched resume is refused with a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

import microscope
from microscope.activations.dump import dump
from microscope.activations.reader import open_store
from microscope.cli import app
from microscope.errors import DiskFullError, Fp16OverflowError, PromptError, StoreError, StoreMismatchError
from test_store import FullDisk
from test_store_fixtures import assert_stores_identical, make_model_dir, make_prompts

HOOKS = "blocks.*.hook_resid_post,blocks.1.attn.hook_pattern"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return make_prompts(tmp_path_factory.mktemp("prompts") / "p.jsonl", 12)


@pytest.fixture(scope="module")
def scope(model_dir):
    return microscope.load(str(model_dir))


@pytest.mark.parametrize("dtype,positions", [("fp32", "all"), ("fp16", "last"), ("bf16", "field:pick")])
def test_stored_activations_equal_the_in_memory_capture(tmp_path, model_dir, prompts, scope, dtype, positions):
    # batch_tokens=1: every prompt runs alone, unpadded, exactly as the reference below.
    dump(str(model_dir), str(prompts), HOOKS, str(tmp_path / "s.zarr"), dtype=dtype, positions=positions,
         chunk_rows=16, batch_tokens=1)
    store = open_store(str(tmp_path / "s.zarr"))
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    names = scope.resolve_names(HOOKS.split(","))
    assert store.hooks == names
    for p, record in enumerate(records):
        _, cache = scope.run_with_cache([record["text"]], names=names)
        length = cache[names[0]].shape[1]
        kept = {"all": list(range(length)), "last": [length - 1], "field:pick": record["pick"]}[positions]
        assert store.positions(*(lambda r: (r.start, r.stop))(store.prompt_range(p))).tolist() == kept
        for name in names:
            got = store[name].torch().prompt(p)
            if name.endswith("hook_pattern"):
                expected = cache[name][0][:, kept, :].to(torch_dtype)       # [head, kept query, key]
            else:
                expected = cache[name][0][kept].to(torch_dtype)
            assert got.dtype == torch_dtype and torch.equal(got, expected), (name, p)
        ids, _ = scope.tokenize([record["text"]])
        assert store.token_ids(*(lambda r: (r.start, r.stop))(store.prompt_range(p))).tolist() == \
            ids[0][kept].tolist()
        assert store.prompt_metadata(p) == {"id": p, "pick": record["pick"]}
    prov = store.provenance
    assert prov["model"] == str(model_dir) and prov["weights_hash"].startswith("sha256:")
    assert prov["hooks"] == names and prov["dtype"] == store.dtype.name
    assert set(prov) >= {"model_config", "code_version", "command", "git_commit", "seeds", "tokenizer", "positions"}


def test_packed_batches_match_single_prompt_batches(tmp_path, model_dir, prompts):
    """Batching by token budget (with padding) changes nothing beyond float rounding."""
    dump(str(model_dir), str(prompts), HOOKS, str(tmp_path / "one.zarr"), dtype="fp32", chunk_rows=16,
         batch_tokens=1)
    dump(str(model_dir), str(prompts), HOOKS, str(tmp_path / "many.zarr"), dtype="fp32", chunk_rows=16,
         unit_rows=64, batch_tokens=200)
    one, many = open_store(str(tmp_path / "one.zarr")), open_store(str(tmp_path / "many.zarr"))
    assert len(many.units) < len(one.units)
    for name in one.hooks:
        np.testing.assert_allclose(many[name][:], one[name][:], atol=1e-5)


def test_resume_against_other_settings_is_refused(tmp_path, model_dir, prompts):
    out = str(tmp_path / "s.zarr")
    dump(str(model_dir), str(prompts), HOOKS, out, chunk_rows=16)
    with pytest.raises(StoreError, match="--resume"):
        dump(str(model_dir), str(prompts), HOOKS, out, chunk_rows=16)
    with pytest.raises(StoreMismatchError, match="dtype: store has 'float16', this run has 'bfloat16'"):
        dump(str(model_dir), str(prompts), HOOKS, out, chunk_rows=16, dtype="bf16", resume=True)
    with pytest.raises(StoreMismatchError, match="hooks"):
        dump(str(model_dir), str(prompts), "blocks.0.hook_resid_post", out, chunk_rows=16, resume=True)
    other = make_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(StoreMismatchError, match="weights_hash"):
        dump(str(other), str(prompts), HOOKS, out, chunk_rows=16, resume=True)
    summary = dump(str(model_dir), str(prompts), HOOKS, out, chunk_rows=16, resume=True)
    assert summary.units_run == 0 and summary.units_already_committed == summary.units_total


def test_empty_and_overlong_prompts(tmp_path, model_dir):
    (tmp_path / "empty.txt").write_text("w1 w2\n\nw3\n")
    with pytest.raises(PromptError, match=r"prompt 1 \(line 2\) is empty"):
        dump(str(model_dir), str(tmp_path / "empty.txt"), HOOKS, str(tmp_path / "a.zarr"))
    long_text = " ".join(["w5"] * 80)            # 81 tokens > the tiny model's 64 positions
    (tmp_path / "long.txt").write_text(f"w1 w2\n{long_text}\n")
    with pytest.raises(PromptError, match="prompt 1 is longer than the model.s context of 64 tokens.*--max-length"):
        dump(str(model_dir), str(tmp_path / "long.txt"), HOOKS, str(tmp_path / "b.zarr"))
    summary = dump(str(model_dir), str(tmp_path / "long.txt"), "blocks.0.hook_resid_post",
                   str(tmp_path / "c.zarr"), max_length=20)
    store = open_store(str(tmp_path / "c.zarr"))
    assert summary.truncated_prompts == 1 and store.provenance["truncated_prompts"] == 1
    assert store.group["prompt_length"][:].tolist() == [3, 20]


def test_a_store_whose_layout_was_interrupted_is_laid_out_again(tmp_path, model_dir, prompts):
    """What a dump killed while creating its arrays leaves behind: the in-progress marker and some
    arrays. The next run (with or without --resume) lays the store out again."""
    reference, out = tmp_path / "reference.zarr", tmp_path / "s.zarr"
    dump(str(model_dir), str(prompts), HOOKS, str(reference), chunk_rows=16)
    group = zarr.open_group(str(out), mode="w")
    group.attrs["microscope"] = {"format_version": 1, "complete": False}
    group.create_array("token_id", shape=(5,), dtype="int32", fill_value=-1)
    with pytest.raises(StoreError, match="never fully laid out"):
        open_store(str(out))
    dump(str(model_dir), str(prompts), HOOKS, str(out), chunk_rows=16, resume=True)
    assert_stores_identical(out, reference)


def test_a_foreign_zarr_group_is_never_overwritten(tmp_path, model_dir, prompts):
    out = tmp_path / "other.zarr"
    zarr.open_group(str(out), mode="w").create_array("mine", shape=(3,), dtype="int32", fill_value=7)
    with pytest.raises(StoreError, match="not an activation store"):
        dump(str(model_dir), str(prompts), HOOKS, str(out), chunk_rows=16)
    assert zarr.open_group(str(out), mode="r")["mine"][:].tolist() == [7, 7, 7]


def test_full_disk_fails_cleanly_then_resume_completes_identically(tmp_path, model_dir, prompts):
    reference = tmp_path / "reference.zarr"
    dump(str(model_dir), str(prompts), HOOKS, str(reference), chunk_rows=16, batch_tokens=1)
    out = tmp_path / "s.zarr"
    with pytest.raises(DiskFullError, match="ran out of space"):
        dump(str(model_dir), str(prompts), HOOKS, FullDisk(zarr.storage.LocalStore(str(out)), budget=20000),
             chunk_rows=16, batch_tokens=1)
    partial = open_store(str(out))
    assert 0 < partial.committed.sum() < len(partial.units)
    first = partial.units[0]
    assert np.array_equal(partial["blocks.0.hook_resid_post"][:first.n_tokens],
                          open_store(str(reference))["blocks.0.hook_resid_post"][:first.n_tokens])
    dump(str(model_dir), str(prompts), HOOKS, str(out), chunk_rows=16, batch_tokens=1, resume=True)
    assert_stores_identical(out, reference)


def test_cli_dump_and_inspect(tmp_path, model_dir, prompts):
    runner = CliRunner()
    out = tmp_path / "s.zarr"
    result = runner.invoke(app, ["dump", "--model", str(model_dir), "--prompts", str(prompts), "--hooks",
                                 "blocks.*.hook_resid_post", "--out", str(out), "--dtype", "bf16",
                                 "--positions", "last"])
    assert result.exit_code == 0, result.output
    assert "dump summary" in result.output and "tokens/s" in result.output
    result = runner.invoke(app, ["inspect", str(out), "--verify"])
    assert result.exit_code == 0, result.output
    assert "blocks.2.hook_resid_post" in result.output and "all checksums match" in result.output
    result = runner.invoke(app, ["dump", "--model", str(model_dir), "--prompts", str(prompts), "--hooks",
                                 "blocks.*.hook_resid_post", "--out", str(out), "--dtype", "fp16", "--resume"])
    assert result.exit_code == 1 and "dtype" in result.output


def test_fp16_overflow_is_an_error_not_inf(tmp_path, prompts):
    """Activations beyond 65504 stop an fp16 dump with a clear error; bf16 stores them."""
    from safetensors.torch import load_file, save_file
    folder = make_model_dir(tmp_path / "loud")
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[key] = weights[key] * 1e6
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Fp16OverflowError, match="float16 range.*blocks.0.hook_resid_pre.*bf16"):
        dump(str(folder), str(prompts), "blocks.0.hook_resid_pre", str(tmp_path / "a.zarr"), dtype="fp16")
    dump(str(folder), str(prompts), "blocks.0.hook_resid_pre", str(tmp_path / "b.zarr"), dtype="bf16")
    assert np.isfinite(open_store(str(tmp_path / "b.zarr"))["blocks.0.hook_resid_pre"][:]).all()
