"""Every kind of bad input raises an error that names the argument and what was expected."""

import feedback_lib as fl
import numpy as np
import pytest
import torch

from helpers import D_MODEL, make_lm, make_transformer


@pytest.fixture
def attn():
    return fl.FeedbackAttention(4, 16, 0.0)


def test_d_model_not_divisible_by_heads():
    with pytest.raises(
        ValueError, match=r"d_model must be divisible by heads, got d_model=10, heads=4"
    ):
        fl.FeedbackAttention(4, 10)
    with pytest.raises(ValueError, match="divisible"):
        fl.FeedbackLM(5, d_model=10, heads=3, n_layers=1, d_ff=8)


@pytest.mark.parametrize(
    "bad",
    [
        dict(heads=0),
        dict(d_model=-1),
        dict(n_layers=0),
        dict(d_ff=2.5),
        dict(dropout=1.5),
        dict(mem_len=0),
        dict(mem_len=5000),
    ],
)
def test_bad_constructor_values(bad):
    args = dict(n_vocab=5, d_model=8, heads=2, n_layers=1, d_ff=8) | bad
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        fl.FeedbackLM(args.pop("n_vocab"), **args)


@pytest.mark.parametrize(
    "which, shape, message",
    [
        (
            "query",
            (2, 3, 16),
            r"query must have shape \[batch, d_model=16\] \(2 dimensions\), got shape \[2, 3, 16\]",
        ),
        (
            "query",
            (2, 8),
            r"query must have shape \[batch, d_model=16\], got \[2, 8\] \(d_model is 8, expected 16\)",
        ),
        ("key", (5, 16), r"key must have shape \[seq_len, batch, d_model=16\]"),
        (
            "value",
            (5, 2, 12),
            r"value must have shape \[seq_len, batch, d_model=16\], got \[5, 2, 12\]",
        ),
    ],
)
def test_wrong_rank_or_shape(attn, which, shape, message):
    inputs = dict(query=torch.randn(2, 16), key=torch.randn(5, 2, 16), value=torch.randn(5, 2, 16))
    inputs[which] = torch.randn(shape)
    with pytest.raises(ValueError, match=message):
        attn(**inputs)


def test_precomputed_key_must_be_split_into_heads():
    attn = fl.FeedbackAttention(4, 16, is_kv_precomputed=True)
    with pytest.raises(ValueError, match=r"key must have shape \[seq_len, batch, heads=4, d_k=4\]"):
        attn(torch.randn(2, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16))


def test_not_a_tensor(attn):
    with pytest.raises(
        TypeError, match=r"query must be a torch.Tensor of shape \[batch, d_model\], got list"
    ):
        attn([[0.0] * 16], torch.randn(5, 1, 16), torch.randn(5, 1, 16))


def test_batch_of_query_and_memory_differ(attn):
    with pytest.raises(
        ValueError,
        match="batch sizes differ: query has batch 3, key has batch 2, value has batch 2",
    ):
        attn(torch.randn(3, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16))


def test_key_and_value_lengths_differ(attn):
    with pytest.raises(ValueError, match="same seq_len, got 5 and 4"):
        attn(torch.randn(2, 16), torch.randn(5, 2, 16), torch.randn(4, 2, 16))


def test_memory_longer_than_4096(attn):
    long = torch.zeros(fl.MAX_POSITIONS + 1, 1, 16)
    with pytest.raises(
        ValueError, match="4097 steps but FeedbackAttention has only 4096 relative positions"
    ):
        attn(torch.zeros(1, 16), long, long)
    model = make_transformer(True)
    with pytest.raises(ValueError, match="attend to a memory of 4097 steps.*set mem_len <= 4096"):
        model(torch.zeros(fl.MAX_POSITIONS + 2, 1, D_MODEL))


