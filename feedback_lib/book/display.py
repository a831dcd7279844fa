"""Showing the library's own source in a chapter, so the book never pastes a
copy of it."""

from __future__ import annotations

import inspect
import re
import textwrap

from IPython.display import Markdown


def show_source(obj: object) -> Markdown:
    """The source of a function, method, class or module of ``feedback_lib``
    as a Markdown code block.

    Put it last in a notebook cell:
    ``show_source(fl.FeedbackAttention.get_scores)``. Jupyter, Colab and the
    website all render it with syntax highlighting.
    """
    try:
        source = inspect.getsource(obj)
    except (TypeError, OSError) as error:
        raise TypeError(
            "show_source needs a function, method, class or module "
            f"defined in a file, got {obj!r} ({error})"
        ) from None
    return Markdown(f"````python\n{textwrap.dedent(source).rstrip()}\n````")


def show_cpp(name: str) -> Markdown:
    """One function of the C++ step loops
    (``feedback_lib/fast/step_loops.cpp``, chapter 12) as a Markdown code
    block: its comment, its ``template`` line and its body, up to the
    closing brace."""
    from feedback_lib.fast.native import SOURCE

    lines = SOURCE.read_text().splitlines()
    starts = [
        i
        for i, line in enumerate(lines)
        if re.match(rf"^[A-Za-z].*\b{re.escape(name)}\(", line)
        and not line.rstrip().endswith(";")
    ]
    if not starts:
        raise ValueError(
            f"{SOURCE.name} defines no function named {name!r}"
        )
    first = last = starts[0]
    while first > 0 and lines[first - 1].startswith(("//", "template")):
        first -= 1
    while lines[last] != "}":
        last += 1
    return Markdown(
        "````cpp\n" + "\n".join(lines[first : last + 1]) + "\n````"
    )
