"""Fast mode, the information-flow graphs, random parameters and show_source."""

from __future__ import annotations

import feedback_lib as fl
import pytest
import torch


@pytest.mark.parametrize(
    "value, expected",
    [("1", True), ("TRUE", True), ("yes", True), ("0", False), ("", False), ("off", False)],
)
def test_fast_mode(monkeypatch, value, expected):
    monkeypatch.setenv(fl.FAST_ENV, value)
    assert fl.fast_mode() is expected
    assert fl.by_mode(full=100, fast=2) == (2 if expected else 100)


def test_fast_mode_unset_and_invalid(monkeypatch):
    monkeypatch.delenv(fl.FAST_ENV, raising=False)
    assert fl.by_mode(full="full", fast="fast") == "full"
    monkeypatch.setenv(fl.FAST_ENV, "maybe")
    with pytest.raises(ValueError, match="FEEDBACK_LIB_FAST must be one of"):
        fl.fast_mode()


def test_computation_depth():
    assert fl.computation_depth("transformer", 3, 4) == [3, 3, 3, 3]
    assert fl.computation_depth("feedback", 3, 4) == [3, 6, 9, 12]


def test_ancestors_show_what_each_model_sees():
    # Transformer: layer 1 at the last step sees only the embeddings of the past.
    assert fl.ancestors("transformer", 2, 3, (1, 2)) == {(0, 0), (0, 1), (0, 2)}
    # Feedback: it sees every row of every past step, through the memory (row 3).
    seen = fl.ancestors("feedback", 2, 3, (1, 2))
    assert {(row, step) for row in range(4) for step in range(2)} <= seen
    assert (0, 2) in seen and (1, 2) not in seen and (2, 2) not in seen


def test_flow_edges_bad_input():
    with pytest.raises(ValueError, match="kind must be one of"):
        fl.flow_edges("lstm", 2, 2)
    with pytest.raises(ValueError, match="n_steps must be a positive integer"):
        fl.flow_edges("feedback", 2, 0)


def test_randomize_parameters_is_seeded():
    a = fl.randomize_parameters_(torch.nn.Linear(3, 2), seed=1)
    b = fl.randomize_parameters_(torch.nn.Linear(3, 2), seed=1)
    torch.testing.assert_close(a.weight, b.weight)
    assert a.weight.abs().sum() > 0
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fl.randomize_parameters_(torch.zeros(2))
    with pytest.raises(ValueError, match="std must be a positive number"):
        fl.randomize_parameters_(torch.nn.Linear(3, 2), std=0)


def test_show_source():
    from feedback_lib.book.display import show_source

    text = show_source(fl.by_mode).data
    assert text.startswith("````python\ndef by_mode(") and text.endswith("\n````")
    with pytest.raises(TypeError, match="show_source needs"):
        show_source(3)


def test_show_cpp():
    from feedback_lib.book.display import show_cpp

    text = show_cpp("attention_forward").data
    assert (
        text.startswith("````cpp\n// One layer's attention") and "void attention_forward(" in text
    )
    assert text.endswith("\n}\n````")
    with pytest.raises(ValueError, match="step_loops.cpp defines no function named 'nothing'"):
        show_cpp("nothing")


def test_book_modules_load_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, feedback_lib as fl; assert 'matplotlib' not in sys.modules; "
        "fl.book.plots.plot_layer_weights; fl.book.widgets.attention_explorer; fl.book.display.show_source; "
        "assert 'matplotlib' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
