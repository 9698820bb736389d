"""Plain-HF re-measurements for the layer claims of the instructions and arithmetic studies:
the logit lens from ``output_hidden_states`` and ``lm_head``, random-init models built with
`OPTForCausalLM(config)`. Nothing here calls the analysis code under test."""

from __future__ import annotations

import pytest
import torch
from study_fixtures import ORGANISM, SIBLING, card, load
from transformers import OPTConfig, OPTForCausalLM

FOLDERS = {"organism": ORGANISM, "sibling": SIBLING}


def load_model(name: str):
    """(scope, card) of the organism or its sibling; skips when that model is not shipped."""
    folder = FOLDERS[name]
    if not (folder / "weights" / "config.json").exists() or not (folder / "ground_truth.json").exists():
        pytest.skip(f"{name} is not shipped ({folder})")
    return load(folder), card(folder)


@torch.no_grad()
def last_token_logit_lens(model: OPTForCausalLM, tokenizer, texts: list[str]) -> torch.Tensor:
    """[point, batch, vocab]: embeddings and every block's output at each text's last token, each
    through the final LayerNorm and lm_head (HF's last hidden state already has the final norm)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    hidden = model(**enc, output_hidden_states=True).hidden_states
    rows, last = torch.arange(len(texts)), enc["attention_mask"].sum(1) - 1
    norm = model.model.decoder.final_layer_norm
    return torch.stack([model.lm_head(h[rows, last] if i == len(hidden) - 1 else norm(h[rows, last]))
                        for i, h in enumerate(hidden)]).float()


def random_init(model: OPTForCausalLM, seed: int) -> OPTForCausalLM:
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig.from_dict(model.config.to_dict())).eval()


def first_from(values: torch.Tensor, null_max: torch.Tensor, floor: float) -> int | None:
    """First point from which values >= floor and > null_max at every later point."""
    ok = [bool(v >= floor and v > n) for v, n in zip(values, null_max)]
    if not ok[-1]:
        return None
    first = len(ok) - 1
    while first > 0 and ok[first - 1]:
        first -= 1
    return first


def point_name(index: int | None) -> str | None:
    return None if index is None else ("embed" if index == 0 else f"L{index - 1}")

