"""FeedbackAttention: shapes, the numpy reference, the precomputed key/value path, dropout."""

import feedback_lib as fl
import numpy as np
import pytest
import torch


@pytest.mark.parametrize("precomputed", [False, True])
def test_numpy_reference_matches_torch(precomputed):
    attn = fl.randomize_parameters_(
        fl.FeedbackAttention(4, 24, 0.0, is_kv_precomputed=precomputed)
    ).double()
    gen = torch.Generator().manual_seed(1)
    kv_shape = (9, 3, 4, 6) if precomputed else (9, 3, 24)
    query = torch.randn(3, 24, generator=gen, dtype=torch.float64)
    key = torch.randn(kv_shape, generator=gen, dtype=torch.float64)
    value = torch.randn(kv_shape, generator=gen, dtype=torch.float64)
    expected = attn(query, key, value).detach().numpy()
    got = fl.feedback_attention_numpy(
        fl.attention_weights_numpy(attn), query.numpy(), key.numpy(), value.numpy()
    )
    assert got.shape == (3, 24)
    np.testing.assert_allclose(got, expected, atol=1e-10, rtol=0)


def test_numpy_reference_matches_float32_module():
    attn = fl.randomize_parameters_(fl.FeedbackAttention(2, 8, 0.0))
    q, k, v = torch.randn(2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    got = fl.feedback_attention_numpy(
        fl.attention_weights_numpy(attn), q.numpy(), k.numpy(), v.numpy()
    )
    np.testing.assert_allclose(got, attn(q, k, v).detach().numpy(), atol=1e-5)


def test_score_terms_sum_to_the_direct_product():
    """A + B + C + U^Q.U^K equals (Q + U^Q).(K_j + U^K_j), the product the decomposition starts from."""
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 2, 3, 4))
    u_q, u_k = rng.normal(size=(3, 4)), rng.normal(size=(5, 3, 4))
    d_full = np.einsum("hd,jhd->jh", u_q, u_k)
    terms = fl.score_terms_numpy(q, k, u_q, u_k, d_full)
    direct = np.einsum("bhd,jbhd->jbh", q + u_q, k + u_k[:, None])
    np.testing.assert_allclose(
        terms["A"] + terms["B"] + terms["C"] + terms["D"], direct, atol=1e-12
    )


def test_keywords_and_positional_agree_and_weights_sum_to_one():
    attn = fl.randomize_parameters_(fl.FeedbackAttention(4, 16, 0.0)).eval()
    q, k, v = (torch.randn(3, 16), torch.randn(6, 3, 16), torch.randn(6, 3, 16))
    out, weights = attn(query=q, key=k, value=v, need_weights=True)
    assert out.shape == (3, 16) and weights.shape == (6, 3, 4)
    torch.testing.assert_close(weights.sum(0), torch.ones(3, 4))
    assert torch.equal(out, attn(q, k, v))


def test_relative_positions_use_the_last_rows():
    """Entry j of a memory of length T uses position row P - T + j: the newest entry is always row P-1."""
    attn = fl.FeedbackAttention(1, 4, 0.0)
    with torch.no_grad():
        attn.key_pos_bias[-1] = 10.0  # S for "one step back" (scaled by 1/sqrt(d_k) = 1/2)
    q, k = torch.zeros(1, 4), torch.zeros(3, 1, 4)
    _, weights = attn(q, k, k, need_weights=True)
    assert weights[-1, 0, 0] > 0.9 and weights[0, 0, 0] < 0.05


def test_dropout_only_in_training():
    attn = fl.randomize_parameters_(fl.FeedbackAttention(4, 16, 0.5))
    q, k = torch.randn(3, 16), torch.randn(6, 3, 16)
    attn.eval()
    assert torch.equal(attn(q, k, k), attn(q, k, k))
    attn.train()
    torch.manual_seed(0)
    _, w = attn(q, k, k, need_weights=True)
    assert (w == 0).any()


def test_precomputed_path_equals_projecting_first():
    full = fl.randomize_parameters_(fl.FeedbackAttention(4, 16, 0.0))
    pre = fl.FeedbackAttention(4, 16, 0.0, is_kv_precomputed=True)
    pre.load_state_dict(
        {k: v for k, v in full.state_dict().items() if not k.startswith(("key.", "value."))}
    )
    q, m = torch.randn(2, 16), torch.randn(5, 2, 16)
    torch.testing.assert_close(pre(q, full.key(m), full.value(m)), full(q, m, m))
