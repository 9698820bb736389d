"""The budget of an activation dump, estimated before running it (`microscope plan`): GPU memory
per model replica, GPUs needed, store size per dtype and positions mode, expected time, energy and
CO2e. (The store plan, what a dump writes where, is `planning.make_plan`.)

    >>> from microscope.activations.budget import estimate_budget
    >>> b = estimate_budget("opt-66b", hooks="blocks.*.hook_resid_post", tokens=10_000_000)
    >>> b.gpus_per_replica, round(b.store_gb)
    (2, 11797)

Energy follows the OPT paper's carbon accounting (GPU-hours x power x PUE x grid intensity): it is
an estimate from nominal board power, not a measurement; `microscope.activations.energy.EnergyMeter` measures
what a GPU dump really used (NVML) and the store records it. Every assumption is a field of
`BudgetInputs`, printed with the budget. Sizes in GB are 1e9 bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from microscope.errors import BudgetInputError
from microscope.models.family import BYTES_PER_PARAM, SIZES, VOCAB_ROWS, FamilySize, family_size, opt_config
from microscope.names import every_layer, feature_shape, is_pattern, model_names, resolve

PositionsMode = Literal["all", "last"]   # every position stored, or each prompt's last
STORE_DTYPES = ("fp16", "bf16", "fp32")
INDEX_BYTES_PER_ROW = 12  # token_id, prompt_id, position: int32 each, on the store's flat token axis
GPU_OVERHEAD_GB = 1.0  # CUDA context and allocator slack on every GPU
PUBLISHED = {"opt-125m": 125e6, "opt-350m": 350e6, "opt-1.3b": 1.3e9, "opt-2.7b": 2.7e9, "opt-6.7b": 6.7e9,
             "opt-13b": 13e9, "opt-30b": 30e9, "opt-66b": 66e9, "opt-175b": 175e9}  # the sizes' names


@dataclass(frozen=True)
class BudgetInputs:
    """What a dump does and what it runs on. Defaults: an 80 GB A100-class GPU (400 W board
    power, 125 TFLOP/s achieved), a data centre PUE of 1.1 and a grid of 429 gCO2e/kWh."""

    hooks: str = every_layer("resid_post")  # comma-separated names or glob patterns
    tokens: int = 10_000_000  # prompt tokens pushed through the model
    dtype: str = "fp16"  # store dtype: fp16, bf16, fp32
    positions: PositionsMode = "all"  # store every position or only each prompt's last
    model_dtype: str = "fp16"  # weights and activations on the GPU
    seq_len: int = 2048  # tokens per prompt
    batch_size: int = 8  # prompts per forward pass
    gpu_memory_gb: float = 80.0
    throughput: float | None = None  # measured tokens/s of one replica; estimated from FLOPs when None
    gpu_tflops: float = 125.0  # achieved dense TFLOP/s per GPU, used only when throughput is None
    write_gbps: float = 1.3  # durable write bandwidth of the store's file system (fsync'd np.save here)
    replicas: int = 1  # data-parallel model replicas (torchrun ranks / gpus-per-model)
    gpu_power_w: float = 400.0
    pue: float = 1.1
    grid_intensity: float = 429.0  # gCO2e per kWh


@dataclass(frozen=True)
class Budget:
    """The numbers of one budget (GB = 1e9 bytes, hours of wall time)."""

    size: str
    params: int
    inputs: BudgetInputs
    hook_names: list[str]
    weights_gb: float
    activations_gb: float  # working set of one batch: layer activations, logits, attention scores, staging
    replica_gb: float  # weights + activations + per-GPU overhead
    gpus_per_replica: int
    gpus: int
    store_gb_by_mode: dict[str, dict[str, float]]  # {dtype: {positions: GB}}
    tokens_per_s: float  # one replica
    throughput_source: str  # "given" or "estimated"
    compute_hours: float
    write_hours: float
    hours: float  # max of the two: the writer pool overlaps writing with compute
    gpu_hours: float
    energy_kwh: float
    co2e_kg: float
    notes: list[str] = field(default_factory=list)

    @property
    def store_gb(self) -> float:
        """Store size for the chosen dtype and positions mode."""
        return self.store_gb_by_mode[self.inputs.dtype][self.inputs.positions]


def hook_widths(size: FamilySize) -> dict[str, int]:
    """Every hook name of a family size, in model order, and its width per stored row (elements).
    Attention patterns have no fixed width; they get 0 here and are sized per prompt by
    `pattern_elements`."""
    config = opt_config(size)
    return {name: 0 if is_pattern(name) else math.prod(feature_shape(name, config))
            for name in model_names(size.layers, final_norm=not size.post_ln)}


def pattern_elements(size: FamilySize, seq_len: int, positions: PositionsMode) -> int:
    """Elements one layer's attention pattern stores per prompt: the packed causal lower triangle
    (heads x T(T+1)/2), or the last query's row (heads x T)."""
    return size.heads * (seq_len * (seq_len + 1) // 2 if positions == "all" else seq_len)


def resolve_hooks(size: FamilySize, hooks: str) -> list[str]:
    """The hook names selected by comma-separated names or glob patterns, in model order."""
    return resolve(hooks, list(hook_widths(size)), where=size.name)


def store_bytes(size: FamilySize, hook_names: list[str], inputs: BudgetInputs, dtype: str,
                positions: PositionsMode) -> int:
    """Uncompressed bytes of the store: activations plus the index columns (fp16 barely
    compresses; bf16 with zstd gains 1.27-1.41x, so this is the upper bound)."""
    widths = hook_widths(size)
    prompts = math.ceil(inputs.tokens / inputs.seq_len)
    rows = inputs.tokens if positions == "all" else prompts
    row_elements = sum(widths[n] for n in hook_names)
    patterns = sum(is_pattern(n) for n in hook_names)
    elements = rows * row_elements + prompts * patterns * pattern_elements(size, inputs.seq_len, positions)
    return elements * BYTES_PER_PARAM[dtype] + rows * INDEX_BYTES_PER_ROW


def activation_bytes(size: FamilySize, hook_names: list[str], inputs: BudgetInputs) -> int:
    """Peak working memory of one forward pass beyond the weights: one layer's activations
    (residual, normed input, q, k, v, attention output: 6 x d_model; fc1 and ReLU outputs:
    2 x ffn), the logits, eager attention scores in fp32 for the layers whose patterns are
    captured (every other layer keeps the fused kernel, O(T) memory), and the staging buffers."""
    model_bytes = BYTES_PER_PARAM[inputs.model_dtype]
    batch_tokens = inputs.batch_size * inputs.seq_len
    layer = batch_tokens * (6 * size.d_model + 2 * size.ffn) * model_bytes
    logits = batch_tokens * VOCAB_ROWS * model_bytes
    eager_scores = (inputs.batch_size * size.heads * inputs.seq_len ** 2 * 4
                    if any(is_pattern(n) for n in hook_names) else 0)
    staged = store_bytes(size, hook_names, replace(inputs, tokens=batch_tokens), inputs.dtype, inputs.positions)
    return layer + logits + eager_scores + staged


def estimate_budget(model: str, **inputs) -> Budget:
    """The budget of a dump of `model` (a family size: "opt-66b", "66b", "facebook/opt-66b", "random:opt-66b")
    with the `BudgetInputs` fields given as keywords."""
    size = family_size(model.removeprefix("random:"))
    args = BudgetInputs(**inputs)
    if args.dtype not in STORE_DTYPES or args.model_dtype not in BYTES_PER_PARAM:
        raise BudgetInputError(f"dtype must be one of {STORE_DTYPES} (store) and model_dtype one of "
                               f"{list(BYTES_PER_PARAM)}")
    if args.positions not in ("all", "last"):
        raise BudgetInputError(f"positions must be 'all' or 'last', not {args.positions!r}")
    if min(args.tokens, args.seq_len, args.batch_size, args.replicas) < 1 or args.gpu_memory_gb <= GPU_OVERHEAD_GB:
        raise BudgetInputError("tokens, seq_len, batch_size and replicas must be positive and the GPU larger than "
                                f"its {GPU_OVERHEAD_GB} GB overhead")
    names = resolve_hooks(size, args.hooks)

    weights = size.weight_bytes(args.model_dtype)
    activations = activation_bytes(size, names, args)
    gpus_per_replica = math.ceil((weights + activations) / ((args.gpu_memory_gb - GPU_OVERHEAD_GB) * 1e9))
    replica = weights + activations + gpus_per_replica * GPU_OVERHEAD_GB * 1e9
    gpus = gpus_per_replica * args.replicas

    by_mode = {dt: {pos: store_bytes(size, names, args, dt, pos) / 1e9 for pos in ("all", "last")}
               for dt in STORE_DTYPES}
    # A device_map replica runs its GPUs one after another, so one GPU's FLOP rate sets its speed.
    tokens_per_s = args.throughput or args.gpu_tflops * 1e12 / (2 * size.params)
    compute_h = args.tokens / (tokens_per_s * args.replicas) / 3600
    write_h = by_mode[args.dtype][args.positions] / args.write_gbps / 3600
    hours = max(compute_h, write_h)
    gpu_hours = hours * gpus
    energy_kwh = gpu_hours * args.gpu_power_w / 1000 * args.pue
    notes = []
    if write_h > compute_h:
        notes.append(f"writing the store ({write_h:.2f} h at {args.write_gbps} GB/s) takes longer than the "
                     f"forward passes ({compute_h:.2f} h): fewer hooks, positions='last' or a faster file system help")
    return Budget(size.name, size.params, args, names, weights / 1e9, activations / 1e9, replica / 1e9,
                gpus_per_replica, gpus, by_mode, tokens_per_s, "given" if args.throughput else "estimated",
                compute_h, write_h, hours, gpu_hours, energy_kwh, energy_kwh * args.grid_intensity / 1000, notes)


def estimate_every_size(**inputs) -> list[Budget]:
    """One budget per family size, same inputs."""
    return [estimate_budget(name, **inputs) for name in SIZES]


TABLE_COLUMNS = ["size", "params", "vs name", "weights GB", "GPU GB/replica", "GPUs", "store GB",
                 "tok/s", "hours", "kWh", "kg CO2e"]


def table_rows(budgets: list[Budget]) -> list[list[str]]:
    """Rows of the family table, formatted."""
    return [[p.size, f"{p.params:,}", f"{p.params / PUBLISHED[p.size] - 1:+.1%}", f"{p.weights_gb:,.1f}",
             f"{p.replica_gb:,.1f}", str(p.gpus), f"{p.store_gb:,.0f}", f"{p.tokens_per_s:,.0f}",
             f"{p.hours:,.2f}", f"{p.energy_kwh:,.1f}", f"{p.co2e_kg:,.1f}"] for p in budgets]


def markdown_table(budgets: list[Budget]) -> str:
    """The budgets as a Markdown table, followed by the inputs they share."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(budgets)]
    lines += ["", "Inputs: " + ", ".join(f"{k}={v}" for k, v in asdict(budgets[0].inputs).items())]
    return "\n".join(lines)


def describe(p: Budget) -> list[tuple[str, str]]:
    """One budget as (label, value) lines for the terminal."""
    a = p.inputs
    store = "; ".join(f"{dt}: all {v['all']:,.1f} / last {v['last']:,.2f}" for dt, v in p.store_gb_by_mode.items())
    return [
        ("model", f"{p.size}: {p.params:,} parameters ({p.params / PUBLISHED[p.size] - 1:+.1%} vs its name)"),
        ("hooks", f"{len(p.hook_names)} ({a.hooks})"),
        ("weights", f"{p.weights_gb:,.1f} GB in {a.model_dtype}"),
        ("activations", f"{p.activations_gb:,.2f} GB per batch of {a.batch_size} x {a.seq_len} tokens"),
        ("GPU memory per replica", f"{p.replica_gb:,.1f} GB -> {p.gpus_per_replica} x {a.gpu_memory_gb:g} GB GPU(s)"),
        ("GPUs", f"{p.gpus} ({a.replicas} replica(s))"),
        ("store", f"{p.store_gb:,.1f} GB ({a.dtype}, positions={a.positions}, {a.tokens:,} tokens)"),
        ("store, every mode (GB)", store),
        ("throughput", f"{p.tokens_per_s:,.0f} tokens/s per replica ({p.throughput_source})"),
        ("time", f"{p.hours:,.2f} h (compute {p.compute_hours:,.2f} h, writing {p.write_hours:,.2f} h)"),
        ("energy", f"{p.energy_kwh:,.1f} kWh ({p.gpu_hours:,.1f} GPU-h x {a.gpu_power_w:g} W x PUE {a.pue:g})"),
        ("CO2e", f"{p.co2e_kg:,.1f} kg at {a.grid_intensity:g} gCO2e/kWh"),
        *[("note", n) for n in p.notes],
    ]


def parse_count(text: str) -> int:
    """'10M' -> 10_000_000; suffixes K, M, B (1e9), T; plain integers pass through."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    text = text.strip().replace("_", "").replace(",", "")
    try:
        if text[-1:].upper() in scale:
            return int(float(text[:-1]) * scale[text[-1].upper()])
        return int(float(text))
    except ValueError:
        raise BudgetInputError(f"cannot read {text!r} as a count; write e.g. 10M, 2.5B or 1000000") from None