def test_memory_longer_than_4096_across_calls():
    lm = make_lm()
    _, memory = lm(torch.zeros(1, 3, dtype=torch.long), return_memory=True)
    full = fl.FeedbackMemory(
        tuple(t[:1].expand(fl.MAX_POSITIONS, -1, -1, -1) for t in memory.tensors), memory.signature
    )
    with pytest.raises(ValueError, match="memory of 4097 steps"):
        lm(torch.zeros(1, 2, dtype=torch.long), full)


@pytest.mark.parametrize("bad_id", [-1, 11, 100])
def test_token_ids_outside_the_vocabulary(bad_id):
    lm = make_lm()
    tokens = torch.zeros(2, 4, dtype=torch.long)
    tokens[1, 2] = bad_id
    with pytest.raises(
        ValueError, match=rf"tokens holds id {bad_id}, outside the vocabulary \[0, 11\)"
    ):
        lm(tokens)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.generate(tokens, 3)


def test_tokens_wrong_rank_or_dtype():
    lm = make_lm()
    with pytest.raises(
        ValueError, match=r"tokens must have shape \[batch, seq\] \(2 dimensions\), got shape \[5\]"
    ):
        lm(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids.*torch.float32"):
        lm(torch.zeros(1, 5))
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.bool):  # nn.Embedding takes none
        for model in (
            lm,
            fl.ParallelLM(10, d_model=D_MODEL, heads=2, n_layers=1, d_ff=32, max_len=8),
        ):
            with pytest.raises(TypeError, match=f"integer token ids.*{dtype}"):
                model(torch.zeros(1, 5, dtype=dtype))
        with pytest.raises(TypeError, match=f"prompt must hold integer token ids.*{dtype}"):
            lm.generate(torch.zeros(1, 5, dtype=dtype), 1)


@pytest.mark.parametrize("call", ["lm", "transformer", "attention"])
def test_empty_sequence(call):
    if call == "lm":
        with pytest.raises(ValueError, match=r"tokens has an empty seq axis \(shape \[2, 0\]\)"):
            make_lm()(torch.zeros(2, 0, dtype=torch.long))
    elif call == "transformer":
        with pytest.raises(ValueError, match=r"x_seq has an empty seq_len axis"):
            make_transformer(False)(torch.zeros(0, 2, D_MODEL))
    else:
        with pytest.raises(ValueError, match=r"key has an empty seq_len axis"):
            fl.FeedbackAttention(4, 16)(
                torch.zeros(2, 16), torch.zeros(0, 2, 16), torch.zeros(0, 2, 16)
            )


def test_memory_from_another_configuration():
    _, memory = make_lm(n_vocab=11)(torch.zeros(1, 3, dtype=torch.long), return_memory=True)
    other = fl.FeedbackLM(11, d_model=16, heads=4, n_layers=3, d_ff=32)
    with pytest.raises(
        ValueError,
        match=r"memory was made by a model with configuration "
        r"\('FeedbackTransformerKV', 2, 16, 4\), but this model is "
        r"\('FeedbackTransformerKV', 3, 16, 4\)",
    ):
        other(torch.zeros(1, 2, dtype=torch.long), memory)
    with pytest.raises(ValueError, match="FeedbackTransformer'"):
        make_lm(shared_kv=False)(torch.zeros(1, 2, dtype=torch.long), memory)
    with pytest.raises(TypeError, match="memory must be a FeedbackMemory"):
        make_lm()(torch.zeros(1, 2, dtype=torch.long), memory.tensors[0])
    with pytest.raises(ValueError, match="the input has batch 2, memory has batch 1"):
        make_lm()(torch.zeros(2, 2, dtype=torch.long), memory)


@pytest.mark.parametrize(
    "tensors, message",
    [
        (lambda k, v: (), r"memory must hold 2 tensor\(s\) \(key, value\), got 0"),
        (lambda k, v: (k,), r"memory must hold 2 tensor\(s\)"),
        (lambda k, v: (k, v[:2]), r"memory tensors have different lengths \[2, 3\]"),
        (
            lambda k, v: (k[..., :2], v),
            r"memory \(key\) must have shape \[length, batch, heads=4, d_k=4\]",
        ),
        (lambda k, v: (k[:0], v[:0]), r"memory \(key\) has an empty length axis"),
    ],
)
def test_hand_built_memory_is_checked(tensors, message):
    lm = make_lm()
    _, memory = lm(torch.zeros(1, 3, dtype=torch.long), return_memory=True)
    bad = fl.FeedbackMemory(tensors(*memory.tensors), memory.signature)
    with pytest.raises(ValueError, match=message):
        lm(torch.zeros(1, 2, dtype=torch.long), bad)


