"""Convert metaseq checkpoints (the format OPT was trained in and OPT-175B is released in) into a
Hugging Face folder: `config.json` plus safetensors shards, loadable with `microscope.load(folder)`.

    microscope convert-metaseq /data/opt-175b/resharded /data/opt-175b-hf --max-shard-size 5GB

Accepted inputs (a folder or one file):
- model-parallel parts `*model_part-{i}.pt` (what metaseq's `reshard_fsdp` / `reshard_mp` write,
  e.g. `reshard-model_part-0.pt` ... `-7.pt` for OPT-175B), glued as Megatron split them:
  column-parallel weights (`qkv_proj`, `q/k/v_proj`, `fc1`, and the vocab-parallel `embed_tokens`)
  along dim 0, row-parallel weights (`out_proj`, `fc2`) along dim 1, everything else replicated;
- one consolidated file (`restored.pt`, `consolidated.pt`, ...), i.e. a single part.
Each part's fused `self_attn.qkv_proj` holds its rows in the order k, v, q (metaseq's
`ModelParallelMultiheadAttention` splits its local output that way).
Raw FSDP shards (`...-shard{j}.pt`, `flat_param` keys) must be unflattened first with metaseq's
`reshard_fsdp.py --unflatten-weights True`.

Memory stays bounded: parts are opened with `torch.load(weights_only=True, mmap=True)`, so tensors
are paged from disk only when read, and the output is planned from shapes alone and written one
safetensors shard at a time (at most `max_shard_size` bytes of glued tensors are held at once).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from transformers import OPTConfig

from microscope.errors import MetaseqCheckpointError, ModelNotFoundError
from microscope.models.family import SIZES

Rule = Literal["column", "row", "replicated", "qkv"]
QKV_ORDER = ("k", "v", "q")  # row blocks of each part's fused qkv_proj
PART_FILE = re.compile(r"model_part-(\d+)\.pt$")
FSDP_SHARD_FILE = re.compile(r"-shard\d+\.pt$")
IGNORED_KEYS = {"decoder.version"}  # a format-version scalar, not a weight
RENAMES = {"decoder.project_in_dim.": "decoder.project_in.", "decoder.project_out_dim.": "decoder.project_out.",
           "decoder.layer_norm.": "decoder.final_layer_norm."}
REQUIRED_KEYS = ("decoder.embed_tokens.weight", "decoder.embed_positions.weight", "decoder.layers.0.fc1.weight")
LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")
LAYER_RULES: dict[str, Rule] = {
    "self_attn.qkv_proj.weight": "qkv", "self_attn.qkv_proj.bias": "qkv",
    **{f"self_attn.{p}_proj.{w}": "column" for p in "qkv" for w in ("weight", "bias")},
    "fc1.weight": "column", "fc1.bias": "column",
    "self_attn.out_proj.weight": "row", "self_attn.out_proj.bias": "replicated",
    "fc2.weight": "row", "fc2.bias": "replicated",
    **{f"{ln}.{w}": "replicated" for ln in ("self_attn_layer_norm", "final_layer_norm") for w in ("weight", "bias")},
}
DECODER_RULES: dict[str, Rule] = {
    "decoder.embed_tokens.weight": "column",  # vocab-parallel: each part holds a block of rows
    "decoder.embed_positions.weight": "replicated",
    "decoder.project_in_dim.weight": "replicated", "decoder.project_out_dim.weight": "replicated",
    "decoder.layer_norm.weight": "replicated", "decoder.layer_norm.bias": "replicated",
}


@dataclass(frozen=True)
class Source:
    """Where one Hugging Face tensor comes from: a metaseq key and how its parts are glued."""

    key: str
    rule: Rule
    qkv_block: int = 0  # for rule "qkv": 0, 1, 2 = k, v, q


@dataclass
class ConversionReport:
    """What `convert_metaseq` wrote: output folder, config, shard files, and sizes in bytes."""

    out: Path
    config: OPTConfig
    parts: list[Path]
    shard_files: list[str]
    total_bytes: int
    largest_shard_bytes: int
    notes: list[str] = field(default_factory=list)


class _Inert:
    """Stands in for any non-tensor object pickled beside the weights (metaseq's `cfg`, old
    fairseq `args`): it accepts whatever the pickle passes and runs nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def load_part(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict of one metaseq part, memory-mapped (tensors read from disk on use).

    Loaded with `weights_only=True`: every global the pickle names outside torch's allow-list is
    replaced by an inert placeholder, so no code from the checkpoint is imported or run."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        placeholders = [(type(name.rsplit(".", 1)[-1], (_Inert,), {}), name) for name in unsafe]
        with torch.serialization.safe_globals(placeholders):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, ... for unreadable files
        raise MetaseqCheckpointError(f"cannot read {path} as a torch checkpoint ({exc}); metaseq parts are "
                                     "files written by torch.save (zip format)") from exc
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise MetaseqCheckpointError(f"{path} holds no state dict (expected a dict with a 'model' entry)")
    if any("flat_param" in k for k in state):
        raise MetaseqCheckpointError(
            f"{path} holds flattened FSDP shards; unflatten them first with metaseq: python -m "
            "metaseq.scripts.reshard_fsdp --input-glob-pattern '<dir>/checkpoint_last-model_part-0-shard*.pt' "
            "--output-shard-name '<out>/reshard-model_part-0.pt' --num-output-shards 1 "
            "--skip-optimizer-state True --unflatten-weights True (once per model part)")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise MetaseqCheckpointError(f"{path}: entries that are not tensors in the model state: {not_tensors[:5]}")
    return state


def find_parts(source: str | Path) -> list[Path]:
    """The checkpoint files of `source` in model-parallel order: a folder of `*model_part-{i}.pt`
    files, a folder with exactly one `.pt` file, or a path to one `.pt` file."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise ModelNotFoundError(f"no metaseq checkpoint at {source}: give a folder of *model_part-<i>.pt files "
                                 "or the path of one consolidated .pt file")
    files = sorted(source.glob("*.pt"))
    if any(FSDP_SHARD_FILE.search(f.name) for f in files):
        raise MetaseqCheckpointError(
            f"{source} holds raw FSDP shards (*-shard<j>.pt); unflatten each model part first with metaseq's "
            "reshard_fsdp.py --unflatten-weights True (see docs/scale.md), then convert the output folder")
    parts = {int(m.group(1)): f for f in files if (m := PART_FILE.search(f.name))}
    if parts:
        missing = sorted(set(range(max(parts) + 1)) - set(parts))
        if missing:
            raise ModelNotFoundError(f"model-parallel parts {missing} are missing in {source} (found parts "
                                     f"{sorted(parts)}); every part model_part-0 ... model_part-{max(parts)} is needed")
        prefixes = {PART_FILE.sub("", f.name) for f in parts.values()}
        if len(prefixes) > 1:
            raise MetaseqCheckpointError(f"{source} mixes checkpoints {sorted(prefixes)}; keep one set of parts per folder")
        return [parts[i] for i in range(len(parts))]
    if len(files) == 1:
        return files
    if not files:
        raise ModelNotFoundError(f"no .pt checkpoint files in {source}")
    raise MetaseqCheckpointError(f"{source} holds several .pt files {[f.name for f in files]} and no "
                                 "*model_part-<i>.pt set; pass the path of the one to convert")


def hf_sources(keys: list[str]) -> dict[str, Source]:
    """Map every tensor of the HF `OPTForCausalLM` state dict to its metaseq source, in the order
    embeddings, layers 0..L-1, final norm/projection. Unknown metaseq keys raise."""
    sources: dict[str, tuple[tuple[int, int], Source]] = {}
    unknown = []
    for key in keys:
        if key in IGNORED_KEYS or key == "decoder.output_projection.weight" or key.endswith("_float_tensor"):
            continue
        if m := LAYER_KEY.match(key):
            layer, rest = int(m.group(1)), m.group(2)
            if rest not in LAYER_RULES:
                unknown.append(key)
            elif LAYER_RULES[rest] == "qkv":
                for block, name in enumerate(QKV_ORDER):
                    hf = f"model.{key.replace('.qkv_proj.', f'.{name}_proj.')}"
                    sources[hf] = ((layer, 0), Source(key, "qkv", block))
            else:
                sources[f"model.{key}"] = ((layer, 0), Source(key, LAYER_RULES[rest]))
        elif key in DECODER_RULES:
            hf = key
            for old, new in RENAMES.items():
                hf = hf.replace(old, new)
            order = (1 << 30, 0) if "project_out" in hf or "final_layer_norm" in hf else (-1, 0)
            sources[f"model.{hf}"] = (order, Source(key, DECODER_RULES[key]))
        else:
            unknown.append(key)
    if unknown:
        raise MetaseqCheckpointError(f"keys that are not part of an OPT decoder: {unknown[:8]}"
                                     f"{' ...' if len(unknown) > 8 else ''}")
    return {name: src for name, (_, src) in sorted(sources.items(), key=lambda item: item[1][0])}


def glued_shape(parts: list[dict[str, torch.Tensor]], src: Source) -> torch.Size:
    """Shape of the glued tensor, from the parts' shapes alone (no data read)."""
    shape = list(parts[0][src.key].shape)
    if src.rule in ("column", "qkv"):
        shape[0] = shape[0] * len(parts) // (3 if src.rule == "qkv" else 1)
    elif src.rule == "row":
        shape[-1] *= len(parts)
    return torch.Size(shape)


def glue(parts: list[dict[str, torch.Tensor]], src: Source) -> torch.Tensor:
    """The full tensor of `src` from all model-parallel parts (checks replicated copies agree)."""
    pieces = [p[src.key] for p in parts]
    if src.rule == "replicated":
        for i, piece in enumerate(pieces[1:], start=1):
            if not torch.equal(piece, pieces[0]):
                raise MetaseqCheckpointError(
                    f"{src.key} should be identical in every model-parallel part but part {i} differs from part 0: "
                    "the parts come from different checkpoints or training steps")
        return pieces[0]
    if src.rule == "qkv":
        pieces = [piece.chunk(3, dim=0)[src.qkv_block] for piece in pieces]
    return torch.cat(pieces, dim=-1 if src.rule == "row" else 0)


def check_parts(parts: list[dict[str, torch.Tensor]], names: list[Path]) -> None:
    """Every part must hold the same keys with the same local shapes and dtypes."""
    reference = {k: (v.shape, v.dtype) for k, v in parts[0].items()}
    for path, part in zip(names[1:], parts[1:]):
        missing, extra = sorted(set(reference) - set(part)), sorted(set(part) - set(reference))
        if missing or extra:
            raise MetaseqCheckpointError(
                f"model-parallel parts disagree: {path.name} lacks {missing[:5]} and has extra {extra[:5]} "
                f"compared with {names[0].name}; all parts must come from one checkpoint")
        for k, (shape, dtype) in reference.items():
            if (part[k].shape, part[k].dtype) != (shape, dtype):
                raise MetaseqCheckpointError(
                    f"model-parallel parts disagree on {k}: {names[0].name} has {tuple(shape)} {dtype}, "
                    f"{path.name} has {tuple(part[k].shape)} {part[k].dtype}")


def infer_config(parts: list[dict[str, torch.Tensor]], heads: int | None, dtype: torch.dtype | None) -> OPTConfig:
    """The `OPTConfig` implied by the tensors' shapes. The head count is not visible in the shapes:
    it is `heads` when given, else that of the family size with the same width and depth."""
    p0, n_parts = parts[0], len(parts)
    missing = [k for k in REQUIRED_KEYS if k not in p0]
    if missing:
        raise MetaseqCheckpointError(f"not an OPT decoder checkpoint: {missing} missing")
    dtype = dtype or p0["decoder.embed_tokens.weight"].dtype
    layer_ids = {int(m.group(1)) for k in p0 if (m := LAYER_KEY.match(k))}
    if not layer_ids or layer_ids != set(range(len(layer_ids))):
        raise MetaseqCheckpointError(f"decoder layers are missing or not numbered 0..L-1 (found {sorted(layer_ids)})")
    vocab, d_embed = p0["decoder.embed_tokens.weight"].shape
    ffn_local, d_model = p0["decoder.layers.0.fc1.weight"].shape
    fused = "decoder.layers.0.self_attn.qkv_proj.weight" in p0
    q_rows = p0["decoder.layers.0.self_attn.qkv_proj.weight"].shape[0] // 3 if fused else \
        p0["decoder.layers.0.self_attn.q_proj.weight"].shape[0]
    if q_rows * n_parts != d_model:
        raise MetaseqCheckpointError(
            f"each part holds {q_rows} of the {d_model} attention rows, so {d_model // max(q_rows, 1)} "
            f"model-parallel parts are needed but {n_parts} were given")
    layers = len(layer_ids)
    if heads is None:
        same_shape = [s for s in SIZES.values() if (s.d_model, s.layers) == (d_model, layers)]
        if not same_shape:
            raise MetaseqCheckpointError(
                f"cannot tell the number of attention heads of a {layers}-layer, d_model={d_model} model "
                "(no OPT family size has that shape); pass it with --heads N")
        heads = same_shape[0].heads
    if d_model % heads or heads % n_parts:
        raise MetaseqCheckpointError(f"{heads} heads do not divide d_model={d_model} into {n_parts} equal parts")
    pre_ln = "decoder.layer_norm.weight" in p0  # metaseq builds the final norm only for pre-LN decoders
    return OPTConfig(
        vocab_size=vocab * n_parts, hidden_size=d_model, num_hidden_layers=layers, ffn_dim=ffn_local * n_parts,
        num_attention_heads=heads, word_embed_proj_dim=d_embed, do_layer_norm_before=pre_ln,
        max_position_embeddings=p0["decoder.embed_positions.weight"].shape[0] - 2,  # positions start at 2
        activation_function="relu", enable_bias=True, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        architectures=["OPTForCausalLM"], dtype=str(dtype).removeprefix("torch."),
    )


def check_tied_output(parts: list[dict[str, torch.Tensor]]) -> None:
    """metaseq ties the output projection to the token embedding; HF OPT assumes the same."""
    for i, part in enumerate(parts):
        out = part.get("decoder.output_projection.weight")
        if out is not None and not torch.equal(out, part["decoder.embed_tokens.weight"]):
            raise MetaseqCheckpointError(f"part {i}: decoder.output_projection.weight differs from "
                                         "decoder.embed_tokens.weight; untied OPT heads are not supported")


def convert_metaseq(source: str | Path, out: str | Path, heads: int | None = None,
                    dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB") -> ConversionReport:
    """Convert the metaseq checkpoint at `source` into an HF folder `out` (config.json and
    safetensors shards of at most `max_shard_size`, with an index when there are several).

    `dtype` casts the weights (default: keep the checkpoint's, fp16 for the released OPT)."""
    out = Path(out)
    paths = find_parts(source)
    parts = [load_part(p) for p in paths]
    check_parts(parts, paths)
    sources = hf_sources(list(parts[0]))
    check_tied_output(parts)
    config = infer_config(parts, heads, dtype)
    dtype = dtype or parts[0]["decoder.embed_tokens.weight"].dtype
    plan = {name: torch.empty(glued_shape(parts, src), dtype=dtype, device="meta") for name, src in sources.items()}
    split = split_torch_state_dict_into_shards(plan, max_shard_size=max_shard_size)

    out.mkdir(parents=True, exist_ok=True)
    largest = 0
    for filename, names in split.filename_to_tensors.items():
        shard = {name: glue(parts, sources[name]).to(dtype).contiguous() for name in names}
        largest = max(largest, sum(t.numel() * t.element_size() for t in shard.values()))
        save_file(shard, out / filename, metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    notes = ["tokenizer files are not part of a metaseq checkpoint: copy them from any facebook/opt-* "
             "folder (all sizes share the GPT-2 BPE tokenizer)"]
    return ConversionReport(out, config, paths, list(split.filename_to_tensors),
                            split.metadata["total_size"], largest, notes)
