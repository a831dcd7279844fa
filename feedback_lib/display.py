"""Showing the library's own source in a chapter, so the book never pastes a copy of it."""

from __future__ import annotations

import inspect
import textwrap

from IPython.display import Markdown


def show_source(obj: object) -> Markdown:
    """The source of a function, method, class or module of ``feedback_lib`` as a Markdown code block.

    Put it last in a notebook cell: ``show_source(fl.FeedbackAttention.get_scores)``. Jupyter, Colab
    and the website all render it with syntax highlighting.
    """
    try:
        source = inspect.getsource(obj)
    except (TypeError, OSError) as error:
        raise TypeError(f"show_source needs a function, method, class or module defined in a file, "
                        f"got {obj!r} ({error})") from None
    return Markdown(f"````python\n{textwrap.dedent(source).rstrip()}\n````")