def test_dtype_mismatch(attn):
    with pytest.raises(
        TypeError,
        match="query has dtype torch.float64 but the module's parameters are torch.float32",
    ):
        attn(torch.randn(2, 16, dtype=torch.float64), torch.randn(5, 2, 16), torch.randn(5, 2, 16))
    with pytest.raises(TypeError, match="x_seq has dtype torch.float16"):
        make_transformer(True)(torch.randn(3, 1, D_MODEL, dtype=torch.float16))
    lm = make_lm()
    _, memory = lm(torch.zeros(1, 3, dtype=torch.long), return_memory=True)
    half = fl.FeedbackMemory(tuple(t.half() for t in memory.tensors), memory.signature)
    with pytest.raises(TypeError, match=r"memory \(key\) has dtype torch.float16"):
        lm(torch.zeros(1, 2, dtype=torch.long), half)


def test_autocast_accepts_its_own_dtype_only(attn):
    q, k = torch.randn(2, 16), torch.randn(5, 2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(q.bfloat16(), k, k)
        with pytest.raises(TypeError, match="query has dtype torch.float64"):
            attn(q.double(), k, k)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attn(q, k, k), atol=0.1, rtol=0.1)


def test_device_mismatch(attn):
    meta = torch.empty(2, 16, device="meta")
    with pytest.raises(
        ValueError, match="query is on device meta but the module's parameters are on cpu"
    ):
        attn(meta, torch.randn(5, 2, 16), torch.randn(5, 2, 16))
    with pytest.raises(ValueError, match="tokens is on device meta but the model is on cpu"):
        make_lm()(torch.zeros(1, 3, dtype=torch.long, device="meta"))


def test_bad_sampling_arguments():
    lm = make_lm()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        lm.generate(prompt, 2, temperature=float("nan"))
    with pytest.raises(TypeError, match="generator must be None or a torch.Generator, got int"):
        lm.generate(prompt, 2, generator=0)
    with pytest.raises(TypeError, match="prompt must hold integer token ids"):
        lm.generate(prompt.float(), 2)
    with pytest.raises(
        ValueError, match=r"logits must have shape \[batch, n_vocab\] \(2 dimensions\)"
    ):
        fl.sample_next_token(torch.zeros(5), top_k=2)
    with pytest.raises(ValueError, match="needs a memory of 4097 steps"):
        lm.generate(prompt, fl.MAX_POSITIONS + 1)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        lm.generate(prompt, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be None or an integer >= 1, got 0"):
        lm.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        lm.generate(prompt, 0)


def test_sampling_takes_numpy_numbers():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert fl.sample_next_token(logits, np.float32(0.5), np.int64(1)).item() == 1
    assert fl.sample_next_token(logits, np.float64(0), None).item() == 1
    assert make_lm().generate(torch.zeros(1, 2, dtype=torch.long), np.int64(2)).shape == (1, 4)


def test_an_infinite_logit_is_certain():
    inf = float("inf")
    logits = torch.tensor([[0.0, inf, 1.0, inf], [0.0, 1.0, inf, -inf]])
    for temperature, top_k in [(1.0, None), (0.01, 2), (100.0, 3), (0, None)]:
        for seed in range(5):
            g = torch.Generator().manual_seed(seed)
            picked = fl.sample_next_token(logits, temperature, top_k, generator=g)[:, 0]
            assert picked[0].item() in (1, 3) and picked[1].item() == 2


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_logits_no_token_can_come_from(temperature):
    nan, inf = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"logits has NaN in row\(s\) \[1\]"):
        fl.sample_next_token(torch.tensor([[0.0, 1.0], [nan, 1.0]]), temperature)
    with pytest.raises(ValueError, match=r"logits has only -inf in row\(s\) \[0\]"):
        fl.sample_next_token(torch.tensor([[-inf, -inf], [0.0, 1.0]]), temperature)
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        fl.sample_next_token(torch.tensor([[0, 1]]), temperature)


