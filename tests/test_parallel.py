"""The parallel baseline language model."""

import feedback_lib as fl
import pytest
import torch


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


def test_kv_cache_logits_equal_the_full_forward_pass():
    torch.manual_seed(0)
    lm = fl.ParallelLM(11, d_model=16, heads=4, n_layers=3, d_ff=32, max_len=16).double().eval()
    tokens = torch.randint(0, 11, (2, 12))
    full = lm(tokens)  # [2, 12, 11]
    decoder = lm.decoder(2, 12, kv_cache=True)
    # A block of 5 (the prompt: causal inside the block), then one token at a time, then a block of 3:
    # each step returns the logits of its last token.
    torch.testing.assert_close(decoder.step(tokens[:, :5]), full[:, 4], rtol=0, atol=1e-12)
    for t in range(5, 9):
        torch.testing.assert_close(
            decoder.step(tokens[:, t : t + 1]), full[:, t], rtol=0, atol=1e-12
        )
    torch.testing.assert_close(decoder.step(tokens[:, 9:]), full[:, 11], rtol=0, atol=1e-12)
    assert (
        decoder.nbytes == 2 * 3 * 2 * 12 * 16 * 8
    )  # keys and values, layers, batch, tokens, d_model, float64


def test_kv_cache_generation_equals_rereading():
    lm = make()
    prompt = torch.randint(0, 11, (2, 3))
    for kwargs in (dict(temperature=0), dict(temperature=0.9, top_k=4)):
        cached = lm.generate(
            prompt, 9, kv_cache=True, generator=torch.Generator().manual_seed(1), **kwargs
        )
        reread = lm.generate(prompt, 9, generator=torch.Generator().manual_seed(1), **kwargs)
        assert torch.equal(cached, reread)


def test_kv_cache_errors():
    lm = make(max_len=8)
    with pytest.raises(ValueError, match="capacity=9 is more than the model.s max_len=8"):
        lm.generate(torch.zeros((1, 4), dtype=torch.long), 6, kv_cache=True)
    with pytest.raises(TypeError, match="kv_cache must be True or False"):
        lm.generate(torch.zeros((1, 4), dtype=torch.long), 2, kv_cache="yes")
    with pytest.raises(ValueError, match="capacity=9 is more than the model's max_len=8"):
        lm.decoder(1, 9, kv_cache=True)
    decoder = lm.decoder(1, 4, kv_cache=True)
    decoder.step(torch.zeros((1, 3), dtype=torch.long))
    with pytest.raises(
        ValueError,
        match=r"tokens has 2 tokens, but the decoder has room for 1 more \(3 of 4 read\)",
    ):
        decoder.step(torch.zeros((1, 2), dtype=torch.long))
    with pytest.raises(
        ValueError, match="tokens has batch 2, but the decoder was built for batch 1"
    ):
        decoder.step(torch.zeros((2, 1), dtype=torch.long))
    with pytest.raises(ValueError, match="call model.eval"):
        lm.train().decoder(1, 4, kv_cache=True)
    assert lm.training  # generate restores the mode it found
    lm.generate(torch.zeros((1, 2), dtype=torch.long), 2, kv_cache=True)
    assert lm.training
