"""Cross-attention to an encoder's context (chapter 11) and the sequence-reversal demo."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import feedback_lib as fl  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from feedback_lib import fast  # noqa: E402
from feedback_lib.book import plots  # noqa: E402
from feedback_lib.tasks import reversal  # noqa: E402
from torch import nn  # noqa: E402

from helpers import D_FF, D_MODEL, HEADS, N_LAYERS  # noqa: E402

VARIANTS = pytest.mark.parametrize("shared_kv", [False, True], ids=["per-layer-kv", "shared-kv"])
N_VOCAB, CONTEXT_LEN = 11, 5


def make_cross_lm(shared_kv: bool = True, seed: int = 0) -> fl.FeedbackLM:
    torch.manual_seed(seed)
    lm = fl.FeedbackLM(
        N_VOCAB,
        d_model=D_MODEL,
        heads=HEADS,
        n_layers=N_LAYERS,
        d_ff=D_FF,
        shared_kv=shared_kv,
        cross_attention=True,
    )
    return fl.randomize_parameters_(lm, seed=seed).eval()


def context_and_mask(batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random context ``[batch, CONTEXT_LEN, D_MODEL]``; row b has its last b positions padded."""
    context = torch.randn(
        batch, CONTEXT_LEN, D_MODEL, generator=torch.Generator().manual_seed(seed)
    )
    mask = (
        torch.arange(CONTEXT_LEN) >= CONTEXT_LEN - torch.arange(batch)[:, None]
    )  # [batch, CONTEXT_LEN]
    return context, mask


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_cross_attention_equals_pytorch_multihead_attention():
    torch.manual_seed(0)
    cross = fl.CrossAttention(HEADS, D_MODEL)
    reference = nn.MultiheadAttention(D_MODEL, HEADS)
    q, k, v = (cross.query.linear, cross.key.linear, cross.value.linear)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        reference.in_proj_bias.copy_(torch.cat([q.bias, torch.zeros(D_MODEL), v.bias]))
        reference.out_proj.load_state_dict(cross.output.state_dict())
    x = torch.randn(3, D_MODEL)
    context, mask = context_and_mask()
    context = context.transpose(0, 1)  # [CONTEXT_LEN, batch, D_MODEL]
    out, weights = cross(x, context, mask, need_weights=True)
    expected, expected_weights = reference(
        x[None], context, context, key_padding_mask=mask, average_attn_weights=False
    )
    torch.testing.assert_close(out, expected[0])
    torch.testing.assert_close(
        weights, expected_weights[:, :, 0].permute(2, 0, 1)
    )  # [CONTEXT_LEN, batch, heads]
    assert torch.all(weights[mask.t()] == 0)


@VARIANTS
def test_padded_context_positions_are_ignored(shared_kv):
    lm = make_cross_lm(shared_kv)
    tokens = torch.randint(0, N_VOCAB, (3, 6))
    context, mask = context_and_mask()
    changed = context.masked_fill(mask[..., None], 100.0)  # new values where padded only
    logits = lm(tokens, context=context, context_padding_mask=mask)
    torch.testing.assert_close(lm(tokens, context=changed, context_padding_mask=mask), logits)
    for value in (float("nan"), float("inf"), -float("inf")):  # whatever padding holds
        odd = context.masked_fill(mask[..., None], value)
        torch.testing.assert_close(lm(tokens, context=odd, context_padding_mask=mask), logits)
        torch.testing.assert_close(
            lm.generate(tokens, 2, 0, context=odd, context_padding_mask=mask),
            lm.generate(tokens, 2, 0, context=context, context_padding_mask=mask),
        )
    assert not torch.allclose(lm(tokens, context=changed), logits)  # without the mask they matter
    maps = fl.cross_attention_maps(lm, tokens, context, mask)  # [n_layers, batch, heads, seq, ctx]
    assert maps.shape == (N_LAYERS, 3, HEADS, 6, CONTEXT_LEN)
    assert torch.all(maps.permute(1, 4, 0, 2, 3)[mask] == 0)
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))


def test_maps_leave_the_model_as_it_was():
    lm = make_cross_lm().train()
    context, _ = context_and_mask()
    fl.cross_attention_maps(lm, torch.randint(0, N_VOCAB, (3, 4)), context)
    assert lm.training
    assert all("attend" not in layer.cross_attn.__dict__ for layer in lm.transformer.layers)


