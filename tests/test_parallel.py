"""The parallel baseline language model."""

import pytest
import torch

import feedback_lib as fl


def make(max_len: int = 16) -> fl.ParallelLM:
    torch.manual_seed(0)
    return fl.ParallelLM(11, d_model=16, heads=4, n_layers=2, d_ff=32, max_len=max_len).eval()


def test_shapes_and_causality():
    lm = make()
    tokens = torch.randint(0, 11, (3, 8))
    logits = lm(tokens)
    assert logits.shape == (3, 8, 11)
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 11
    other = lm(changed)
    torch.testing.assert_close(logits[:, :5], other[:, :5])
    assert not torch.allclose(logits[:, 5:], other[:, 5:])


def test_greedy_generation_equals_argmax_of_full_forward():
    lm = make()
    out = lm.generate(torch.randint(0, 11, (2, 3)), 5, temperature=0)
    assert out.shape == (2, 8)
    expected = lm(out[:, :-1]).argmax(-1)[:, 2:]
    assert torch.equal(out[:, 3:], expected)


def test_generation_keeps_the_last_max_len_tokens():
    lm = make(max_len=4)
    out = lm.generate(torch.randint(0, 11, (1, 3)), 6, temperature=0)
    assert out.shape == (1, 9)
    assert out[0, -1] == lm(out[:, -5:-1]).argmax(-1)[0, -1]


def test_bad_input():
    lm = make(max_len=4)
    with pytest.raises(ValueError, match="more than max_len=4"):
        lm(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 11\)"):
        lm(torch.full((1, 2), 11))
    with pytest.raises(TypeError, match="integer token ids"):
        lm(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="divisible by heads"):
        fl.ParallelLM(11, d_model=10, heads=4, n_layers=1, d_ff=8)
