"""One decoder protocol for every model: each step checks its tokens against what the decoder was
built for, before anything runs (under the C++ step loops too), and never returns data of an
earlier call."""

import feedback_lib as fl
import pytest
import torch
from feedback_lib import fast
from feedback_lib.decoding import Decoder, generate_from

from helpers import D_MODEL, HEADS, make_lm

N_VOCAB = 11


def feedback_fused():
    return make_lm(True).decoder(2, 6)


def feedback_readable():
    lm = make_lm(True)
    lm.transformer.fused = False
    return lm.decoder(2, 6)


def feedback_per_layer():
    return make_lm(False).decoder(2, 6)


def parallel_kv_cache():
    torch.manual_seed(0)
    lm = fl.ParallelLM(N_VOCAB, d_model=D_MODEL, heads=HEADS, n_layers=2, d_ff=32, max_len=8)
    return lm.eval().decoder(2, 6, kv_cache=True)


def parallel_rereading():
    torch.manual_seed(0)
    lm = fl.ParallelLM(N_VOCAB, d_model=D_MODEL, heads=HEADS, n_layers=2, d_ff=32, max_len=8)
    return lm.eval().decoder(2, 6)


def twin():
    torch.manual_seed(0)
    return fl.ParallelTwinLM(N_VOCAB, d_model=D_MODEL, heads=HEADS, n_layers=2, d_ff=32).decoder(
        2, 6
    )


DECODERS = pytest.mark.parametrize(
    "make",
    [
        feedback_fused,
        feedback_readable,
        feedback_per_layer,
        parallel_kv_cache,
        parallel_rereading,
        twin,
    ],
)


@pytest.fixture(autouse=True)
def cpp_loops(cpp_step_loops):
    """The fused decoder runs the C++ step loops wherever they can be built (CI requires it)."""
    return cpp_step_loops


def test_the_fused_decoder_runs_the_fused_loop():
    assert isinstance(feedback_fused().fused, fast.FusedState)
    assert feedback_readable().fused is None and feedback_per_layer().fused is None


@DECODERS
@pytest.mark.parametrize(
    "tokens, error, message",
    [
        (
            torch.zeros(3, 1, dtype=torch.long),
            ValueError,
            "tokens has batch 3, but the decoder was built for batch 2",
        ),
        (
            torch.zeros(1, 1, dtype=torch.long),
            ValueError,
            "tokens has batch 1, but the decoder was built for batch 2",
        ),
        (
            torch.zeros(2, 7, dtype=torch.long),
            ValueError,
            r"tokens has 7 tokens, but the decoder has room for 6 more",
        ),
        (
            torch.zeros(2, dtype=torch.long),
            ValueError,
            r"tokens must have shape \[batch, seq\] \(2 dimensions\)",
        ),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, "tokens has an empty seq axis"),
        (torch.zeros(2, 1), TypeError, "must hold integer token ids.*got dtype torch.float32"),
        (torch.zeros(2, 1, dtype=torch.bool), TypeError, "got dtype torch.bool"),
        (torch.zeros(2, 1, dtype=torch.uint8), TypeError, "got dtype torch.uint8"),
        (
            torch.full((2, 1), -1),
            ValueError,
            r"tokens holds id -1, outside the vocabulary \[0, 11\)",
        ),
        (torch.full((2, 1), N_VOCAB), ValueError, r"tokens holds id 11, outside the vocabulary"),
        (
            torch.zeros(2, 1, dtype=torch.long, device="meta"),
            ValueError,
            "tokens is on device meta",
        ),
        ([[0], [1]], TypeError, "tokens must be a torch.Tensor"),
    ],
    ids=[
        "larger batch",
        "smaller batch",
        "over capacity",
        "one dimension",
        "no tokens",
        "float",
        "bool",
        "uint8",
        "negative id",
        "id too large",
        "other device",
        "list",
    ],
)
def test_every_bad_step_is_refused_and_changes_nothing(make, tokens, error, message):
    decoder = make()
    good = torch.tensor([[1, 2], [3, 4]])
    expected = make().step(good)
    with pytest.raises(error, match=message):
        decoder.step(tokens)
    assert decoder.length == 0
    torch.testing.assert_close(decoder.step(good), expected, rtol=0, atol=0)


