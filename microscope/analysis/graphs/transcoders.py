"""One transcoder per MLP, trained from one store: each block's MLP input hook to its output hook.

    tcs = train_transcoders("activations/graphs.zarr", "results/transcoders", steps=300, k=16)
    tcs = load_transcoders("results/transcoders")        # the folder written above
    tcs[2]                                              # the `Dictionary` of block 2's MLP

A transcoder of block l reads ``blocks.l.hook_resid_mid`` and predicts ``blocks.l.hook_mlp_out``
(`mlp_hooks`). In pre-LN OPT that input is the stream the MLP's own LayerNorm reads, so the
transcoder stands for LayerNorm and MLP together; in post-LN OPT (350m) it is the MLP's input
itself (the attention LayerNorm's output). The coder is eai-sparsify's `SparseCoder` (TopK),
trained by `features.train.train_dictionary`, one folder per block (``OUT/layer_<l>``), each
resumable on its own. The store must hold both hooks of every block trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from microscope.activations.reader import ActivationStore, open_store
from microscope.analysis.features.coder import Dictionary, load_dictionary
from microscope.analysis.features.train import TrainSettings, train_dictionary
from microscope.analysis.progress import Progress, counted
from microscope.errors import AnalysisInputError
from microscope.names import act_name, every_layer, parse

LAYER_FOLDER = "layer_{}"


def mlp_hooks(layer: int) -> tuple[str, str]:
    """(input hook, output hook) of block `layer`'s transcoder: ``hook_resid_mid`` -> ``hook_mlp_out``."""
    return act_name("resid_mid", layer), act_name("mlp_out", layer)


def store_layers(store: ActivationStore) -> list[int]:
    """The blocks whose MLP input and output hooks `store` both holds, in order."""
    held = set(store.hooks)
    layers = sorted({parse(h).layer for h in held if parse(h).layer is not None})
    return [layer for layer in layers if set(mlp_hooks(layer)) <= held]


@dataclass
class Transcoders:
    """One transcoder per block, in block order (`by_layer[l]` replaces block l's MLP)."""

    by_layer: list[Dictionary]

    def __len__(self) -> int:
        return len(self.by_layer)

    def __getitem__(self, layer: int) -> Dictionary:
        return self.by_layer[layer]

    @property
    def scan(self) -> list[str]:
        """Where each transcoder came from (its folder, else its hooks): circuit-tracer's transcoder list."""
        return [str(d.path) if d.path is not None else f"{d.hook}->{d.target}" for d in self.by_layer]

    def check_fits(self, model) -> None:
        """Raise `AnalysisInputError` unless there is one transcoder per block of the HF `model`,
        each reading and writing that block's MLP hooks at the model's width."""
        n_layers, width = model.config.num_hidden_layers, model.config.hidden_size
        if len(self) != n_layers:
            raise AnalysisInputError(f"{len(self)} transcoders for a model of {n_layers} blocks: train one per "
                                     "block (train_transcoders over a store holding every block's "
                                     "hook_resid_mid and hook_mlp_out)")
        for layer, d in enumerate(self.by_layer):
            if (d.hook, d.target) != mlp_hooks(layer) or not d.is_transcoder:
                raise AnalysisInputError(f"transcoder {layer} maps {d.hook} -> {d.target}; block {layer} needs "
                                         f"{' -> '.join(mlp_hooks(layer))}")
            if d.coder.d_in != width or d.decoder.shape[1] != width:
                raise AnalysisInputError(f"transcoder {layer} has width {d.coder.d_in}; this model's blocks "
                                         f"have width {width}: train it on this model's store")
            if getattr(d.coder, "W_skip", None) is not None:
                raise AnalysisInputError(f"transcoder {layer} has a skip connection; the replacement model "
                                         "takes TopK transcoders without one")


def train_transcoders(store: ActivationStore | str, out: str | Path, *, layers: Sequence[int] | None = None,
                      settings: TrainSettings | None = None, resume: bool = True,
                      progress: Progress | None = None, command_line: str | None = None,
                      **changes) -> Transcoders:
    """Train block l's transcoder (`mlp_hooks`) into ``out/layer_<l>`` for every l of `layers`
    (default: every block the store holds both hooks of). `settings` and `changes` as for
    `train_dictionary` (``steps=300, k=16, expansion_factor=8``); a finished folder is loaded, not
    retrained, unless ``resume=False``."""
    if not isinstance(store, ActivationStore):
        store = open_store(store)
    held = store_layers(store)
    layers = held if layers is None else list(layers)
    missing = [layer for layer in layers if layer not in held]
    if not layers or missing:
        need = ", ".join(h for layer in (missing or [0]) for h in mlp_hooks(layer))
        raise AnalysisInputError(f"the store {store.path} lacks {need}: dump every block's MLP hooks, e.g. "
                                 f"--hooks '{every_layer('resid_mid')},{every_layer('mlp_out')}'")
    settings = (settings or TrainSettings()).but(**changes)
    trained = []
    for layer in counted(layers, len(layers), "transcoders, one per block", progress):
        source, target = mlp_hooks(layer)
        trained.append(train_dictionary(store, source, Path(out) / LAYER_FOLDER.format(layer), transcode_to=target,
                                        settings=settings, resume=resume, command_line=command_line))
    return Transcoders(trained)


def load_transcoders(path: str | Path) -> Transcoders:
    """The transcoders `train_transcoders` wrote under `path` (``layer_0``, ``layer_1``, ...)."""
    path = Path(path)
    prefix = LAYER_FOLDER.format("")
    found = {int(p.name.removeprefix(prefix)): p for p in path.glob(LAYER_FOLDER.format("*"))
             if p.name.removeprefix(prefix).isdigit()}
    if not found or sorted(found) != list(range(len(found))):
        raise AnalysisInputError(f"no transcoders layer_0 .. layer_N under {path} (found {sorted(found)}); "
                                 "write them with `microscope graph transcoders STORE --out DIR`")
    return Transcoders([load_dictionary(found[layer]) for layer in range(len(found))])
