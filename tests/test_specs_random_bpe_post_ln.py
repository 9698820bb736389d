"""Every shipped spec runs on random weights of OPT-350m's layout (post-LN, ``word_embed_proj_dim``
< ``hidden_size``) with OPT's BPE, and names nothing; see tests/test_specs_random_bpe.py."""

from __future__ import annotations

import pytest

from tests.test_specs_random_bpe import SPECS, run_spec_and_check_it_names_nothing


@pytest.mark.parametrize("name", SPECS)
def test_every_shipped_spec_runs_on_random_post_ln_weights_and_names_nothing(tmp_path, monkeypatch,
                                                                             opt_bpe_checkpoints, name):
    monkeypatch.chdir(tmp_path)
    run_spec_and_check_it_names_nothing(name, opt_bpe_checkpoints["post_ln"])
