"""The two forms of the position scores (chapter 2): labml's A+B+C+S_j and the paper's q.k + q.p."""

import math

import feedback_lib as fl
import pytest
import torch
from feedback_lib import fast
from feedback_lib.baselines.span import SpanTransformerLM, span_scores
from feedback_lib.model.scores import relative_scores


def test_paper_form_is_q_dot_k_plus_q_dot_p_computed_directly():
    torch.manual_seed(0)
    attn = fl.FeedbackAttention(2, 8, 0.0, positions="paper").double()
    query = torch.randn(3, 8, dtype=torch.double)
    memory = torch.randn(5, 3, 8, dtype=torch.double)
    out, weights = attn(query, memory, memory, need_weights=True)
    # By hand, head by head: score_j = q.k_j + q.p_(m-j), p one table for all heads.
    q = attn.query(query)  # [batch, heads, d_k]
    k = attn.key(memory)  # [m, batch, heads, d_k]
    v = attn.value(memory)
    table = attn.key_pos_embeddings[:, 0]  # [P, d_k]; row P - d is distance d
    m = len(memory)
    for b in range(3):
        for h in range(2):
            scores = torch.stack(
                [q[b, h] @ k[j, b, h] + q[b, h] @ table[attn.P - (m - j)] for j in range(m)]
            )
            w = torch.softmax(scores / math.sqrt(4), 0)
            torch.testing.assert_close(weights[:, b, h], w)
            head = (w[:, None] * v[:, b, h]).sum(0)
            assert torch.allclose(head, (weights[:, b, h, None] * v[:, b, h]).sum(0))
    assert out.shape == (3, 8)


def test_paper_form_parameters_and_labml_default_unchanged():
    paper = fl.FeedbackAttention(4, 16, positions="paper")
    names = dict(paper.named_parameters())
    assert names["key_pos_embeddings"].shape == (paper.P, 1, 4)  # shared by the heads
    assert "key_pos_bias" not in names and "query_pos_bias" not in names
    assert "key_pos_bias" not in paper.state_dict()  # zero buffers, not saved
    assert paper.key_pos_embeddings.std() > 0.5  # standard normal, as the authors
    labml = fl.FeedbackAttention(4, 16)
    assert labml.positions == "labml"
    assert {n for n, _ in labml.named_parameters()} >= {
        "key_pos_embeddings",
        "key_pos_bias",
        "query_pos_bias",
    }
    with pytest.raises(ValueError, match="positions must be one of"):
        fl.FeedbackAttention(4, 16, positions="xl")
    with pytest.raises(ValueError, match="positions must be one of"):
        fl.FeedbackLM(10, d_model=16, heads=4, n_layers=1, d_ff=8, positions=None)


@pytest.mark.parametrize("shared_kv", [False, True])
def test_paper_form_runs_in_every_loop_and_the_fused_one_is_equal(shared_kv):
    torch.manual_seed(1)
    lm = fl.FeedbackLM(
        12, d_model=16, heads=2, n_layers=2, d_ff=32, shared_kv=shared_kv, positions="paper"
    ).double()
    for p in lm.parameters():
        torch.nn.init.normal_(p, std=0.3)
    tokens = torch.randint(0, 12, (3, 7))
    assert fast.can_fuse(lm.transformer) == shared_kv
    out = lm(tokens)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    lm.transformer.fused = False  # the readable loop
    readable = lm(tokens)
    readable.sum().backward()
    torch.testing.assert_close(out, readable)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_span_scores_equal_the_one_query_scores_in_both_forms():
    torch.manual_seed(2)
    for positions in ("paper", "labml"):
        attn = fl.FeedbackAttention(2, 16, positions=positions).double()
        for p in attn.parameters():
            torch.nn.init.normal_(p)
        span, seq, n = 3, 4, 9
        q = torch.randn(seq, 2, 2, 8, dtype=torch.double)
        k = torch.randn(n, 2, 2, 8, dtype=torch.double)
        scores, allowed = span_scores(attn, q, k, span)
        for i in range(seq):
            t = n - seq + i  # the query's position
            lo = max(0, t - span)
            assert allowed[0, 0, i].nonzero().flatten().tolist() == list(range(lo, t))
            tables = attn.position_tables(span).last(t - lo)
            expected = relative_scores(q[i], k[lo:t], attn.query_pos_bias, tables)
            torch.testing.assert_close(scores[:, :, i, lo:t].permute(2, 0, 1), expected)


def span_model(n_layers=2, span=3):
    torch.manual_seed(3)
    model = SpanTransformerLM(20, d_model=16, heads=2, n_layers=n_layers, d_ff=32, span=span)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.double()


def test_span_transformer_in_segments_equals_one_call():
    model = span_model()
    tokens = torch.randint(0, 20, (2, 11))
    whole = model(tokens)
    a, memory = model(tokens[:, :4], return_memory=True)
    assert [len(t) for t in memory.tensors] == [3, 3]  # the last span inputs of each layer
    b, memory = model(tokens[:, 4:5], memory, return_memory=True)
    c = model(tokens[:, 5:], memory)
    torch.testing.assert_close(torch.cat([a, b, c], 1), whole)


def test_span_transformer_sees_exactly_layers_times_span_back():
    model = span_model(n_layers=2, span=3)  # receptive field 6
    tokens = torch.randint(0, 20, (1, 12))
    base = model(tokens)[0]
    changed = tokens.clone()
    changed[0, 2] = (tokens[0, 2] + 1) % 20
    moved = model(changed)[0]
    differs = (moved - base).abs().amax(-1) > 1e-9
    assert differs.nonzero().flatten().tolist() == list(range(2, 2 + 6 + 1))


def test_span_transformer_checks_its_memory():
    model = span_model()
    _, memory = model(torch.zeros(2, 3, dtype=torch.long), return_memory=True)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(3, 2, dtype=torch.long), memory)
    other = span_model(n_layers=3)
    with pytest.raises(TypeError, match="memory must be what this model returned"):
        other(torch.zeros(2, 2, dtype=torch.long), memory)
    with pytest.raises(ValueError, match="span must be at most"):
        SpanTransformerLM(5, d_model=8, heads=2, n_layers=1, d_ff=8, span=10**6)
