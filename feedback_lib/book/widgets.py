"""Interactive controls for the notebooks (chapter 4); they need a live
Jupyter or Colab kernel.

On the website each control is preceded by a static figure of its default
view.
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import clear_output

from feedback_lib.book.plots import check_maps, plot_attention_step


def attention_explorer(
    maps: torch.Tensor | np.ndarray,
    *,
    step: int = 1,
    head: int = 0,
    batch: int = 0,
    labels: Sequence[str] | None = None,
) -> widgets.VBox:
    """Sliders for the query step and the head over
    :func:`~feedback_lib.book.plots.plot_attention_step`.

    ``maps [batch, heads, steps, steps]`` from
    :func:`~feedback_lib.attention_maps`; ``step``, ``head`` and ``batch``
    set the first view; ``labels`` (one string per step) label the axes.
    """
    maps = check_maps(maps, step, head, batch)
    _, heads, steps, _ = maps.shape
    if labels is not None and (
        isinstance(labels, str) or len(labels) != steps
    ):
        raise ValueError(
            f"labels must be a sequence of {steps} strings (one per step), "
            f"got {labels!r}"
        )
    step_slider = widgets.IntSlider(
        value=step, min=1, max=steps - 1, description="step t"
    )
    head_slider = widgets.IntSlider(
        value=head, min=0, max=heads - 1, description="head"
    )
    out = widgets.Output()

    def draw(_change: dict | None = None) -> None:
        with out:
            clear_output(wait=True)
            plot_attention_step(
                maps,
                step_slider.value,
                head_slider.value,
                batch=batch,
                labels=labels,
            )
            plt.show()

    step_slider.observe(draw, names="value")
    head_slider.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([step_slider, head_slider]), out])
