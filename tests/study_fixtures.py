"""What the study tests share: the shipped organism and its sibling (weights and card), and a
random-initialisation model of the organism's shape with a seed outside the studies' null (0-4).

A study reads only the weights; the card (``ground_truth.json``, measured by the organism's own
code on the plain HF model) is what the tests compare the study with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

import microscope as ms
from microscope.scope import Scope

ORGANISM = Path(ms.__file__).parent / "models" / "organism"
SIBLING = ORGANISM / "sibling"
CONTROL_SEED = 11   # not among the random-init null's seeds (0-4)

needs_organism = pytest.mark.skipif(not (ORGANISM / "weights" / "config.json").exists(),
                                    reason="the organism is not built (microscope organism train)")


def card(folder: Path = ORGANISM) -> dict:
    return json.loads((folder / "ground_truth.json").read_text())


def load(folder: Path = ORGANISM) -> Scope:
    return ms.load(str(folder / "weights"))


def random_organism(seed: int = CONTROL_SEED) -> Scope:
    """The organism's shape and tokenizer with random (HF-initialised) weights."""
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig.from_pretrained(ORGANISM / "weights")).eval()
    return Scope(model, AutoTokenizer.from_pretrained(ORGANISM / "weights"), source=f"random organism (seed {seed})")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the organism's matrices are tiny, and on a shared 2-core machine a second
    spinning thread made these tests 8x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
