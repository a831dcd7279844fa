"""Compatibility with labml.ai's reference implementation: the same seed gives the same weights,
labml's state_dicts load with strict=True, and the outputs and gradients agree.

``make setup`` installs labml and labml-nn (without its dependencies), so CI runs these tests;
``FEEDBACK_LIB_REQUIRE_LABML=1`` (set by ``make test``) turns a missing labml into a failure.
"""

import os

import feedback_lib as fl
import pytest
import torch
from torch import nn

from helpers import assert_same_outputs_and_gradients

if os.environ.get("FEEDBACK_LIB_REQUIRE_LABML") == "1":
    import labml_nn.transformers.feed_forward as ref_feed_forward
    import labml_nn.transformers.feedback as ref
else:
    ref = pytest.importorskip("labml_nn.transformers.feedback")
    ref_feed_forward = pytest.importorskip("labml_nn.transformers.feed_forward")
RefFeedForward = ref_feed_forward.FeedForward


def assert_same_state(ours: nn.Module, theirs: nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert a[name].shape == b[name].shape and torch.equal(a[name], b[name]), name


def test_attention_same_seed_same_weights_same_outputs():
    torch.manual_seed(3)
    ours = fl.FeedbackAttention(4, 32, 0.0)
    torch.manual_seed(3)
    theirs = ref.FeedbackAttention(4, 32, 0.0)
    assert_same_state(ours, theirs)
    fl.randomize_parameters_(ours)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    q, k, v = (torch.randn(3, 32), torch.randn(6, 3, 32), torch.randn(6, 3, 32))
    assert torch.equal(ours(q, k, v), theirs(query=q, key=k, value=v))


def build(module, ff_cls, shared_kv: bool, seed: int = 0):
    torch.manual_seed(seed)
    layer = module.FeedbackTransformerLayer(
        d_model=32,
        attn=module.FeedbackAttention(4, 32, 0.0, is_kv_precomputed=shared_kv),
        feed_forward=ff_cls(32, 64, 0.0),
        dropout_prob=0.0,
    )
    if shared_kv:
        return module.FeedbackTransformerKV(layer, 3, 32, 4)
    return module.FeedbackTransformer(layer, 3)


@pytest.mark.parametrize("shared_kv", [False, True])
def test_transformers_match_outputs_and_gradients(shared_kv):
    ours, theirs = (build(fl, fl.FeedForward, shared_kv), build(ref, RefFeedForward, shared_kv))
    assert_same_state(ours, theirs)
    fl.randomize_parameters_(ours, std=0.2)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same_outputs_and_gradients(ours, theirs, torch.randn(10, 2, 32), atol=1e-5, rtol=1e-4)


def test_language_model_loads_an_autoregressive_model_state():
    """labml's AutoregressiveModel is src_embed -> transformer -> generator, time-major."""
    theirs_transformer = build(ref, RefFeedForward, True, seed=5)
    theirs = nn.Module()
    theirs.src_embed = nn.Embedding(13, 32)
    theirs.transformer = theirs_transformer
    theirs.generator = nn.Linear(32, 13)
    torch.manual_seed(5)
    ours = fl.FeedbackLM(13, d_model=32, heads=4, n_layers=3, d_ff=64, dropout=0.0)
    # The same creation order: the same seed gives the same weights, under FeedbackLM's own names.
    renamed = {
        k.replace("src_embed.", "embed.").replace("generator.", "head."): v
        for k, v in theirs.state_dict().items()
    }
    assert list(ours.state_dict()) == list(renamed)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in renamed.items())
    fl.randomize_parameters_(theirs)
    ours.load_labml_state_dict(theirs.state_dict())
    tokens = torch.randint(0, 13, (2, 9))
    expected = theirs.generator(theirs.transformer(theirs.src_embed(tokens.t()))).transpose(0, 1)
    torch.testing.assert_close(ours(tokens), expected)