@VARIANTS
def test_gradients_reach_the_context_and_every_cross_attention_parameter(shared_kv):
    lm = make_cross_lm(shared_kv)
    context, mask = context_and_mask()
    context.requires_grad_()
    lm(
        torch.randint(0, N_VOCAB, (3, 4)), context=context, context_padding_mask=mask
    ).sum().backward()
    assert context.grad[~mask].abs().sum(-1).gt(0).all()  # every real position gets a gradient
    assert torch.all(context.grad[mask] == 0)
    cross = [(name, p) for name, p in lm.named_parameters() if "cross" in name]
    assert len(cross) == N_LAYERS * 9  # 7 in CrossAttention, 2 in its norm
    for name, p in cross:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_the_first_step_reads_the_context():
    lm = make_cross_lm()
    tokens = torch.randint(0, N_VOCAB, (3, 1))
    context, _ = context_and_mask()
    assert not torch.allclose(lm(tokens, context=context), lm(tokens, context=context + 1))


@VARIANTS
def test_greedy_generation_with_a_context_equals_argmax_of_full_forward(shared_kv):
    lm = make_cross_lm(shared_kv)
    context, mask = context_and_mask()
    prompt = torch.randint(0, N_VOCAB, (3, 2))
    out = lm.generate(prompt, 6, temperature=0, context=context, context_padding_mask=mask)
    full = lm(out, context=context, context_padding_mask=mask)
    assert torch.equal(out[:, 2:], full[:, 1:-1].argmax(-1))


@VARIANTS
def test_chunked_calls_with_a_context_equal_one_call(shared_kv):
    lm = make_cross_lm(shared_kv)
    context, mask = context_and_mask()
    tokens = torch.randint(0, N_VOCAB, (3, 9))
    whole = lm(tokens, context=context, context_padding_mask=mask)
    pieces, memory = [], None
    for chunk in tokens.split([4, 1, 4], dim=1):
        logits, memory = lm(chunk, memory, True, context=context, context_padding_mask=mask)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-5)


@VARIANTS
def test_the_decoder_projects_the_context_once(shared_kv, monkeypatch):
    lm = make_cross_lm(shared_kv)
    context, mask = context_and_mask()
    prepare = fl.model.cross_attention.CrossAttention.prepare
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(self)
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(fl.model.cross_attention.CrossAttention, "prepare", counted)
    lm.generate(torch.randint(0, N_VOCAB, (3, 2)), 6, 0, context=context, context_padding_mask=mask)
    assert len(calls) == N_LAYERS  # once per layer for the whole generation, not per token


def test_a_prepared_context_gives_the_same_logits_and_is_checked():
    lm = make_cross_lm()
    context, mask = context_and_mask()
    tokens = torch.randint(0, N_VOCAB, (3, 4))
    with torch.no_grad():
        prepared = lm.transformer.prepare_context(context.transpose(0, 1), mask)
        torch.testing.assert_close(
            lm(tokens, context=prepared), lm(tokens, context=context, context_padding_mask=mask)
        )
    with pytest.raises(TypeError, match="tuple of 2 PreparedContext"):
        lm(tokens, context=prepared[:1])
    with pytest.raises(ValueError, match="context_padding_mask must be None"):
        lm(tokens, context=prepared, context_padding_mask=mask)
    with pytest.raises(ValueError, match="prepared context has batch 3, but the input has 2"):
        lm(tokens[:2], context=prepared)


def test_the_fused_loop_steps_aside_for_cross_attention():
    lm = make_cross_lm(shared_kv=True)
    assert fast.blocker(lm.transformer) == "the layers have cross-attention"
    context, mask = context_and_mask()
    assert lm.decoder(3, 8, context=context, context_padding_mask=mask).fused is None
    plain = fl.FeedbackLM(
        N_VOCAB, d_model=D_MODEL, heads=HEADS, n_layers=N_LAYERS, d_ff=D_FF
    ).eval()
    assert fast.blocker(plain.transformer) is None