def test_a_memory_window_bounds_what_a_decoder_allocates():
    """With mem_len, a decoder's buffers hold a window of the memory, not
    its capacity: a decoder for 10**12 tokens works, and its steps slide
    the window (also past a read larger than the buffer) exactly as one
    forward call attends."""
    torch.manual_seed(0)
    lm = fl.FeedbackLM(10, d_model=16, heads=2, n_layers=2, d_ff=32, mem_len=4).double().eval()
    decoder = lm.decoder(1, 10**12)
    assert decoder.fused is not None and decoder.step(
        torch.zeros(1, 3, dtype=torch.long)
    ).shape == (1, 10)
    assert len(decoder.fused.keys) == 8
    tokens = torch.randint(0, 10, (2, 40))
    with torch.no_grad():
        full = lm(tokens)
    decoder = lm.decoder(2, 40)
    ends = [3, *range(4, 12), 19, *range(20, 30), 35, *range(36, 41)]  # reads of 8 and 6 grow it
    for start, end in zip([0, *ends], ends):
        logits = decoder.step(tokens[:, start:end])
        torch.testing.assert_close(logits, full[:, end - 1], atol=1e-10, rtol=0)
    assert len(decoder.fused.keys) == 12


def test_transformer_rejects_the_wrong_attention_kind():
    layer = fl.FeedbackTransformerLayer(
        d_model=16,
        attn=fl.FeedbackAttention(4, 16),
        feed_forward=fl.FeedForward(16, 32),
        dropout_prob=0.0,
    )
    with pytest.raises(ValueError, match="is_kv_precomputed=True"):
        fl.FeedbackTransformerKV(layer, 2, 16, 4)
    with pytest.raises(
        ValueError, match="attn was built for d_model=16 but the layer has d_model=8"
    ):
        fl.FeedbackTransformerLayer(
            d_model=8,
            attn=fl.FeedbackAttention(4, 16),
            feed_forward=fl.FeedForward(8, 8),
            dropout_prob=0.0,
        )
    with pytest.raises(
        ValueError, match="feed_forward was built for d_model=32 but the layer has d_model=16"
    ):
        fl.FeedbackTransformerLayer(
            d_model=16,
            attn=fl.FeedbackAttention(4, 16),
            feed_forward=fl.FeedForward(32, 64),
            dropout_prob=0.0,
        )


def test_flags_must_be_booleans():
    with pytest.raises(TypeError, match="is_kv_precomputed must be True or False, got 'no'"):
        fl.FeedbackAttention(4, 16, 0.0, is_kv_precomputed="no")
    with pytest.raises(TypeError, match="shared_kv must be True or False, got 'no'"):
        fl.FeedbackLM(5, d_model=8, heads=2, n_layers=1, d_ff=8, shared_kv="no")
    with pytest.raises(TypeError, match="return_memory must be True or False"):
        make_lm()(torch.zeros(1, 2, dtype=torch.long), return_memory="no")
    with pytest.raises(ValueError, match="capacity must be a positive integer"):
        fl.NaiveStack(0)


def test_layer_errors_name_its_argument():
    layer = make_transformer(False).layers[0]
    with pytest.raises(ValueError, match="batch sizes differ: query has batch 3, key has batch 2"):
        layer(torch.randn(3, D_MODEL), torch.randn(4, 2, D_MODEL), torch.randn(4, 2, D_MODEL))
    with pytest.raises(ValueError, match="key and value must both be given"):
        layer(torch.randn(3, D_MODEL), torch.randn(4, 3, D_MODEL))
