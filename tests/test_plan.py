"""`microscope plan` and `EnergyMeter`: numbers checked against hand computation.

References computed here, independently of the planner:
- parameter counts from the OPT architecture (the paper's Table 1 plus the 350m quirks), and from
  the real HF module tree built on the meta device;
- store sizes from rows x widths x bytes;
- hook widths from the shapes a real (tiny) OPT forward pass produces.
"""

from __future__ import annotations

import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import OPTForCausalLM
from typer.testing import CliRunner

from conftest import tiny_model
from microscope.cli import app
from microscope.activations.energy import EnergyMeter
from microscope.errors import UnknownHookError, UnknownSizeError
from microscope.models.family import FamilySize, opt_config
from microscope.activations.budget import estimate_budget, estimate_every_size, hook_widths, parse_count

# name: (layers, heads, d_model, published size) from the OPT paper, Table 1
TABLE_1 = {"opt-125m": (12, 12, 768, 125e6), "opt-350m": (24, 16, 1024, 350e6), "opt-1.3b": (24, 32, 2048, 1.3e9),
           "opt-2.7b": (32, 32, 2560, 2.7e9), "opt-6.7b": (32, 32, 4096, 6.7e9), "opt-13b": (40, 40, 5120, 13e9),
           "opt-30b": (48, 56, 7168, 30e9), "opt-66b": (64, 72, 9216, 66e9), "opt-175b": (96, 96, 12288, 175e9)}
DOCS = Path(__file__).parents[1] / "docs" / "scale.md"


def hand_count(name: str) -> int:
    """Parameters of an OPT decoder: per layer 4 attention projections and 2 MLP matrices (with
    biases) and 2 LayerNorms; 50272 x d_embed token rows (tied with the output), 2050 position rows;
    350m: 512-wide embedding with project_in/out (no bias) and no final LayerNorm."""
    layers, _, d, _ = TABLE_1[name]
    e = 512 if name == "opt-350m" else d
    per_layer = 4 * d * d + 4 * d + 2 * 4 * d * d + 4 * d + d + 4 * d
    embeddings = 50272 * e + 2050 * d + (2 * e * d if e != d else 0)
    final_norm = 0 if name == "opt-350m" else 2 * d
    return layers * per_layer + embeddings + final_norm


@pytest.mark.parametrize("name", list(TABLE_1))
def test_parameter_counts_agree_with_hand_computation(name):
    p = estimate_budget(name)
    assert abs(p.params / hand_count(name) - 1) < 0.01
    with torch.device("meta"):
        hf = OPTForCausalLM(opt_config(name))
    assert p.params == sum(t.numel() for t in hf.parameters())  # tied lm_head counted once
    # The published names are rounded labels: within 2%, except 350m (331M; its 512-wide embedding).
    assert abs(p.params / TABLE_1[name][3] - 1) < (0.06 if name == "opt-350m" else 0.02)
    assert p.weights_gb == pytest.approx(2 * hand_count(name) / 1e9, rel=0.01)  # fp16


def test_gpus_per_replica_follow_the_weights():
    """OPT-66B needs two 80 GB GPUs in fp16, OPT-175B (350 GB) at least five; 13B fits one."""
    assert estimate_budget("opt-13b").gpus_per_replica == 1
    assert estimate_budget("opt-66b").gpus_per_replica == 2
    p = estimate_budget("opt-175b")
    assert p.gpus_per_replica >= math.ceil(349.2 / 79) and p.replica_gb / p.gpus_per_replica <= 80
    assert estimate_budget("opt-175b", gpu_memory_gb=141).gpus_per_replica < p.gpus_per_replica
    assert estimate_budget("opt-66b", model_dtype="int8", batch_size=1).gpus_per_replica == 1
    assert estimate_budget("opt-66b", replicas=3).gpus == 6


