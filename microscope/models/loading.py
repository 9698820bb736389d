"""`load_model(source)`: every way to get an OPT model and its tokenizer, offline (`microscope.load`
wraps them in a `Scope`).

Sources (see docs/loading.md):
- ``"organism"``: the built-in model organism, v3 (English, OPT's byte-level BPE), shipped in
  ``microscope/models/organism_v3/weights/``; the shipped organisms by name: ``"organism-v3"``
  (the same), ``"organism-v3-sibling"`` (OPT-350m's layout), ``"organism-v2"`` and
  ``"organism-v2-sibling"`` (the earlier 218-word organism and its sibling);
- a hub id (``"facebook/opt-1.3b"``): resolved from the local Hugging Face cache only;
- a local folder in HF format: single or sharded safetensors, or ``.bin`` pickles read with
  ``torch.load(weights_only=True)``; ``trust_remote_code`` is never used;
- an ``OPTForCausalLM`` instance: wrapped as is;
- ``"random:opt-125m"`` (any family size, "random:125m" too): the exact shapes with random weights,
  built on the meta device; ``device="meta"`` never allocates, any other device materialises them.

Placement goes through transformers/accelerate: ``device`` puts the whole model on one device,
``device_map`` ("auto", "balanced", "sequential" or an explicit ``{module: device}`` map with
"cpu"/"disk" entries), ``max_memory`` and ``offload_folder`` are passed to ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM, PreTrainedModel

from microscope.errors import CheckpointCorruptError, ModelNotFoundError, UnsupportedModelError
from microscope.models.family import SIZES, FamilySize, family_size, opt_config
from microscope.models.tokenizer import STANDIN_VOCAB_SIZE, standin_tokenizer

ORGANISM_DIR = Path(__file__).parent / "organism_v3" / "weights"   # "organism", the default
ORGANISMS = {"organism-v3": ORGANISM_DIR, "organism-v3-sibling": ORGANISM_DIR.parent / "sibling" / "weights",
             "organism-v2": Path(__file__).parent / "organism" / "weights",
             "organism-v2-sibling": Path(__file__).parent / "organism" / "sibling" / "weights"}
RANDOM_SEED = 0  # random: models are initialised from this seed (same device kind, same weights)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


class LoadInfo(Mapping):
    """Where a model came from: a read-only mapping with the keys
    source, kind (organism/hub/folder/instance/random), path, dtype, device_map,
    tokenizer (checkpoint/standin/given/none), tokenizer_is_standin and weights_hash.
    ``weights_hash`` ("sha256:...") is computed on first access: over the weight files' bytes for
    file sources (so resharding changes it), over the tensors for in-memory models, None on meta."""

    def __init__(self, fields: dict[str, Any], hash_weights: Callable[[], str | None]):
        self._fields = dict(fields)
        self._hash_weights = hash_weights

    def __getitem__(self, key: str) -> Any:
        if key == "weights_hash" and key not in self._fields:
            self._fields[key] = self._hash_weights()
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._fields
        if "weights_hash" not in self._fields:
            yield "weights_hash"

    def __len__(self) -> int:
        return len(self._fields) + ("weights_hash" not in self._fields)

    def __repr__(self) -> str:
        shown = {**self._fields, "weights_hash": self._fields.get("weights_hash", "<computed on access>")}
        return f"LoadInfo({shown})"


def load_model(source: str | os.PathLike | OPTForCausalLM, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, device_map: str | dict | None = None,
         max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None,
         tokenizer: Any = None) -> tuple[OPTForCausalLM, Any, LoadInfo]:
    """Load an OPT model from `source` (see the module docstring): (model, tokenizer, info).

    dtype: torch dtype or "fp32"/"fp16"/"bf16"; default: the checkpoint's own dtype for files,
    the instance's for instances, fp32 for random models. device: one device for the whole model
    ("cpu", "cuda:0", "meta" = shapes only). device_map/max_memory/offload_folder: accelerate
    placement for checkpoints (not with `device`). tokenizer: overrides the one found (or the
    GPT-2 stand-in used for random models and instances). `microscope.load` (scope.py) wraps the
    three in a `Scope` (``scope.source`` is ``info["source"]``)."""
    if device is not None and device_map is not None:
        raise UnsupportedModelError("give either device= (one device) or device_map= (several), not both")
    if (max_memory is not None or offload_folder is not None) and device_map is None:
        raise UnsupportedModelError("max_memory and offload_folder need a device_map, e.g. device_map='auto'")
    dtype = _parse_dtype(dtype)

    if isinstance(source, PreTrainedModel):
        model, tok, fields, hasher = _from_instance(source, device, dtype, device_map)
    elif not isinstance(source, (str, os.PathLike)):
        raise UnsupportedModelError(
            f"cannot load a {type(source).__name__}; give 'organism', a hub id, a folder, "
            "'random:<size>' or an OPTForCausalLM")
    elif str(source) == "organism" or str(source) in ORGANISMS:
        folder = ORGANISM_DIR if str(source) == "organism" else ORGANISMS[str(source)]
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(
                f"the model organism is not built yet (looked in {folder}); "
                "train it with `microscope organism train`")
        model, tok, fields, hasher = _from_folder(folder, device, dtype, device_map, max_memory,
                                                  offload_folder)
        fields["kind"] = "organism"
    elif str(source).startswith("random:"):
        model, tok, fields, hasher = _from_random(family_size(str(source)[len("random:"):]), device,
                                                  dtype, device_map)
    elif Path(source).expanduser().is_dir():
        model, tok, fields, hasher = _from_folder(Path(source).expanduser().resolve(), device, dtype,
                                                  device_map, max_memory, offload_folder)
    elif HUB_ID.match(str(source)):
        model, tok, fields, hasher = _from_folder(_hub_snapshot(str(source)), device, dtype, device_map,
                                                  max_memory, offload_folder)
        fields["kind"] = "hub"
    else:
        raise ModelNotFoundError(
            f"no model at {source!r}: not a folder ({Path(source).expanduser().resolve()} does not exist), "
            f"not a hub id like 'facebook/opt-1.3b', not 'organism' ({', '.join(ORGANISMS)}) or 'random:<size>' "
            f"(sizes: {', '.join(SIZES)})")

    if tokenizer is not None:
        tok, fields["tokenizer"], fields["tokenizer_is_standin"] = tokenizer, "given", False
    label = fields.pop("source", None) or str(source)
    fields = {"source": label, **fields}
    fields.update(dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                  device_map=getattr(model, "hf_device_map", None))
    return model, tok, LoadInfo(fields, hasher)


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower().removeprefix("torch.") in DTYPES:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    raise UnsupportedModelError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16 or a torch.dtype")


def _hub_cache_dir() -> Path:
    """The hub cache in use: $HF_HUB_CACHE read now (so setting it after import works), else
    huggingface_hub's default (~/.cache/huggingface/hub or $HF_HOME/hub)."""
    from huggingface_hub import constants
    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


