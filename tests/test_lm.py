"""FeedbackLM: batch-major logits, chunked calls, cached generation."""

import feedback_lib as fl
import pytest
import torch

from helpers import make_lm

VARIANTS = pytest.mark.parametrize("shared_kv", [False, True], ids=["per-layer-kv", "shared-kv"])


@VARIANTS
def test_logits_shape(shared_kv):
    lm = make_lm(shared_kv)
    assert lm(torch.randint(0, 11, (3, 7))).shape == (3, 7, 11)


@VARIANTS
@pytest.mark.parametrize("mem_len", [None, 4])
def test_chunked_calls_equal_one_call(shared_kv, mem_len):
    lm = make_lm(shared_kv, mem_len=mem_len)
    tokens = torch.randint(0, 11, (2, 13))
    whole = lm(tokens)
    pieces, memory = [], None
    for chunk in tokens.split([5, 1, 7], dim=1):
        logits, memory = lm(chunk, memory, return_memory=True)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-5)


@VARIANTS
def test_greedy_generation_equals_argmax_of_full_forward(shared_kv):
    lm = make_lm(shared_kv)
    prompt = torch.randint(0, 11, (2, 4))
    out = lm.generate(prompt, 8, temperature=0)
    assert out.shape == (2, 12) and torch.equal(out[:, :4], prompt)
    full = lm(out)
    # The token at position t + 1 is the argmax of the logits at position t, for every generated token.
    assert torch.equal(out[:, 4:], full[:, 3:-1].argmax(-1))


@VARIANTS
def test_generation_reads_the_prompt_once_then_one_step_per_token(shared_kv):
    lm = make_lm(shared_kv)
    lengths, make_decoder = [], lm.decoder

    def recording_decoder(batch, capacity, **options):
        decoder = make_decoder(batch, capacity, **options)
        read = decoder.read
        decoder.read = lambda tokens: (lengths.append(tokens.shape[1]), read(tokens))[1]
        return decoder

    lm.decoder = recording_decoder
    lm.generate(torch.randint(0, 11, (1, 6)), 5, temperature=0)
    assert lengths == [6, 1, 1, 1, 1]


def test_sampling_respects_top_k_and_generator():
    lm = make_lm()
    prompt = torch.randint(0, 11, (4, 3))
    a = lm.generate(prompt, 6, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    b = lm.generate(prompt, 6, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    logits = lm(a)[:, 2:-1]  # the logits each new token was drawn from
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == a[:, 3:, None]).any(-1).all()


def test_sample_next_token():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 2.5, 0.0, 2.9]])
    assert fl.sample_next_token(logits, temperature=0).tolist() == [[1], [0]]
    assert fl.sample_next_token(logits, top_k=1).tolist() == [[1], [0]]
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([fl.sample_next_token(logits, 1.0, 2, gen) for _ in range(200)], 1)
    assert set(draws[0].tolist()) == {1, 2} and set(draws[1].tolist()) == {0, 3}
    # A tiny temperature is greedy in effect, never NaN.
    assert fl.sample_next_token(logits, temperature=1e-300, generator=gen).tolist() == [[1], [0]]


def test_generate_restores_training_mode():
    lm = make_lm().train()
    lm.generate(torch.zeros(1, 1, dtype=torch.long), 2)
    assert lm.training


def test_a_windowed_memory_holds_only_its_window():
    lm = make_lm(mem_len=4)
    _, memory = lm(torch.zeros(1, 50, dtype=torch.long), return_memory=True)
    assert len(memory) == 4
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in memory.tensors)


def test_memory_detach_and_size():
    lm = make_lm()
    _, memory = lm(torch.randint(0, 11, (2, 5)), return_memory=True)
    assert len(memory) == 5 and memory.batch_size == 2
    assert memory.nbytes() == 2 * 5 * 2 * 16 * 4  # keys + values, float32
    assert memory.detach().tensors[0].requires_grad is False