def test_without_cross_attention_nothing_changes():
    plain = fl.FeedbackLM(N_VOCAB, d_model=D_MODEL, heads=HEADS, n_layers=N_LAYERS, d_ff=D_FF)
    assert plain.config["cross_attention"] is False
    assert not any("cross" in name for name in plain.state_dict())
    # A cross-attention block whose output projection is zero adds nothing: the model with it
    # computes what the plain model with the same other weights computes.
    lm = make_cross_lm()
    with torch.no_grad():
        for layer in lm.transformer.layers:
            layer.cross_attn.output.weight.zero_()
            layer.cross_attn.output.bias.zero_()
    missing, unexpected = plain.load_state_dict(lm.state_dict(), strict=False)
    assert not missing and unexpected and all("cross" in name for name in unexpected)
    tokens = torch.randint(0, N_VOCAB, (3, 6))
    context, mask = context_and_mask()
    torch.testing.assert_close(
        lm(tokens, context=context, context_padding_mask=mask), plain.eval()(tokens)
    )


def test_per_layer_copy_keeps_cross_attention():
    model = make_cross_lm(shared_kv=True).transformer
    copy = fl.per_layer_copy(model)
    x = torch.randn(6, 3, D_MODEL)
    context, mask = context_and_mask()
    context = context.transpose(0, 1)
    torch.testing.assert_close(
        copy(x, context=context, context_padding_mask=mask),
        model(x, context=context, context_padding_mask=mask),
        atol=1e-5,
        rtol=1e-5,
    )


def test_a_layer_called_on_its_own():
    layer = make_cross_lm().transformer.layers[0]
    x, (context, mask) = torch.randn(3, D_MODEL), context_and_mask()
    prepared = layer.cross_attn.prepare(context.transpose(0, 1), mask)
    assert layer(x, context=prepared).shape == (3, D_MODEL)
    # A context tensor is prepared by the cross-attention itself (no mask).
    unmasked = layer.cross_attn.prepare(context.transpose(0, 1))
    torch.testing.assert_close(
        layer(x, context=context.transpose(0, 1)), layer(x, context=unmasked)
    )
    with pytest.raises(ValueError, match="a layer with cross_attn needs a context"):
        layer(x)
    with pytest.raises(
        ValueError, match=r"context must have shape \[context_len, batch, d_model=16\]"
    ):
        layer(x, context=context[0])


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            dict(context=torch.randn(3, CONTEXT_LEN)),
            ValueError,
            r"context must have shape \[batch, context_len, d_model=16\] \(3 dimensions\)",
        ),
        (dict(context=torch.randn(3, CONTEXT_LEN, 8)), ValueError, r"d_model is 8, expected 16"),
        (
            dict(context=torch.randn(2, CONTEXT_LEN, D_MODEL)),
            ValueError,
            "batch sizes differ: tokens has batch 3, context has batch 2",
        ),
        (
            dict(context=torch.randn(3, CONTEXT_LEN, D_MODEL, dtype=torch.float64)),
            TypeError,
            "context has dtype",
        ),
        (
            dict(
                context=torch.randn(3, CONTEXT_LEN, D_MODEL),
                context_padding_mask=torch.zeros(3, 4, dtype=torch.bool),
            ),
            ValueError,
            r"context_padding_mask must have shape \[batch=3, context_len=5\]",
        ),
        (
            dict(
                context=torch.randn(3, CONTEXT_LEN, D_MODEL),
                context_padding_mask=torch.zeros(3, CONTEXT_LEN),
            ),
            TypeError,
            "context_padding_mask must be a bool tensor",
        ),
        (
            dict(
                context=torch.randn(3, CONTEXT_LEN, D_MODEL),
                context_padding_mask=torch.tensor([False, True, False])[:, None].expand(
                    3, CONTEXT_LEN
                ),
            ),
            ValueError,
            r"marks every position of batch row\(s\) \[1\] as padding",
        ),
        (
            dict(),
            ValueError,
            r"has cross-attention and needs a context.*FeedbackLM takes \[batch, context_len, d_model\]",
        ),
        (
            dict(context_padding_mask=torch.zeros(3, CONTEXT_LEN, dtype=torch.bool)),
            ValueError,
            "has cross-attention and needs a context",
        ),
    ],
)
def test_bad_context(change, error, message):
    lm = make_cross_lm()
    tokens = torch.randint(0, N_VOCAB, (3, 4))
    with pytest.raises(error, match=message):
        lm(tokens, **change)
    with pytest.raises(error, match=message.replace("tokens has", "the decoder has")):
        lm.generate(tokens, 2, **change)


def test_context_for_a_model_without_cross_attention():
    plain = fl.FeedbackLM(N_VOCAB, d_model=D_MODEL, heads=HEADS, n_layers=N_LAYERS, d_ff=D_FF)
    context, mask = context_and_mask()
    with pytest.raises(
        ValueError, match="context was given, but this model has no cross-attention"
    ):
        plain(torch.zeros(3, 2, dtype=torch.long), context=context)
    with pytest.raises(ValueError, match="context_padding_mask was given without a context"):
        plain(torch.zeros(3, 2, dtype=torch.long), context_padding_mask=mask)