def _hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot folder of `repo_id` (revision "main"); never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = _hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
        repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
        raise ModelNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache (looked in {repo_dir}); models are "
            f"never downloaded at run time. Download it once on a machine with network access:\n"
            f"    hf download {repo_id}\n"
            f"(older huggingface_hub: `huggingface-cli download {repo_id}`), or point HF_HUB_CACHE at "
            f"the cache that holds it, or pass the model's folder to load()") from err


def _weight_files(folder: Path) -> list[Path]:
    """The files holding the weights: safetensors if any, else .bin pickles."""
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def _check_weight_files(folder: Path, files: list[Path]) -> None:
    """Refuse, before any weight is read, a checkpoint with a shard missing or a safetensors file
    truncated or garbled (seen from the shard index and each file's header alone)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        missing = sorted(set(json.loads(index.read_text())["weight_map"].values()) - {f.name for f in files})
        if missing:
            raise CheckpointCorruptError(f"{folder} lacks {', '.join(missing)}, named in {index.name}; "
                                         "re-download the checkpoint or re-save it with save_pretrained")
    for file in files:
        problem = _safetensors_problem(file) if file.suffix == ".safetensors" else None
        if problem:
            raise CheckpointCorruptError(f"{file} is truncated or corrupt ({problem}); re-download the "
                                         "checkpoint or re-save it with save_pretrained")


def _safetensors_problem(file: Path) -> str | None:
    """Why `file` is not a whole safetensors file, or None. The format: an 8-byte little-endian
    header length, a JSON header giving each tensor's byte range, then the tensors' bytes."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if size < 8 or length > size - 8:
            return f"its header claims {length:,} bytes but the file has {size:,}"
        try:
            header = json.loads(fh.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, AttributeError, KeyError, IndexError, TypeError):
            return "its header is not a safetensors header"
    if 8 + length + end > size:
        return f"its tensors end at byte {8 + length + end:,} but the file has {size:,}"
    return None


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def _hash_tensors(model: torch.nn.Module) -> str | None:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order; None on meta."""
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):
        return None
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        digest.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _from_folder(folder: Path, device, dtype, device_map, max_memory, offload_folder):
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "opt":
        raise UnsupportedModelError(f"{folder} holds a {model_type!r} model; only OPT models are supported")
    files = _weight_files(folder)
    if str(device) == "meta":  # shapes only: the config is enough
        model = _on_meta(OPTConfig.from_pretrained(folder), dtype or torch.float32)
    elif not files:
        raise ModelNotFoundError(f"{folder} has a config.json but no *.safetensors or *.bin weight files")
    else:
        _check_weight_files(folder, files)
        try:
            model = OPTForCausalLM.from_pretrained(
                folder, dtype=dtype or "auto", device_map=device_map if device_map is not None else device,
                max_memory=max_memory, offload_folder=offload_folder, local_files_only=True,
                weights_only=True, trust_remote_code=False).eval()
        except pickle.UnpicklingError as err:
            raise UnsupportedModelError(
                f"refused to read the .bin weights in {folder}: they hold objects other than tensors, "
                "and pickles are only read with torch.load(weights_only=True). Convert the checkpoint "
                "to safetensors on a machine where you trust its origin.") from err
        except SafetensorError as err:   # what the header check cannot see: garbled tensor data
            raise CheckpointCorruptError(
                f"cannot read the weights in {folder} ({err}): a file is corrupt; re-download the "
                "checkpoint or re-save it with save_pretrained") from err
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        tok, kind = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False), "checkpoint"
    else:
        tok, kind = _standin_for(model.config)
    fields = dict(kind="folder", path=str(folder), tokenizer=kind, tokenizer_is_standin=kind == "standin")
    return model, tok, fields, lambda: _hash_files(files) if files else None


def _from_instance(model: PreTrainedModel, device, dtype, device_map):
    if not isinstance(model, OPTForCausalLM):
        raise UnsupportedModelError(f"expected an OPTForCausalLM, got a {type(model).__name__}")
    if device_map is not None:
        raise UnsupportedModelError(
            "device_map works on checkpoints: save the model with model.save_pretrained(folder) "
            "and load(folder, device_map=...)")
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    tok, kind = _standin_for(model.config)
    name = model.config.name_or_path or "OPTForCausalLM"
    fields = dict(kind="instance", source=f"instance:{name}", path=None, tokenizer=kind,
                  tokenizer_is_standin=kind == "standin")
    return model, tok, fields, lambda: _hash_tensors(model)


def _from_random(size: FamilySize, device, dtype, device_map):
    if device_map is not None:
        raise UnsupportedModelError(
            "random: models take device= (one device, or 'meta' for shapes only), not device_map")
    config, dtype, device = opt_config(size), dtype or torch.float32, torch.device(device or "cpu")
    model = _on_meta(config, dtype)
    if device.type != "meta":  # materialise: allocate once on the device, then OPT's normal init
        _check_fits(size, dtype, device)
        model.to_empty(device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(RANDOM_SEED)
            model.initialize_weights()
        model.tie_weights()  # to_empty gave lm_head its own storage
    tok, kind = _standin_for(config)
    fields = dict(kind="random", source=f"random:{size.name}", path=None, tokenizer=kind,
                  tokenizer_is_standin=kind == "standin")
    return model, tok, fields, lambda: _hash_tensors(model)


def _on_meta(config: OPTConfig, dtype: torch.dtype) -> OPTForCausalLM:
    """The model with every tensor on the meta device: shapes and dtypes, no memory."""
    with torch.device("meta"):
        return OPTForCausalLM._from_config(config, dtype=dtype).eval()


def _check_fits(size: FamilySize, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse to materialise weights that cannot fit, with a message that says what to do."""
    need = size.params * torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        import psutil
        free = psutil.virtual_memory().available
    else:
        return
    if need > 0.9 * free:
        raise UnsupportedModelError(
            f"random:{size.name} needs {need / 1e9:.1f} GB in {dtype} but {device} has "
            f"{free / 1e9:.1f} GB free; use device='meta' for shapes only, a smaller size, or fp16/bf16")


def _standin_for(config: OPTConfig):
    """The GPT-2 stand-in tokenizer when the model's vocabulary can hold its ids, else none."""
    if config.vocab_size >= STANDIN_VOCAB_SIZE:
        return standin_tokenizer(), "standin"
    return None, "none"
