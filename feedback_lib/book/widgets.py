"""Interactive controls for the notebooks (chapter 4); they need a live
Jupyter or Colab kernel.

On the website each control is preceded by a static figure of its default
view.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from IPython.display import clear_output

from feedback_lib.book.plots import (
    check_maps,
    plot_attention_step,
    step_ticks,
)
from feedback_lib.checks import is_integer
from feedback_lib.model.attention import FeedbackAttention, attention_maps


def edited_head(
    attn: FeedbackAttention,
    head: int,
    *,
    content: float = 1.0,
    recency: float = 0.0,
    look_back: int = 1,
    look_back_bias: float = 0.0,
) -> FeedbackAttention:
    """A copy of ``attn`` with the parameters of one head changed (chapter
    4's explorer); ``attn`` itself is left as it is.

    ``content`` multiplies the head's key projection, and so its terms A
    and C; ``recency`` adds ``-recency * k`` to its bias ``S`` of the entry
    ``k`` steps back (above 0 it prefers recent entries); ``look_back_bias``
    adds to ``S`` of the entry ``look_back`` steps back.
    """
    positions = attn.key_pos_bias.shape[0]
    if not (is_integer(head) and 0 <= head < attn.heads):
        raise ValueError(
            f"head must be in 0..{attn.heads - 1}, got {head!r}"
        )
    if not (is_integer(look_back) and 1 <= look_back <= positions):
        raise ValueError(
            f"look_back must be a distance in 1..{positions}, "
            f"got {look_back!r}"
        )
    edited = copy.deepcopy(attn)
    d_k = edited.d_k
    rows = slice(head * d_k, (head + 1) * d_k)
    with torch.no_grad():
        edited.key.linear.weight[rows] *= content
        # row i of S is the entry P - i steps back
        steps_back = torch.arange(
            positions, 0, -1, dtype=edited.key_pos_bias.dtype
        )
        edited.key_pos_bias[:, head] -= recency * steps_back
        edited.key_pos_bias[positions - look_back, head] += look_back_bias
    return edited


def attention_explorer(
    attn: FeedbackAttention,
    x_seq: torch.Tensor,
    *,
    step: int = 1,
    head: int = 0,
    batch: int = 0,
    labels: Sequence[str] | None = None,
) -> widgets.VBox:
    """Sliders over :func:`~feedback_lib.book.plots.plot_attention_step`
    that recompute the attention of ``attn`` over ``x_seq [steps, batch,
    d_model]`` (as :func:`~feedback_lib.attention_maps` does) whenever they
    move.

    Two sliders pick the query step and the head; four change that head's
    parameters in a copy of the module (:func:`edited_head`): its content
    terms, a preference for recent entries, and a bias towards one
    distance. ``step``, ``head`` and ``batch`` set the first view;
    ``labels`` (one string per step) label the axes.
    """
    maps = check_maps(attention_maps(attn, x_seq), step, head, batch)
    _, heads, steps, _ = maps.shape
    step_ticks(labels, steps)  # checks the labels
    step_slider = widgets.IntSlider(
        value=step, min=1, max=steps - 1, description="step t"
    )
    head_slider = widgets.IntSlider(
        value=head, min=0, max=heads - 1, description="head"
    )
    content = widgets.FloatSlider(
        value=1.0, min=0.0, max=3.0, step=0.25, description="content ×"
    )
    recency = widgets.FloatSlider(
        value=0.0, min=-2.0, max=2.0, step=0.25, description="recency"
    )
    look_back = widgets.IntSlider(
        value=1, min=1, max=steps - 1, description="look back"
    )
    look_back_bias = widgets.FloatSlider(
        value=0.0, min=0.0, max=20.0, step=1.0, description="by"
    )
    out = widgets.Output()

    def draw(_change: dict | None = None) -> None:
        edited = edited_head(
            attn,
            head_slider.value,
            content=content.value,
            recency=recency.value,
            look_back=look_back.value,
            look_back_bias=look_back_bias.value,
        )
        with out:
            clear_output(wait=True)
            plot_attention_step(
                attention_maps(edited, x_seq),
                step_slider.value,
                head_slider.value,
                batch=batch,
                labels=labels,
            )
            plt.show()

    controls = [
        step_slider,
        head_slider,
        content,
        recency,
        look_back,
        look_back_bias,
    ]
    for control in controls:
        control.observe(draw, names="value")
    draw()
    return widgets.VBox(
        [
            widgets.HBox(controls[:2]),
            widgets.HBox(controls[2:4]),
            widgets.HBox(controls[4:]),
            out,
        ]
    )