def test_time_major_core_names_its_own_shapes():
    model = make_cross_lm().transformer
    with pytest.raises(
        ValueError, match=r"context must have shape \[context_len, batch, d_model=16\]"
    ):
        model(torch.randn(4, 3, D_MODEL), context=torch.randn(CONTEXT_LEN, 3))
    with pytest.raises(ValueError, match="x_seq has batch 3, context has batch 2"):
        model(torch.randn(4, 3, D_MODEL), context=torch.randn(CONTEXT_LEN, 2, D_MODEL))
    with pytest.raises(TypeError, match="cross_attn must be a CrossAttention"):
        fl.FeedbackTransformerLayer(
            d_model=D_MODEL,
            attn=fl.FeedbackAttention(HEADS, D_MODEL),
            feed_forward=fl.FeedForward(D_MODEL, D_FF),
            dropout_prob=0.0,
            cross_attn=nn.Linear(2, 2),
        )


def test_plot_cross_attention():
    lm = make_cross_lm()
    context, mask = context_and_mask()
    maps = fl.cross_attention_maps(lm, torch.randint(0, N_VOCAB, (3, 4)), context, mask)
    fig = plots.plot_cross_attention(maps, list("abcde"), list("wxyz"), batch=1)
    assert len(fig.axes) == N_LAYERS * HEADS + 1  # the panels and the colour bar
    with pytest.raises(ValueError, match="source_labels must be a sequence of 5 strings"):
        plots.plot_cross_attention(maps, list("abc"), list("wxyz"))
    with pytest.raises(
        ValueError, match=r"maps must be \[n_layers, batch, heads, seq, context_len\]"
    ):
        plots.plot_cross_attention(maps[0], list("abcde"), list("wxyz"))


def test_reversal_batches_are_deterministic_and_reversed():
    task = reversal.ReversalTask(n_symbols=6, min_len=2, max_len=7)
    a = task.batch(32, torch.Generator().manual_seed(3))
    b = task.batch(32, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))
    for source, pad, target in zip(a.source, a.source_padding_mask, a.target):
        symbols = source[~pad].tolist()
        assert 2 <= len(symbols) <= 7 and all(
            reversal.N_SPECIAL <= s < task.n_vocab for s in symbols
        )
        assert torch.all(source[pad] == reversal.PAD) and not pad[: len(symbols)].any()
        n = len(symbols)
        assert target[: n + 2].tolist() == [reversal.BOS, *symbols[::-1], reversal.EOS]
        assert torch.all(target[n + 2 :] == reversal.PAD)
    with pytest.raises(ValueError, match="min_len must be at most max_len"):
        reversal.ReversalTask(min_len=5, max_len=4)


def test_a_short_training_run_reduces_the_loss():
    task = reversal.ReversalTask(n_symbols=5, min_len=2, max_len=4)
    torch.manual_seed(0)
    model = reversal.EncoderDecoder(
        task.n_vocab,
        d_model=16,
        heads=2,
        encoder_layers=1,
        decoder_layers=1,
        d_ff=32,
        max_len=task.max_len,
    )
    losses = reversal.train(model, task, steps=40, batch_size=16, lr=1e-2, warmup_steps=5)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    held_out = task.batch(8, torch.Generator().manual_seed(99))
    assert 0.0 <= model.exact_match(held_out) <= 1.0
    output = model.greedy(held_out.source, held_out.source_padding_mask, 3)
    assert output.shape == (8, 4) and torch.all(output[:, 0] == reversal.BOS)


def test_is_exact_scores_up_to_eos_only():
    target = torch.tensor(
        [
            [reversal.BOS, 5, 4, reversal.EOS, reversal.PAD],
            [reversal.BOS, 6, reversal.EOS, reversal.PAD, reversal.PAD],
        ]
    )
    after_eos = target.clone()
    after_eos[:, -1] = 7  # what follows EOS is not scored
    assert reversal.is_exact(after_eos, target).tolist() == [True, True]
    wrong = after_eos.clone()
    wrong[0, 2] = 9  # a wrong symbol
    wrong[1, 2] = 9  # a missing EOS
    assert reversal.is_exact(wrong, target).tolist() == [False, False]