def test_store_size_by_hand():
    # opt-125m, every layer's resid_post, 1000 tokens in prompts of 100: 1000 rows x 12 x 768 values
    p = estimate_budget("opt-125m", hooks="blocks.*.hook_resid_post", tokens=1000, seq_len=100)
    index = 12  # token_id, prompt_id, position as int32
    assert p.store_gb_by_mode["fp16"]["all"] * 1e9 == 1000 * 12 * 768 * 2 + 1000 * index
    assert p.store_gb_by_mode["fp32"]["all"] * 1e9 == 1000 * 12 * 768 * 4 + 1000 * index
    assert p.store_gb_by_mode["bf16"]["last"] * 1e9 == 10 * 12 * 768 * 2 + 10 * index  # one row per prompt
    # MLP hooks are 4 x d_model wide; attention patterns are packed lower triangles per prompt
    p = estimate_budget("opt-125m", hooks="blocks.0.mlp.hook_post,blocks.0.attn.hook_pattern", tokens=8, seq_len=4)
    triangle = 12 * (4 * 5 // 2)  # heads x T(T+1)/2
    assert p.store_gb_by_mode["fp16"]["all"] * 1e9 == 8 * 3072 * 2 + 2 * triangle * 2 + 8 * index
    assert p.store_gb_by_mode["fp16"]["last"] * 1e9 == 2 * 3072 * 2 + 2 * (12 * 4) * 2 + 2 * index


def test_hook_widths_match_a_real_forward_pass():
    model = tiny_model("post_ln")  # d_model 32, 4 heads, ffn 128, 16-wide embedding (projected in), 3 layers
    c = model.config
    size = FamilySize("opt-tiny", c.num_hidden_layers, c.num_attention_heads, c.hidden_size, 1e-4, 1,
                      word_embed_proj_dim=c.word_embed_proj_dim, post_ln=True)
    seen = {}
    modules = {"hook_embed": model.model.decoder.project_in, "blocks.1.attn.hook_q": model.model.decoder.layers[1].self_attn.q_proj,
               "blocks.1.mlp.hook_pre": model.model.decoder.layers[1].fc1, "blocks.1.hook_mlp_out": model.model.decoder.layers[1].fc2,
               "blocks.1.hook_attn_out": model.model.decoder.layers[1].self_attn.out_proj}
    for name, module in modules.items():
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape[-1]))
    out = model(torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    widths = hook_widths(size)
    assert {n: widths[n] for n in seen} == seen
    assert widths["blocks.0.hook_resid_post"] == out.hidden_states[1].shape[-1]  # after layer 0
    assert "ln_final.hook_normalized" not in widths  # post-LN: no final norm
    assert sum(n.startswith("blocks.") for n in widths) == 3 * 12  # 12 per block: docs/architecture.md "Hook names"


def test_time_energy_and_carbon_by_hand():
    p = estimate_budget("opt-66b", tokens=3_600_000, throughput=1000, replicas=2, write_gbps=1e6,
                        gpu_power_w=700, pue=1.2, grid_intensity=500)
    assert p.compute_hours == pytest.approx(0.5)  # 3.6M tokens / (2 x 1000 tok/s)
    assert p.hours == pytest.approx(0.5) and p.gpus == 4
    assert p.energy_kwh == pytest.approx(0.5 * 4 * 0.7 * 1.2)
    assert p.co2e_kg == pytest.approx(p.energy_kwh * 0.5)
    slow_disk = estimate_budget("opt-125m", hooks="blocks.*.hook_resid_post", tokens=10_000_000,
                                write_gbps=0.1)
    assert slow_disk.hours == slow_disk.write_hours > slow_disk.compute_hours and slow_disk.notes
    # without a measured throughput: forward FLOPs 2 x params per token at the achieved TFLOP/s
    assert estimate_budget("opt-175b", gpu_tflops=100).tokens_per_s == pytest.approx(
        100e12 / (2 * hand_count("opt-175b")), rel=0.01)


def test_clear_errors():
    with pytest.raises(UnknownSizeError, match="valid sizes: opt-125m"):
        estimate_budget("opt-99b")
    with pytest.raises(UnknownHookError, match="did you mean blocks.3.hook_resid_post"):
        estimate_budget("opt-125m", hooks="blocks.3.hook_resid_pots")
    with pytest.raises(UnknownHookError, match="no hook of opt-125m"):
        estimate_budget("opt-125m", hooks="blocks.12.hook_resid_post")  # 125m has layers 0..11
    with pytest.raises(ValueError, match="positions"):
        estimate_budget("opt-125m", positions="first")
    with pytest.raises(ValueError, match="10M"):
        parse_count("ten million")
    assert parse_count("10M") == 10_000_000 and parse_count("2.5B") == 2_500_000_000 and parse_count("1,000") == 1000


def test_cli_plan_and_the_docs_table_is_current():
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--all", "--markdown"])
    assert result.exit_code == 0, result.output
    assert len(re.findall(r"^\| opt-", result.output, re.M)) == 9
    assert result.output.strip() in DOCS.read_text(), \
        "docs/scale.md is stale: paste the output of `microscope plan --all --markdown`"
    single = runner.invoke(app, ["plan", "--model", "opt-66b", "--tokens", "1M", "--gpu-memory", "141GB",
                                  "--batch-size", "2"])
    assert single.exit_code == 0 and "1 x 141 GB" in single.output
    bad = runner.invoke(app, ["plan", "--model", "opt-7b"])
    assert bad.exit_code != 0 and "valid sizes" in bad.output
    assert [p.size for p in estimate_every_size()] == list(TABLE_1)


# --- EnergyMeter ---

def test_energy_meter_without_gpu_reports_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with EnergyMeter() as meter:
        pass
    assert meter.joules is None and meter.kwh is None
    assert meter.as_attributes() == {"energy_joules": None, "energy_source": "no CUDA GPU", "energy_gpus": 0}


def test_energy_meter_sums_nvml_counters_of_visible_gpus(monkeypatch):
    """A stand-in for pynvml whose energy counters (mJ) advance between enter and exit."""
    counters = {"GPU-aaa": 1_000_000, "GPU-bbb": 5_000_000, "GPU-ccc": 0}  # ccc is not visible
    calls = []
    fake = types.SimpleNamespace(
        NVMLError=RuntimeError, nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByUUID=lambda uuid: uuid,
        nvmlDeviceGetTotalEnergyConsumption=lambda handle: counters[handle])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=["aaa", "GPU-bbb"][i]))
    with EnergyMeter() as meter:
        counters["GPU-aaa"] += 3_600_000  # 3600 J
        counters["GPU-bbb"] += 1_800_000  # 1800 J
        counters["GPU-ccc"] += 9_999_999
    assert meter.joules == pytest.approx(5400.0)
    assert meter.kwh == pytest.approx(5400 / 3.6e6)
    assert meter.as_attributes() == {"energy_joules": 5400.0, "energy_source": "nvml", "energy_gpus": 2}
    assert calls == ["init", "shutdown"]