@DECODERS
def test_capacity_is_counted_over_steps(make):
    decoder = make()
    decoder.step(torch.zeros(2, 4, dtype=torch.long))
    decoder.step(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"room for 0 more \(6 of 6 read\)"):
        decoder.step(torch.zeros(2, 1, dtype=torch.long))


@DECODERS
def test_steps_equal_the_logits_of_one_forward_call(make):
    decoder = make()
    tokens = torch.randint(0, N_VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    model = decoder.lm if hasattr(decoder, "lm") else getattr(decoder, "model", None)
    logits = [decoder.step(tokens[:, :3])] + [
        decoder.step(tokens[:, t : t + 1]) for t in range(3, 6)
    ]
    if model is None:  # the rereading decoders keep their model's logits function
        full = decoder.logits(tokens)
    else:
        with torch.no_grad():
            full = model(tokens)
    for logit, t in zip(logits, (2, 3, 4, 5)):
        torch.testing.assert_close(logit, full[:, t], atol=1e-5, rtol=1e-5)


def test_no_result_holds_data_of_another_call():
    """Two fused decoders used in turn (one buffer pool) give what each gives alone, and a result
    is not changed by later steps."""
    lm = make_lm(True)
    a_tokens = torch.randint(0, N_VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    b_tokens = torch.randint(0, N_VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    alone_a = [lm.decoder(2, 5).step(a_tokens[:, : t + 1]) for t in range(5)]
    alone_b = [lm.decoder(1, 5).step(b_tokens[:, : t + 1]) for t in range(5)]
    a, b = lm.decoder(2, 5), lm.decoder(1, 5)
    got_a, got_b = [], []
    for t in range(5):
        got_a.append(a.step(a_tokens[:, t : t + 1]))
        got_b.append(b.step(b_tokens[:, t : t + 1]))
    first = got_a[0].clone()
    for got, alone in zip(got_a + got_b, alone_a + alone_b):
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_a[0], first)


def test_the_fused_state_checks_what_it_reads():
    model = make_lm(True).transformer
    state = fast.FusedState(model, 2, 4)
    for x in (
        torch.zeros(1, 3, D_MODEL),
        torch.zeros(1, 1, D_MODEL),
        torch.zeros(1, 2, 8),
        torch.zeros(5, 2, D_MODEL),
    ):
        with pytest.raises(ValueError, match="the fused state holds 4 steps of batch 2"):
            state.read(x)


def test_a_decoder_checks_its_sizes_when_built():
    lm = make_lm(True)
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        lm.decoder(0, 4)
    with pytest.raises(ValueError, match="capacity must be a positive integer"):
        lm.decoder(1, -1)
    with pytest.raises(ValueError, match="a decoder of capacity 4098 needs a memory of 4097 steps"):
        lm.decoder(1, fl.MAX_POSITIONS + 2)
    make_lm(True, mem_len=8).decoder(1, fl.MAX_POSITIONS + 2)  # a window keeps the memory short


def test_generate_from_any_decoder():
    class Counting(Decoder):
        """Logits that always point at the next id."""

        def read(self, tokens):
            logits = torch.zeros(tokens.shape[0], N_VOCAB)
            logits[torch.arange(tokens.shape[0]), (tokens[:, -1] + 1) % N_VOCAB] = 1
            return logits

    decoder = Counting(batch=1, capacity=5, n_vocab=N_VOCAB, device=torch.device("cpu"))
    out = generate_from(decoder, torch.tensor([[3, 4]]), 4, temperature=0)
    assert out.tolist() == [[3, 4, 5, 6, 7, 8]] and decoder.length == 5
