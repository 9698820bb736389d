"""`convert_metaseq` turns metaseq checkpoints (model-parallel parts included) into HF folders.

The metaseq side is written here, independently of the converter, from metaseq's own rules
(`ModelParallelMultiheadAttention`, `glue_megatron_parts`): each part holds 1/mp of the
column-parallel rows (fused qkv as [k; v; q] of its own heads, fc1, vocab rows of embed_tokens),
1/mp of the row-parallel columns (out_proj, fc2), and full copies of everything else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import OPTForCausalLM

from conftest import tiny_model
from microscope.errors import MetaseqCheckpointError, ModelNotFoundError
from microscope.models import metaseq
from microscope.models.metaseq import convert_metaseq


def touch(path: str) -> None:
    Path(path).touch()


class FairseqStyleArgs:
    """A non-tensor object pickled beside the weights, as metaseq's `cfg` is; unpickling it must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (touch, (str(self.marker),))  # would create `marker` if a loader executed it


def write_metaseq(model: OPTForCausalLM, folder: Path, mp: int, marker: Path | None = None) -> list[Path]:
    """Save `model` as `mp` metaseq files `reshard-model_part-{i}.pt` (one `checkpoint.pt` when mp=1)."""
    sd = {k.removeprefix("model."): v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    n_layers = model.config.num_hidden_layers
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]

    def rows(t):  # column-parallel: part i gets the i-th block of output rows
        return t.chunk(mp, dim=0)

    for i in range(mp):
        part = parts[i]
        part["decoder.embed_tokens.weight"] = rows(sd["decoder.embed_tokens.weight"])[i].clone()
        part["decoder.output_projection.weight"] = part["decoder.embed_tokens.weight"].clone()
        part["decoder.embed_positions.weight"] = sd["decoder.embed_positions.weight"].clone()
        part["decoder.version"] = torch.tensor([3.0])
        if "decoder.project_in.weight" in sd:
            part["decoder.project_in_dim.weight"] = sd["decoder.project_in.weight"].clone()
            part["decoder.project_out_dim.weight"] = sd["decoder.project_out.weight"].clone()
        if "decoder.final_layer_norm.weight" in sd:
            part["decoder.layer_norm.weight"] = sd["decoder.final_layer_norm.weight"].clone()
            part["decoder.layer_norm.bias"] = sd["decoder.final_layer_norm.bias"].clone()
        for layer in range(n_layers):
            p = f"decoder.layers.{layer}."
            for w in ("weight", "bias"):
                k, v, q = (rows(sd[f"{p}self_attn.{n}_proj.{w}"])[i] for n in "kvq")
                part[f"{p}self_attn.qkv_proj.{w}"] = torch.cat([k, v, q]).clone()
                part[f"{p}fc1.{w}"] = rows(sd[f"{p}fc1.{w}"])[i].clone()
                for ln in ("self_attn_layer_norm", "final_layer_norm"):
                    part[f"{p}{ln}.{w}"] = sd[f"{p}{ln}.{w}"].clone()
            for name in ("self_attn.out_proj", "fc2"):  # row-parallel: input columns split, bias replicated
                part[f"{p}{name}.weight"] = sd[f"{p}{name}.weight"].chunk(mp, dim=1)[i].clone()
                part[f"{p}{name}.bias"] = sd[f"{p}{name}.bias"].clone()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / (f"reshard-model_part-{i}.pt" if mp > 1 else "checkpoint.pt") for i in range(mp)]
    for path, part in zip(paths, parts):
        extra = {"cfg": FairseqStyleArgs(marker)} if marker else {"args": argparse.Namespace(arch="transformer_lm")}
        torch.save({"model": part, "optimizer_history": [], "extra_state": {"epoch": 1}, **extra}, path)
    return paths


def logits(model: OPTForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("layout,mp", [("pre_ln", 2), ("post_ln", 2), ("odd", 1)])
def test_round_trip_gives_identical_logits(tmp_path, token_ids, layout, mp):
    reference = tiny_model(layout, seed=3)
    marker = tmp_path / "code_ran"
    write_metaseq(reference, tmp_path / "metaseq", mp, marker=marker)

    report = convert_metaseq(tmp_path / "metaseq", tmp_path / "hf", heads=reference.config.num_attention_heads)
    converted = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()

    assert torch.equal(logits(converted, token_ids), logits(reference, token_ids))
    for field in ("vocab_size", "hidden_size", "ffn_dim", "num_hidden_layers", "word_embed_proj_dim",
                  "do_layer_norm_before", "max_position_embeddings", "num_attention_heads"):
        assert getattr(converted.config, field) == getattr(reference.config, field), field
    assert len(report.parts) == mp
    assert not marker.exists(), "loading the checkpoint executed code pickled in it"


def test_the_fused_qkv_order_matters(tmp_path, token_ids):
    """A converter reading metaseq's [k; v; q] blocks as [q; k; v] would fail the test above."""
    reference = tiny_model("pre_ln", seed=3)
    write_metaseq(reference, tmp_path / "metaseq", 2)
    wrong_order = ("q", "k", "v")
    original = metaseq.QKV_ORDER
    try:
        metaseq.QKV_ORDER = wrong_order
        convert_metaseq(tmp_path / "metaseq", tmp_path / "hf", heads=4)
    finally:
        metaseq.QKV_ORDER = original
    converted = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not torch.allclose(logits(converted, token_ids), logits(reference, token_ids))


def test_memory_stays_bounded_one_shard_at_a_time(tmp_path, token_ids, monkeypatch):
    reference = tiny_model("pre_ln", seed=5)
    write_metaseq(reference, tmp_path / "metaseq", 2)
    loads, writes = [], []
    real_load, real_save = torch.load, metaseq.save_file
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw) or real_load(*a, **kw))
    monkeypatch.setattr(metaseq, "save_file", lambda tensors, path, **kw: writes.append(
        sum(t.numel() * t.element_size() for t in tensors.values())) or real_save(tensors, path, **kw))

    limit = 20_000  # bytes; the fp32 model holds ~190 kB, its largest tensor (embed_tokens) 12 kB
    report = convert_metaseq(tmp_path / "metaseq", tmp_path / "hf", heads=4, max_shard_size=limit)

    assert loads and all(kw.get("weights_only") is True and kw.get("mmap") is True for kw in loads)
    assert len(writes) == len(report.shard_files) > 5
    assert max(writes) <= limit and sum(writes) == report.total_bytes
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report.shard_files)
    with safe_open(tmp_path / "hf" / report.shard_files[-1], "pt") as f:  # layers are written in order
        assert any(k.startswith("model.decoder.layers.2.") or "final_layer_norm" in k for k in f.keys())
    converted = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(logits(converted, token_ids), logits(reference, token_ids))


