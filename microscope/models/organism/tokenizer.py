"""The organism's word-level tokenizer, built with `tokenizers` and saved in Hugging Face format.

One token per space-separated word of :func:`microscope.models.organism.corpus.vocabulary`. Like
OPT's own tokenizer, it prepends ``</s>`` (id 2) as BOS to every input, pads with ``<pad>`` (id 1)
and maps unknown words to ``<unk>`` (id 3); ``AutoTokenizer.from_pretrained(folder)`` loads it.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from microscope.models.organism.corpus import BOS, vocabulary


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A fast tokenizer over ``words`` (default: the corpus vocabulary); ids follow list order."""
    words = words or vocabulary()
    vocab = {word: index for index, word in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=BOS, pad_token="<pad>", unk_token="<unk>",
        padding_side="right", model_max_length=128)
