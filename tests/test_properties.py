"""Properties of the public API over random inputs (hypothesis).

Each property draws arguments, right and wrong, and checks one of two outcomes: the call raises
a ValueError or TypeError whose message names an argument that is wrong, or it returns what a
reference gives (the readable loop for the fused one, one forward call for the decoder's steps,
the argmax for greedy sampling, ...). Where a call takes several arguments, a random few of them
(at most two) are drawn wrong, so that every wrong value is also tried among right ones. The
examples are derandomized, so every run tests the same ones; the settings below keep the file
to about a minute on two cores.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal

import feedback_lib as fl
import numpy as np
import pytest
import torch
from feedback_lib.decoding import sample_next_token
from feedback_lib.fast import native
from feedback_lib.training.data import BatchSampler, CharTokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(PROPERTY, max_examples=20)  # properties whose examples build and run models

# Arguments as (right values, wrong values).
SIZE = (
    st.one_of(st.integers(1, 6), st.just(np.int64(3))),
    st.sampled_from([0, -2, 2.0, 2.5, True, None, "4"]),
)
PROBABILITY = (
    st.sampled_from([0, 0.0, 0.3, 0.99, np.float64(0.5)]),
    st.sampled_from([-0.5, 1, 1.0, 1.5, True, None, "0.1", math.nan, math.inf]),
)
FLAG = (st.booleans(), st.sampled_from([0, 1, "no", None]))
MEM_LEN = (
    st.sampled_from([None, 1, 5, fl.MAX_POSITIONS, np.int64(4)]),
    st.sampled_from([0, -1, fl.MAX_POSITIONS + 1, 2.5, "3", True]),
)
#: (heads, d_model): heads divides d_model, or not, or either is no positive integer.
HEADS_AND_WIDTH = (
    st.tuples(st.integers(1, 4), st.integers(1, 3)).map(lambda t: (t[0], t[0] * t[1])),
    st.sampled_from(
        [(0, 4), (-1, 4), (2, 0), (3, 4), (2.0, 4), (2, 4.0), (True, 4), (None, 4), (2, "4")]
    ),
)
SEEDS = st.integers(0, 2**16)


def arguments(data, table, most_wrong=2):
    """Draw every argument of ``table`` (``{name: (right values, wrong values)}``), at most
    ``most_wrong`` of them, chosen at random, from the wrong values. Returns the values and the
    names of the wrong ones."""
    wrong = data.draw(st.sets(st.sampled_from(list(table)), max_size=most_wrong), label="wrong")
    values = {}
    for name, (right, bad) in table.items():
        values[name] = data.draw(bad if name in wrong else right, label=name)
    return values, sorted(wrong)


def outcome(call, problems: list[str]):
    """``call()`` when ``problems`` is empty; otherwise the call must raise a ValueError or
    TypeError whose message names one of ``problems`` (the arguments that are wrong)."""
    if not problems:
        return call()
    with pytest.raises((ValueError, TypeError)) as error:
        call()
    message = str(error.value)
    assert any(name in message for name in problems), (
        f"{type(error.value).__name__}: {message!r} names none of {problems}"
    )
    return None


@contextlib.contextmanager
def at_most(seconds: float):
    """Fail with TimeoutError if the block runs longer than ``seconds`` (for calls that must be
    refused at once rather than run)."""
    if not hasattr(signal, "setitimer"):  # Windows
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True, scope="module")
def cpp_loops(cpp_step_loops):
    """The fused loop runs its C++ step loops wherever they build (CI requires it)."""
    return cpp_step_loops


def layer(d_model: int, heads: int, shared_kv: bool, d_ff: int = 8, **kwargs):
    return fl.FeedbackTransformerLayer(
        d_model=d_model,
        attn=fl.FeedbackAttention(heads, d_model, 0.0, is_kv_precomputed=shared_kv),
        feed_forward=fl.FeedForward(d_model, d_ff, 0.0),
        dropout_prob=0.0,
        **kwargs,
    )


def transformer(shared_kv, d_model, heads, n_layers, *, seed=0, dtype=torch.float64, **kwargs):
    """A feedback transformer with random parameters, in eval mode."""
    if shared_kv:
        model = fl.FeedbackTransformerKV(
            layer(d_model, heads, True), n_layers, d_model, heads, **kwargs
        )
    else:
        model = fl.FeedbackTransformer(layer(d_model, heads, False), n_layers, **kwargs)
    return fl.randomize_parameters_(model.to(dtype), seed=seed).eval()


N_VOCAB = 7


def lm(*, shared_kv=True, fused=True, mem_len=None, seed=0, **kwargs):
    """A small float64 FeedbackLM with random parameters, in eval mode; ``fused=False`` makes
    the shared key/value model run its readable loop."""
    model = fl.FeedbackLM(
        N_VOCAB,
        d_model=8,
        heads=2,
        n_layers=2,
        d_ff=16,
        shared_kv=shared_kv,
        mem_len=mem_len,
        **kwargs,
    )
    model.transformer.fused = fused and model.transformer.fused
    return fl.randomize_parameters_(model.double(), seed=seed).eval()


# --- Constructors: built, or an error that names the wrong argument


@PROPERTY
@given(data=st.data())
def test_feedback_attention_is_built_or_names_its_wrong_argument(data):
    args, wrong = arguments(
        data, {"d_model": HEADS_AND_WIDTH, "dropout_prob": PROBABILITY, "is_kv_precomputed": FLAG}
    )
    (heads, d_model), dropout, kv = args.values()
    if "d_model" in wrong:
        wrong.append("heads")
    attn = outcome(
        lambda: fl.FeedbackAttention(heads, d_model, dropout, is_kv_precomputed=kv), wrong
    )
    if attn is not None:
        assert attn.heads * attn.d_k == d_model and (attn.key is None) == kv


@PROPERTY
@given(data=st.data())
def test_feed_forward_is_built_or_names_its_wrong_argument(data):
    activation = (
        st.sampled_from([None, nn.GELU(), nn.Tanh()]),
        st.sampled_from(["gelu", torch.relu, 3]),
    )
    args, wrong = arguments(
        data, {"d_model": SIZE, "d_ff": SIZE, "dropout": PROBABILITY, "activation": activation}
    )
    ff = outcome(lambda: fl.FeedForward(**args), wrong)
    if ff is not None:
        assert ff(torch.randn(3, int(args["d_model"]))).shape == (3, args["d_model"])


@PROPERTY
@given(d_model=st.sampled_from([4, 8]), data=st.data())
def test_a_layer_takes_only_parts_of_its_width(d_model, data):
    """A part built for another width is refused when the layer is built, not at the first
    step (a plain nn.Module without ``d_model`` cannot say its width and is trusted)."""
    other = 12 - d_model
    attention = {
        "right": fl.FeedbackAttention(2, d_model, 0.0),
        "other width": fl.FeedbackAttention(2, other, 0.0),
        "linear": nn.Linear(d_model, d_model),
        "string": "attention",
    }
    feed_forward = {
        "right": fl.FeedForward(d_model, 8, 0.0),
        "gated": fl.FeedForward(d_model, 8, 0.0, is_gated=True),
        "plain module": nn.Linear(d_model, d_model),
        "other width": fl.FeedForward(other, 8, 0.0),
        "gated, other width": fl.FeedForward(other, 8, 0.0, is_gated=True),
        "string": "feed forward",
    }
    args, wrong = arguments(
        data,
        {
            "attn": (st.just("right"), st.sampled_from(["other width", "linear", "string"])),
            "feed_forward": (
                st.sampled_from(["right", "gated", "plain module"]),
                st.sampled_from(["other width", "gated, other width", "string"]),
            ),
            "dropout_prob": PROBABILITY,
        },
    )
    built = outcome(
        lambda: fl.FeedbackTransformerLayer(
            d_model=d_model,
            attn=attention[args["attn"]],
            feed_forward=feed_forward[args["feed_forward"]],
            dropout_prob=args["dropout_prob"],
        ),
        wrong,
    )
    if built is not None:
        x, memory = torch.randn(2, d_model), torch.randn(3, 2, d_model)
        assert built(x, memory, memory).shape == (2, d_model)


@PROPERTY
@given(shared_kv=st.booleans(), data=st.data())
def test_a_transformer_is_built_or_names_its_wrong_argument(shared_kv, data):
    table = {
        "layer": (st.just("right"), st.sampled_from(["other kind", "module"])),
        "n_layers": SIZE,
        "mem_len": MEM_LEN,
        "naive_stack": FLAG,
    }
    if shared_kv:
        table["d_model"] = (st.just((4, 2)), st.sampled_from([(8, 2), (4, 4), (4, 1)]))
        table["fused"] = FLAG
    args, wrong = arguments(data, table)
    part = {
        "right": layer(4, 2, shared_kv),
        "other kind": layer(4, 2, not shared_kv),
        "module": nn.Linear(4, 4),
    }[args.pop("layer")]
    if "layer" in wrong:
        wrong.append("is_kv_precomputed")
    if shared_kv:
        d_model, heads = args.pop("d_model")
        if "d_model" in wrong:
            wrong.append("heads")
        model = outcome(
            lambda: fl.FeedbackTransformerKV(part, args.pop("n_layers"), d_model, heads, **args),
            wrong,
        )
    else:
        model = outcome(lambda: fl.FeedbackTransformer(part, args.pop("n_layers"), **args), wrong)
    if model is not None:
        assert model(torch.randn(3, 2, 4)).shape == (3, 2, 4)


@PROPERTY
@given(data=st.data())
def test_a_language_model_is_built_or_names_its_wrong_argument(data):
    args, wrong = arguments(
        data,
        {
            "n_vocab": SIZE,
            "d_model": HEADS_AND_WIDTH,
            "n_layers": SIZE,
            "d_ff": SIZE,
            "dropout": PROBABILITY,
            "shared_kv": FLAG,
            "mem_len": MEM_LEN,
            "cross_attention": FLAG,
        },
    )
    args["heads"], args["d_model"] = args["d_model"]
    if "d_model" in wrong:
        wrong.append("heads")
    model = outcome(lambda: fl.FeedbackLM(args.pop("n_vocab"), **args), wrong)
    if model is not None:
        assert model.n_vocab == model.head.out_features


# --- Inputs: the reference result, or an error that names the wrong input

ATTENTION = {
    kv: fl.randomize_parameters_(fl.FeedbackAttention(2, 4, 0.0, is_kv_precomputed=kv).double())
    for kv in (False, True)
}
#: How an input can be wrong (None: it is right).
INPUT_FAULTS = st.sampled_from(
    [None, None, None, "rank", "width", "empty", "batch", "length", "dtype", "meta", "list"]
)
WRONG_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool])


def make_input(shape, fault, batch_axis, wrong_dtype, seed, dtype=torch.float64):
    """A random tensor of ``shape``, or one wrong in the way ``fault`` says."""
    shape = list(shape)
    if fault == "rank":
        shape = shape[1:]
    elif fault == "width":
        shape[-1] += 1
    elif fault == "empty":
        shape[0] = 0
    elif fault == "batch":
        shape[batch_axis] += 1
    elif fault == "length" and batch_axis:  # the memory axis of key or value
        shape[0] += 1
    if fault == "dtype":
        dtype = wrong_dtype
    if fault == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = (x * 3).to(dtype)
    return x.tolist() if fault == "list" else x


@PROPERTY
@given(
    kv=st.booleans(),
    batch=st.integers(1, 3),
    length=st.integers(1, 5),
    faults=st.tuples(INPUT_FAULTS, INPUT_FAULTS, INPUT_FAULTS),
    wrong_dtype=WRONG_DTYPES,
    seed=SEEDS,
)
def test_attention_equals_the_numpy_reference_or_names_the_wrong_input(
    kv, batch, length, faults, wrong_dtype, seed
):
    attn = ATTENTION[kv]
    row = [2, 2] if kv else [4]
    shapes = {"query": [batch, 4], "key": [length, batch, *row], "value": [length, batch, *row]}
    inputs = {
        name: make_input(shape, fault, 1 if name != "query" else 0, wrong_dtype, seed + i)
        for i, ((name, shape), fault) in enumerate(zip(shapes.items(), faults))
    }
    problems = [name for name, fault in zip(shapes, faults) if fault not in (None, "length")]
    if (faults[1] == "length") != (faults[2] == "length"):
        problems += ["key", "value"]  # memories of different lengths
    out = outcome(lambda: attn(**inputs), problems)
    if out is not None:
        expected = fl.feedback_attention_numpy(
            fl.attention_weights_numpy(attn), *(inputs[n].detach().numpy() for n in shapes)
        )
        np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


TRANSFORMERS = {
    shared_kv: transformer(shared_kv, 4, 2, 2, mem_len=3) for shared_kv in (False, True)
}


@PROPERTY
@given(
    shared_kv=st.booleans(),
    steps=st.integers(1, 5),
    batch=st.integers(1, 3),
    fault=INPUT_FAULTS,
    wrong_dtype=WRONG_DTYPES,
    seed=SEEDS,
)
def test_a_transformer_runs_or_names_its_wrong_input(
    shared_kv, steps, batch, fault, wrong_dtype, seed
):
    model = TRANSFORMERS[shared_kv]
    x_seq = make_input([steps, batch, 4], fault, 1, wrong_dtype, seed)
    problems = [] if fault in (None, "batch", "length") else ["x_seq"]
    out = outcome(lambda: model(x_seq), problems)
    if out is not None:
        assert out.shape == x_seq.shape and out.isfinite().all()


@FEW
@given(
    heads=st.integers(1, 3),
    d_k=st.integers(1, 3),
    n_layers=st.integers(1, 3),
    steps=st.integers(1, 6),
    batch=st.integers(1, 3),
    mem_len=st.one_of(st.none(), st.integers(1, 5)),
    n_prefix=st.integers(0, 4),
    cpp=st.booleans(),
    seed=SEEDS,
)
def test_the_fused_loop_equals_the_readable_loop_in_float64(
    heads, d_k, n_layers, steps, batch, mem_len, n_prefix, cpp, seed
):
    """Outputs, returned memory and the gradients of the input and the carried memory."""
    model = transformer(True, heads * d_k, heads, n_layers, seed=seed, mem_len=mem_len)
    readable = copy.deepcopy(model)
    readable.fused = False
    assert fl.fast.can_fuse(model) and not fl.fast.can_fuse(readable)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, heads * d_k, dtype=torch.float64, generator=gen)
    memory = None
    if n_prefix:
        with torch.no_grad():
            _, memory = model(
                torch.randn(n_prefix, batch, heads * d_k, dtype=torch.float64, generator=gen),
                return_memory=True,
            )

    def run(m):
        inputs = [x.clone().requires_grad_()]
        carried = None
        if memory is not None:
            inputs += [t.clone().requires_grad_() for t in memory.tensors]
            carried = fl.FeedbackMemory(tuple(inputs[1:]), memory.signature)
        y, returned = m(inputs[0], carried, return_memory=True)
        loss = (y * y.detach().cos()).sum() + sum((t**2).sum() for t in returned.tensors)
        return (y, *returned.tensors, *torch.autograd.grad(loss, inputs))

    with contextlib.nullcontext() if cpp else native.python_loops():
        fused = run(model)
    for a, b in zip(fused, run(readable), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@FEW
@given(
    shared_kv=st.booleans(),
    fused=st.booleans(),
    steps=st.integers(2, 7),
    cut=st.integers(1, 6),
    batch=st.integers(1, 2),
    mem_len=st.one_of(st.none(), st.integers(1, 4)),
    seed=SEEDS,
)
def test_a_call_continued_with_its_memory_equals_one_call(
    shared_kv, fused, steps, cut, batch, mem_len, seed
):
    model = transformer(shared_kv, 4, 2, 2, seed=seed, mem_len=mem_len)
    model.fused = fused and shared_kv
    x = torch.randn(
        steps, batch, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    cut = min(cut, steps - 1)
    with torch.no_grad():
        whole, memory = model(x, return_memory=True)
        first, carried = model(x[:cut], return_memory=True)
        rest, continued = model(x[cut:], carried, return_memory=True)
    torch.testing.assert_close(torch.cat([first, rest]), whole, rtol=1e-10, atol=1e-12)
    for a, b in zip(continued.tensors, memory.tensors, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@FEW
@given(
    shared_kv=st.booleans(),
    steps=st.integers(1, 5),
    batch=st.integers(2, 4),
    poisoned=st.sets(st.integers(0, 3), max_size=2),
    value=st.sampled_from([math.nan, math.inf, -math.inf, 1e300]),
    seed=SEEDS,
)
def test_a_non_finite_batch_row_reaches_no_other_row(
    shared_kv, steps, batch, poisoned, value, seed
):
    """The rows of a batch are independent: each row's output is that of the row alone, and a
    NaN or infinity in one row never reaches another (the fused loop included)."""
    model = TRANSFORMERS[shared_kv]
    x = torch.randn(
        steps, batch, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    poisoned = {r for r in poisoned if r < batch}
    for r in poisoned:
        x[steps // 2, r, seed % 4] = value
    with torch.no_grad():
        out = model(x)
        for r in set(range(batch)) - poisoned:
            assert out[:, r].isfinite().all()
            torch.testing.assert_close(
                out[:, r : r + 1], model(x[:, r : r + 1]), rtol=1e-10, atol=1e-12
            )


# --- The language model: token ids, the decoder, generation

TOKEN_DTYPES = st.sampled_from(
    [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float32]
)
LM = {shared_kv: lm(shared_kv=shared_kv) for shared_kv in (False, True)}


@PROPERTY
@given(
    shared_kv=st.booleans(),
    rank=st.sampled_from([2, 2, 2, 1, 3]),
    batch=st.integers(0, 3),
    seq=st.integers(0, 4),
    low=st.integers(-2, 0),
    high=st.integers(N_VOCAB - 1, N_VOCAB + 2),
    dtype=TOKEN_DTYPES,
    where=st.sampled_from(["cpu", "cpu", "cpu", "meta", "list"]),
    seed=SEEDS,
)
def test_logits_or_an_error_naming_tokens(
    shared_kv, rank, batch, seq, low, high, dtype, where, seed
):
    """Any integer dtype either works like torch.long or is refused by name (never an error
    from inside torch); bool and float ids, other shapes, ids outside the vocabulary and other
    devices are refused by name."""
    model = LM[shared_kv]
    shape = [batch, seq, 2][:rank]
    ids = torch.randint(low, high + 1, shape, generator=torch.Generator().manual_seed(seed))
    tokens = ids.to(dtype)
    as_long = tokens.long()
    valid = (
        rank == 2
        and batch > 0
        and seq > 0
        and where == "cpu"
        and not dtype.is_floating_point
        and dtype != torch.bool
        and bool(((as_long >= 0) & (as_long < N_VOCAB)).all())
    )
    if where == "meta":
        tokens = tokens.to("meta")
    elif where == "list":
        tokens = tokens.tolist()
    if valid and dtype not in (torch.int64, torch.int32):
        try:  # either way is right, as long as a refusal names tokens
            logits = model(tokens)
        except (TypeError, ValueError) as error:
            assert "tokens" in str(error)
            return
    else:
        logits = outcome(lambda: model(tokens), [] if valid else ["tokens"])
    if logits is not None:
        assert logits.shape == (batch, seq, N_VOCAB)
        torch.testing.assert_close(logits, model(as_long), rtol=0, atol=0)


@FEW
@given(
    shared_kv=st.booleans(),
    fused=st.booleans(),
    mem_len=st.sampled_from([None, 2, 5]),
    batch=st.integers(1, 3),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    spare=st.integers(0, 2),
    seed=SEEDS,
)
def test_decoder_steps_equal_one_forward_call(
    shared_kv, fused, mem_len, batch, chunks, spare, seed
):
    model = lm(shared_kv=shared_kv, fused=fused, mem_len=mem_len, seed=seed)
    tokens = torch.randint(
        0, N_VOCAB, (batch, sum(chunks)), generator=torch.Generator().manual_seed(seed)
    )
    decoder = model.decoder(batch, sum(chunks) + spare)
    with torch.no_grad():
        full = model(tokens)
    end = 0
    for n in chunks:
        logits = decoder.step(tokens[:, end : end + n])
        end += n
        torch.testing.assert_close(logits, full[:, end - 1], rtol=1e-10, atol=1e-12)
    assert decoder.length == end


def greedy_reference(model, prompt, n):
    """Greedy continuation by one full forward call per new token."""
    tokens = prompt
    with torch.no_grad():
        for _ in range(n):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@PROPERTY
@given(
    shared_kv=st.booleans(),
    fused=st.booleans(),
    mem_len=st.sampled_from([None, 8]),
    batch=st.integers(1, 2),
    prompt_len=st.integers(1, 3),
    seed=SEEDS,
    data=st.data(),
)
def test_generate_continues_the_prompt_or_names_its_wrong_argument(
    shared_kv, fused, mem_len, batch, prompt_len, seed, data
):
    """A greedy continuation (temperature 0 or top_k 1) equals the argmax of full forward
    calls; a wrong argument is refused by name before anything runs (a hang fails after 10 s
    instead of stalling the suite)."""
    model = lm(shared_kv=shared_kv, fused=fused, mem_len=mem_len)
    args, wrong = arguments(
        data,
        {
            "prompt": (
                st.just("right"),
                st.sampled_from(["float", "1-D", "out of the vocabulary", "list", "meta"]),
            ),
            "max_new_tokens": (
                st.sampled_from([1, 2, 4, np.int64(3)]),
                st.sampled_from([0, -1, 2.5, True, None, "3"]),
            ),
            "temperature": (
                st.sampled_from([0, 0.0, 1, 0.7, 1e-300, np.float64(0.5)]),
                st.sampled_from([-1, math.nan, math.inf, True, "1", None]),
            ),
            "top_k": (
                st.sampled_from([None, 1, 3, N_VOCAB + 5, np.int64(3)]),
                st.sampled_from([0, -1, 2.5, True, "3"]),
            ),
            "generator": (st.sampled_from([None, "torch"]), st.sampled_from([0, "cpu"])),
        },
    )
    right = torch.randint(
        0, N_VOCAB, (batch, prompt_len), generator=torch.Generator().manual_seed(seed)
    )
    prompt = {
        "right": right,
        "float": right.double(),
        "1-D": right[0],
        "out of the vocabulary": right + N_VOCAB,
        "list": right.tolist(),
        "meta": right.to("meta"),
    }[args.pop("prompt")]
    if args["generator"] == "torch":
        args["generator"] = torch.Generator().manual_seed(seed)
    with at_most(10):
        out = outcome(lambda: model.generate(prompt, **args), wrong)
    if out is not None:
        n = int(args["max_new_tokens"])
        assert out.shape == (batch, prompt_len + n) and out.dtype == torch.long
        assert torch.equal(out[:, :prompt_len], prompt)
        assert 0 <= int(out.min()) and int(out.max()) < N_VOCAB
        if args["temperature"] == 0 or args["top_k"] == 1:
            assert torch.equal(out, greedy_reference(model, prompt, n))


@pytest.mark.parametrize("mem_len", [None, 8])
@pytest.mark.parametrize("shared_kv", [True, False])
def test_generate_refuses_at_once_what_it_could_never_hold(shared_kv, mem_len):
    """No memory window makes 10**12 new tokens fit in a tensor: the call is refused by name at
    once, not run until the allocator or the user gives up."""
    model = lm(shared_kv=shared_kv, mem_len=mem_len)
    with at_most(2):
        outcome(
            lambda: model.generate(torch.zeros(1, 1, dtype=torch.long), 10**12), ["max_new_tokens"]
        )


# --- Sampling

SPECIAL_LOGITS = [math.nan, math.inf, -math.inf]


@PROPERTY
@given(
    rows=st.lists(
        st.lists(
            st.one_of(st.floats(-50, 50), st.sampled_from(SPECIAL_LOGITS)), min_size=1, max_size=6
        ).map(tuple),
        min_size=1,
        max_size=3,
    ),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    temperature=st.sampled_from([0, 1, 0.5, 1e-300, 100.0]),
    top_k=st.sampled_from([None, 1, 2, 10, np.int64(3)]),
    seed=SEEDS,
)
def test_sampling_picks_a_token_it_may_pick_or_names_the_logits(
    rows, dtype, temperature, top_k, seed
):
    """Greedy is the argmax; a +inf logit is certain; a drawn token is never -inf and, with
    top_k, among the top_k largest; a row with NaN or only -inf is an error naming logits."""
    width = min(len(r) for r in rows)
    logits = torch.tensor([r[:width] for r in rows], dtype=torch.float64).to(dtype)
    bad = logits.isnan().any(-1) | (logits == -math.inf).all(-1)
    ids = outcome(
        lambda: sample_next_token(
            logits, temperature, top_k, generator=torch.Generator().manual_seed(seed)
        ),
        ["logits"] if bad.any() else [],
    )
    if ids is None:
        return
    assert ids.shape == (len(rows), 1) and ids.dtype == torch.long
    picked = logits.gather(1, ids)[:, 0]
    best = logits.amax(-1)
    if temperature == 0 or top_k == 1:
        assert torch.equal(ids[:, 0], logits.argmax(-1))
    assert (picked > -math.inf).all()
    assert ((best < math.inf) | (picked == math.inf)).all()  # +inf is certain
    if top_k is not None and top_k < width:
        kth = logits.topk(int(top_k), dim=-1).values[:, -1]
        assert (picked >= kth).all()


@PROPERTY
@given(data=st.data())
def test_sampling_names_its_wrong_argument(data):
    args, wrong = arguments(
        data,
        {
            "logits": (
                st.just("right"),
                st.sampled_from(
                    ["1-D", "3-D", "ints", "bool", "no vocabulary", "no batch", "meta", "list"]
                ),
            ),
            "temperature": (
                st.sampled_from([1.0, 0, 0.5, np.float64(2)]),
                st.sampled_from([-1, math.nan, math.inf, True, "1", None]),
            ),
            "top_k": (
                st.sampled_from([None, 2, np.int64(1)]),
                st.sampled_from([0, 1.5, True, "2"]),
            ),
            "generator": (st.sampled_from([None, "torch"]), st.sampled_from([0, "cpu"])),
        },
    )
    args["logits"] = {
        "right": torch.tensor([[0.0, 1.0]]),
        "1-D": torch.tensor([0.0, 1.0]),
        "3-D": torch.tensor([[[0.0, 1.0]]]),
        "ints": torch.tensor([[0, 1]]),
        "bool": torch.tensor([[True, False]]),
        "no vocabulary": torch.zeros(2, 0),
        "no batch": torch.zeros(0, 3),
        "meta": torch.zeros(1, 2, device="meta"),  # no values to sample from
        "list": [[0.0, 1.0]],
    }[args["logits"]]
    if args["generator"] == "torch":
        args["generator"] = torch.Generator()
    ids = outcome(lambda: sample_next_token(**args), wrong)
    if ids is not None:
        assert ids.shape == (1, 1) and 0 <= int(ids) < 2


# --- Cross-attention: padding is never read


@FEW
@given(
    batch=st.integers(1, 3),
    context_len=st.integers(1, 4),
    padding=st.lists(st.booleans(), min_size=12, max_size=12),
    value=st.sampled_from([math.nan, math.inf, -math.inf, 1e300]),
    seed=SEEDS,
)
def test_what_padding_holds_never_reaches_the_logits(batch, context_len, padding, value, seed):
    model = lm(cross_attention=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, N_VOCAB, (batch, 3), generator=gen)
    context = torch.randn(batch, context_len, 8, dtype=torch.float64, generator=gen)
    mask = torch.tensor(padding[: batch * context_len]).reshape(batch, context_len)
    mask[:, 0] = False  # every row reads at least one position
    with torch.no_grad():
        clean = model(
            tokens, context=context.masked_fill(mask[..., None], 0), context_padding_mask=mask
        )
        dirty = model(
            tokens, context=context.masked_fill(mask[..., None], value), context_padding_mask=mask
        )
        steps = model.decoder(
            batch, 3, context=context.masked_fill(mask[..., None], value), context_padding_mask=mask
        ).step(tokens)
    assert clean.isfinite().all()
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    torch.testing.assert_close(steps, clean[:, -1], rtol=1e-10, atol=1e-12)


# --- Data: the tokenizer and the batch sampler

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30)


@PROPERTY
@given(text=TEXT, other=st.characters(codec="utf-8", exclude_categories=["Cs"]))
def test_the_tokenizer_round_trips_and_names_unknown_characters(text, other):
    tokenizer = CharTokenizer.fit(text)
    ids = tokenizer.encode(text)
    assert ids.dtype == torch.long and tokenizer.n_vocab == len(set(text))
    assert tokenizer.decode(ids) == text == tokenizer.decode(ids.tolist())
    assert list(tokenizer.chars) == sorted(set(text))
    for dtype in (torch.int32, torch.int16, torch.int64):
        assert tokenizer.decode(ids.to(dtype)) == text
    if other not in tokenizer.chars:
        with pytest.raises(ValueError) as error:
            tokenizer.encode(text + other)
        assert repr(other) in str(error.value)


@PROPERTY
@given(
    ids=st.one_of(
        st.lists(st.integers(-3, 8), max_size=5),
        st.lists(st.sampled_from([0, 1, 2.0, 1.5, True, None, "a", np.int64(1)]), max_size=4),
        st.sampled_from(
            [
                "torch float",
                "torch bool",
                "torch 2-D",
                "torch uint8",
                "torch int8",
                "string",
                "bytes",
            ]
        ),
    )
)
def test_decode_gives_text_or_names_ids(ids):
    """Token ids are integers in [0, n_vocab): bool, float and 2-D ids are refused, never
    decoded as if they were integers."""
    tokenizer = CharTokenizer("abcde")
    if isinstance(ids, str):
        ids = {
            "torch float": torch.tensor([0.0, 1.0]),
            "torch bool": torch.tensor([True, False]),
            "torch 2-D": torch.tensor([[0, 1]]),
            "torch uint8": torch.tensor([0, 4], dtype=torch.uint8),
            "torch int8": torch.tensor([1, -1], dtype=torch.int8),
            "string": "ab",
            "bytes": b"ab",
        }[ids]
    values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    valid = (
        not isinstance(ids, (str, bytes))
        and not (
            isinstance(ids, torch.Tensor)
            and (ids.dim() != 1 or ids.dtype in (torch.bool, torch.float32))
        )
        and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < 5
            for i in values
        )
    )
    text = outcome(lambda: tokenizer.decode(ids), [] if valid else ["ids"])
    if text is not None:
        assert text == "".join("abcde"[i] for i in values)


@PROPERTY
@given(
    chars=st.sampled_from(["abc", "a", "", "aab", b"abc", ["a", "b"], None, 3]),
    text=st.sampled_from(["cab", "", "ba", b"hello", None, ["a"], 7]),
)
def test_the_tokenizer_names_a_wrong_argument(chars, text):
    built = outcome(
        lambda: CharTokenizer(chars),
        [] if isinstance(chars, str) and chars and len(set(chars)) == len(chars) else ["chars"],
    )
    if built is not None:
        if not isinstance(text, str):
            problems = ["text"]
        else:  # a character outside the vocabulary is named
            problems = [repr(c) for c in text if c not in chars][:1]
        encoded = outcome(lambda: built.encode(text), problems)
        if encoded is not None:
            assert built.decode(encoded) == text
    outcome(lambda: CharTokenizer.fit(text), [] if isinstance(text, str) and text else ["text"])


@PROPERTY
@given(n=st.integers(2, 20), data=st.data())
def test_batches_are_windows_of_the_text_or_name_the_wrong_argument(n, data):
    args, wrong = arguments(
        data,
        {
            "ids": (
                st.sampled_from(["int64", "int32"]),
                st.sampled_from(["float", "bool", "2-D", "list"]),
            ),
            "seed": (
                st.sampled_from([0, 5, np.int64(3)]),
                st.sampled_from([-1, 2.5, None, "1", True]),
            ),
        },
    )
    ids = {
        "int64": torch.arange(n),
        "int32": torch.arange(n, dtype=torch.int32),
        "float": torch.arange(n, dtype=torch.float32),
        "bool": torch.arange(n) % 2 == 0,
        "2-D": torch.arange(n)[None],
        "list": list(range(n)),
    }[args["ids"]]
    sampler = outcome(lambda: BatchSampler(ids, seed=args["seed"]), wrong)
    if sampler is None:
        return
    seq_len = (st.integers(1, n - 1), st.sampled_from([0, -2, 1.5, n, n + 5]))
    step = (st.sampled_from([0, 3, 10**6, np.int64(2)]), st.sampled_from([1.5, None, "1"]))
    args, wrong = arguments(data, {"step": step, "batch": SIZE, "seq_len": seq_len})
    drawn = outcome(lambda: sampler.batch(**args), wrong)
    if drawn is not None:
        x, y = drawn
        assert x.shape == y.shape == (args["batch"], args["seq_len"])
        assert torch.equal(y - x, torch.ones_like(x))  # windows of arange, shifted by one
        again = sampler.batch(**args)
        assert torch.equal(again[0], x) and torch.equal(again[1], y)
    args, wrong = arguments(data, {"seq_len": seq_len, "count": SIZE})
    windows = outcome(lambda: sampler.windows(**args), wrong)
    if windows is not None:
        x, y = windows
        assert x.shape == y.shape == (args["count"], args["seq_len"])
        assert torch.equal(y - x, torch.ones_like(x))


# --- The Stack: reads equal torch.cat of what was appended, gradients included


@PROPERTY
@given(
    blocks=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    row=st.sampled_from([(), (3,), (2, 2)]),
    spare=st.integers(0, 2),
    starts=st.lists(st.integers(0, 20), min_size=5, max_size=5),
    seed=SEEDS,
)
def test_stack_reads_equal_the_concatenation_and_so_do_their_gradients(
    blocks, row, spare, starts, seed
):
    gen = torch.Generator().manual_seed(seed)
    appended = [
        torch.randn(k, *row, dtype=torch.float64, generator=gen, requires_grad=True) for k in blocks
    ]
    stack = fl.Stack(sum(blocks) + spare)
    reads, expected = [], []
    for i, block in enumerate(appended):
        stack.append(block * 2)
        start = starts[i] % len(stack)
        reads.append(stack.get(start))
        expected.append(torch.cat([b * 2 for b in appended[: i + 1]])[start:])
    for got, want in zip(reads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    weights = [torch.randn(r.shape, dtype=torch.float64, generator=gen) for r in reads]
    grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(reads, weights)), appended)
    grads_ref = torch.autograd.grad(sum((r * w).sum() for r, w in zip(expected, weights)), appended)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(IndexError, match="start"):
        stack.get(len(stack))
    with pytest.raises(ValueError, match="block"):
        stack.append(torch.zeros(1, *row, 5))


@PROPERTY
@given(data=st.data())
def test_a_stack_is_built_or_names_its_capacity(data):
    args, wrong = arguments(data, {"capacity": SIZE})
    stack = outcome(lambda: fl.Stack(**args), wrong)
    if stack is not None:
        assert stack.capacity == args["capacity"] and len(stack) == 0
