"""Training organism v3: the shared deterministic loop (:mod:`microscope.models.organism.train`)
fed with v3's BPE tokenizer and its English corpus.

    from microscope.models.organism_v3.train import v3_config, train_v3
    model, tokenizer, log = train_v3(v3_config(steps=200), checkpoint="run.pt")

The sibling (another seed, OPT-350m's layout) is ``v3_config(seed=1, post_ln=True, embed_proj_dim=64)``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from transformers import OPTForCausalLM, PreTrainedTokenizerFast

from microscope.models.organism.train import TrainConfig, train
from microscope.models.organism_v3.corpus import Corpus, CorpusConfig
from microscope.models.organism_v3.tokenizer import build_tokenizer

V3_CONFIG = TrainConfig(steps=7000, batch_size=32, seq_len=128, layers=4, d_model=128, heads=4,
                        ffn_dim=512, lr=2e-3, warmup=200)


def v3_config(**changes: Any) -> TrainConfig:
    """The shipped v3 recipe with ``changes`` (any :class:`TrainConfig` field)."""
    return replace(V3_CONFIG, **changes)


def train_v3(cfg: TrainConfig | None = None, corpus_config: CorpusConfig | None = None,
             progress: bool = True, checkpoint: str | os.PathLike | None = None, on_log=None,
             ) -> tuple[OPTForCausalLM, PreTrainedTokenizerFast, dict]:
    """Train organism v3 (or a sibling) with its tokenizer and corpus stream."""
    cfg = cfg or V3_CONFIG
    tokenizer = build_tokenizer()
    corpus = Corpus(corpus_config, table_seed=cfg.table_seed)
    batches = corpus.token_batches(tokenizer, cfg.batch_size, cfg.seq_len,
                                   seed=cfg.seed if cfg.stream_seed is None else cfg.stream_seed)
    return train(cfg, progress=progress, on_log=on_log, tokenizer=tokenizer, batches=batches,
                 checkpoint=checkpoint)