def test_dtype_cast_and_heads_from_family(tmp_path):
    """Without --heads, the head count comes from the family size of the same width and depth."""
    model = tiny_model("pre_ln", seed=0, hidden_size=48, num_attention_heads=12, num_hidden_layers=2, ffn_dim=64)
    write_metaseq(model, tmp_path / "m", 2)
    with pytest.raises(MetaseqCheckpointError, match="--heads"):
        convert_metaseq(tmp_path / "m", tmp_path / "hf")
    monkey_size = type(metaseq.SIZES["opt-125m"])("opt-test", 2, 12, 48, 1e-4, 1)
    metaseq.SIZES["opt-test"] = monkey_size
    try:
        report = convert_metaseq(tmp_path / "m", tmp_path / "hf", dtype=torch.float16)
    finally:
        del metaseq.SIZES["opt-test"]
    assert report.config.num_attention_heads == 12
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.decoder.layers.0.fc1.weight").dtype == torch.float16


# --- clear errors ---

def test_missing_source_and_missing_part(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no metaseq checkpoint"):
        convert_metaseq(tmp_path / "nowhere", tmp_path / "hf")
    paths = write_metaseq(tiny_model("pre_ln"), tmp_path / "m", 2)
    paths[0].unlink()
    with pytest.raises(ModelNotFoundError, match=r"parts \[0\] are missing"):
        convert_metaseq(tmp_path / "m", tmp_path / "hf", heads=4)


def test_missing_last_part_is_caught_from_the_shapes(tmp_path):
    paths = write_metaseq(tiny_model("pre_ln"), tmp_path / "m", 2)
    paths[1].unlink()
    with pytest.raises(MetaseqCheckpointError, match="2 model-parallel parts are needed but 1"):
        convert_metaseq(tmp_path / "m", tmp_path / "hf", heads=4)


def test_parts_from_different_checkpoints(tmp_path):
    write_metaseq(tiny_model("pre_ln", seed=0), tmp_path / "a", 2)
    write_metaseq(tiny_model("pre_ln", seed=1), tmp_path / "b", 2)
    (tmp_path / "b" / "reshard-model_part-1.pt").replace(tmp_path / "a" / "reshard-model_part-1.pt")
    with pytest.raises(MetaseqCheckpointError, match="identical in every model-parallel part"):
        convert_metaseq(tmp_path / "a", tmp_path / "hf", heads=4)


def test_parts_with_different_keys_or_shapes(tmp_path):
    write_metaseq(tiny_model("pre_ln"), tmp_path / "a", 2)
    write_metaseq(tiny_model("pre_ln", num_hidden_layers=2), tmp_path / "b", 2)
    write_metaseq(tiny_model("pre_ln", ffn_dim=64), tmp_path / "c", 2)
    (tmp_path / "b" / "reshard-model_part-1.pt").replace(tmp_path / "a" / "reshard-model_part-1.pt")
    with pytest.raises(MetaseqCheckpointError, match=r"lacks \['decoder.layers.2"):
        convert_metaseq(tmp_path / "a", tmp_path / "hf", heads=4)
    write_metaseq(tiny_model("pre_ln"), tmp_path / "a", 2)
    (tmp_path / "c" / "reshard-model_part-1.pt").replace(tmp_path / "a" / "reshard-model_part-1.pt")
    with pytest.raises(MetaseqCheckpointError, match="disagree on decoder.layers.0.fc1"):
        convert_metaseq(tmp_path / "a", tmp_path / "hf", heads=4)


def test_fsdp_shards_and_foreign_files(tmp_path):
    (tmp_path / "fsdp").mkdir()
    torch.save({"model": {"flat_param_0": torch.zeros(4)}}, tmp_path / "fsdp" / "checkpoint_last-model_part-0-shard0.pt")
    with pytest.raises(MetaseqCheckpointError, match="reshard_fsdp"):
        convert_metaseq(tmp_path / "fsdp", tmp_path / "hf")
    torch.save({"model": {"encoder.embed_tokens.weight": torch.zeros(4, 2)}}, tmp_path / "encoder.pt")
    with pytest.raises(MetaseqCheckpointError, match="not part of an OPT decoder|decoder layers are missing"):
        convert_metaseq(tmp_path / "encoder.pt", tmp_path / "hf")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(MetaseqCheckpointError, match="cannot read"):
        convert_metaseq(tmp_path / "junk.pt", tmp_path / "hf")
