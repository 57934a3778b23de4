"""Reward read at the last real token, for either padding side and when pad == EOS."""

import torch

from lit_rlhf.models import last_token_index, load_scalar_model, scalar_head_outputs, sequence_scores


def test_last_token_index_any_padding_side():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_score_is_read_at_last_real_token_even_when_it_is_the_pad_id(tiny_model_dir, tokenizer):
    model = load_scalar_model(tiny_model_dir, tokenizer.pad_token_id).eval()
    eos = tokenizer.eos_token_id  # == pad id
    ids = torch.tensor([[5, 6, 7, eos]])
    alone = scalar_head_outputs(model, ids, torch.ones_like(ids))[0, -1]  # head at the real EOS
    right = torch.tensor([[5, 6, 7, eos, eos, eos]])
    left = torch.tensor([[eos, eos, 5, 6, 7, eos]])
    with torch.no_grad():
        scores = sequence_scores(
            model, torch.cat([right, left]), torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
        )
        before_eos = scalar_head_outputs(model, ids, torch.ones_like(ids))[0, -2]
    assert torch.allclose(scores, alone.expand(2), atol=1e-5)
    # transformers' own pooling (last id != pad) would read the token before EOS: a different value
    assert not torch.isclose(alone, before_eos, atol=1e-4)
