"""Linear probes read a planted direction perfectly and shuffled labels at chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import microscope
from microscope.analysis.probes import layer_probes, train_probes
from microscope.errors import AnalysisInputError
from tests.analysis_fixtures import single_thread  # noqa: F401 (autouse)
from tests.conftest import tiny_model


def planted(layout: str, n_prompts: int = 400):
    """A tiny model whose token embeddings of half the vocabulary carry +3 along one direction;
    prompts are random, labelled by whether their last token is in that half."""
    g = torch.Generator().manual_seed(0)
    model = tiny_model(layout)
    u = torch.randn(model.config.word_embed_proj_dim, generator=g)
    in_class = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    in_class[torch.randperm(model.config.vocab_size, generator=g)[: model.config.vocab_size // 2]] = True
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight[in_class] += 3.0 * u / u.norm()
    ids = torch.randint(3, 90, (n_prompts, 8), generator=g)
    return microscope.load(model), ids, in_class[ids[:, -1]].long().numpy()


@pytest.mark.parametrize("layout", ["pre_ln", "post_ln"])
def test_a_planted_direction_is_read_at_every_layer_and_shuffled_labels_are_not(layout):
    scope, ids, labels = planted(layout)
    result = layer_probes(scope, ids, labels)
    assert result.hooks == [f"blocks.{l}.hook_resid_post" for l in range(3)]
    assert result.test_accuracy.max() > 0.95
    assert result.test_accuracy[0] > 0.95
    shuffled = np.random.default_rng(0).permutation(labels)
    null = layer_probes(scope, ids, shuffled)
    assert np.all(np.abs(null.test_accuracy - 0.5) < 0.15)
    frame = result.to_frame()
    assert list(frame.layer) == [0, 1, 2] and result.figures()


def test_token_level_probes_split_by_prompt():
    scope, ids, labels = planted("pre_ln", n_prompts=60)
    token_labels = np.isin(ids.numpy(), np.nonzero(labels)[0])  # any labels per token
    result = layer_probes(scope, ids, token_labels.astype(int).reshape(-1), position="all",
                          hooks="blocks.0.hook_resid_post")
    assert result.n_train + result.n_test == ids.numel()
    assert result.n_test % ids.shape[1] == 0  # whole prompts held out


def test_train_probes_on_separable_features_and_the_probe_direction():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16))
    y = (x[:, 3] > 0).astype(int)
    x[:, 3] += np.where(y == 1, 1.0, -1.0)  # a margin of 2 along feature 3
    result = train_probes({"f": x}, y)
    assert result.test_accuracy[0] > 0.95
    direction = result.direction("f")
    assert direction.abs().argmax().item() == 3 and direction[3] > 0


def test_probes_refuse_one_class_and_mismatched_labels():
    with pytest.raises(AnalysisInputError, match="two classes"):
        train_probes({"f": np.zeros((10, 2))}, np.ones(10))
    scope, ids, labels = planted("pre_ln", n_prompts=20)
    with pytest.raises(AnalysisInputError, match="labels for"):
        layer_probes(scope, ids, labels[:5])
