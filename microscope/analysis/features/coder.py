"""The dictionary model: eai-sparsify's `SparseCoder` (TopK SAE or transcoder) and its on-disk format.

    d = load_dictionary("results/features/dict")     # a folder written by `train_dictionary`
    acts = d.encode_dense(x)                          # [N, d_in] -> [N, n_latents] (zeros off the top k)
    y_hat = d.coder(x).sae_out                        # sparsify's forward

A dictionary folder holds sparsify's own files (``cfg.json``, ``sae.safetensors``: loadable with
``sparsify.SparseCoder.load_from_disk``) plus ``provenance.json`` (store, hook, target hook,
settings, seed, metrics). sparsify picks a Triton decoder when Triton is installed, and that kernel
fails without a GPU; on a machine without CUDA we select its eager decoder
(``SPARSIFY_DISABLE_TRITON=1``) before it is imported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from microscope.errors import AnalysisInputError

PROVENANCE_FILE = "provenance.json"


def sparsify():
    """The `sparsify` module, imported with its eager decoder where there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    import sparsify as module
    return module


def new_coder(d_in: int, *, n_latents: int, k: int, transcode: bool = False, seed: int = 0):
    """A fresh float32 TopK `SparseCoder` d_in -> n_latents, initialised under `torch.manual_seed(seed)`."""
    sp = sparsify()
    if not 0 < k <= n_latents:
        raise AnalysisInputError(f"k={k} must be between 1 and the number of latents ({n_latents})")
    config = sp.SparseCoderConfig(activation="topk", num_latents=n_latents, k=k, transcode=transcode)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return sp.SparseCoder(d_in, config, device="cpu", dtype=torch.float32)


@dataclass
class Dictionary:
    """A trained coder with what it reads and writes: `hook` (input) and `target` (output hook;
    the same as `hook` for an SAE, the MLP output hook for a transcoder)."""

    coder: torch.nn.Module
    hook: str
    target: str
    provenance: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_latents(self) -> int:
        return self.coder.num_latents

    @property
    def is_transcoder(self) -> bool:
        return bool(self.coder.cfg.transcode)

    @property
    def decoder(self) -> torch.Tensor:
        """Decoder directions [n_latents, d_out] (unit norm for an SAE)."""
        return self.coder.W_dec.detach()

    @torch.no_grad()
    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., n_latents] of inputs [..., d_in] (zero outside the top k)."""
        flat = x.reshape(-1, x.shape[-1]).to(self.coder.dtype)
        acts, idx, _ = self.coder.encode(flat)
        dense = flat.new_zeros(len(flat), self.n_latents).scatter_(1, idx, acts)
        return dense.reshape(*x.shape[:-1], self.n_latents)

    @torch.no_grad()
    def decode_dense(self, latents: torch.Tensor) -> torch.Tensor:
        """Outputs [..., d_out] of dense latent activations [..., n_latents] (bias included)."""
        return latents.to(self.coder.dtype) @ self.coder.W_dec + self.coder.b_dec

    def save(self, path: str | Path) -> Path:
        """Write sparsify's files and provenance.json into `path`."""
        path = Path(path)
        self.coder.save_to_disk(path)
        record = {**self.provenance, "hook": self.hook, "target": self.target}
        (path / PROVENANCE_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
        self.path = path
        return path

    def __repr__(self) -> str:
        kind = f"transcoder {self.hook} -> {self.target}" if self.is_transcoder else f"SAE on {self.hook}"
        return f"<Dictionary {kind}: {self.coder.d_in} -> {self.n_latents} latents, k={self.coder.cfg.k}>"


def load_dictionary(path: str | Path) -> Dictionary:
    """A dictionary folder written by `train_dictionary` (or `Dictionary.save`)."""
    path = Path(path)
    if not (path / "cfg.json").is_file():
        raise AnalysisInputError(f"no dictionary at {path} (no cfg.json); train one with "
                                 "`microscope features train`")
    coder = sparsify().SparseCoder.load_from_disk(path)
    record = json.loads((path / PROVENANCE_FILE).read_text()) if (path / PROVENANCE_FILE).is_file() else {}
    hook = record.get("hook", "")
    return Dictionary(coder.eval(), hook, record.get("target", hook), record, path)
