"""Organism v3's tokenizer: a byte-level BPE trained on its corpus, with OPT's conventions.

As in OPT's (GPT-2's) tokenizer: bytes map to printable symbols, ``Ġ`` marks a leading space, no
space is added before a text's first word; ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3; ``</s>``
is prepended to every text. The merges are learnt with ``tokenizers``' ``BpeTrainer`` on a fixed
sample of the corpus from which :data:`corpus.RARE_WORDS` are removed, so those words split into
several tokens, as rare words do in OPT's 50k vocabulary (a word of the sample is never split that
way: BPE's merges follow the sample's frequencies).
"""

from __future__ import annotations

import re
from itertools import islice

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from microscope.models.organism_v3.corpus import BOS, RARE_WORDS, SPECIAL_TOKENS, Corpus

VOCAB_SIZE = 2048
SAMPLE_DOCUMENTS = 20_000
SAMPLE_SEED = 999  # not a training seed


def tokenizer_text(documents: int = SAMPLE_DOCUMENTS, seed: int = SAMPLE_SEED) -> list[str]:
    """The BPE's training text: corpus documents with the rare words cut out."""
    rare = re.compile(r"\b(" + "|".join(RARE_WORDS) + r")\b")
    return [rare.sub("", text) for text in islice(Corpus().texts(seed), documents)]


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the BPE (deterministic: same text, same merges) and wrap it for ``transformers``."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(tokenizer_text(), trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, core.token_to_id(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=BOS, pad_token="<pad>", unk_token="<unk>",
        padding_side="right", model_max_length=128)
