"""The chapters' slide decks (scripts/slides.py): built from the cells each chapter marks, and
loading nothing from another host. The browser test opens every deck the site build wrote."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import colab_cells  # noqa: E402
import slides  # noqa: E402

CHAPTERS = colab_cells.chapter_notebooks(ROOT)


def _cell(kind: str, source: str, **metadata) -> dict:
    cell = {"cell_type": kind, "metadata": metadata, "source": source}
    if kind == "code":
        cell |= {"outputs": [], "execution_count": None}
    return cell


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_each_chapter_marks_a_deck_with_its_title_and_summary(path):
    deck = slides.deck_notebook(json.loads(path.read_text()), path.name)
    text = "\n".join(cell["source"] for cell in deck["cells"])
    assert 5 <= len(deck["cells"]) <= 9
    assert re.search(r"^# \d+\. ", text, re.M) and "## Summary" in text
    assert "## Exercises" not in text and "{admonition}" not in text and "{cite}" not in text


def test_the_deck_keeps_only_marked_cells_and_the_sections_they_name():
    slide = {"slideshow": {"slide_type": "slide"}}
    notebook = {
        "metadata": {"widgets": {}},
        "cells": [
            _cell(
                "markdown",
                "# 1. Title\n\nIntro {cite}`fan2020feedback`.\n\n## What you will learn\n\n- a\n\n"
                "## Prerequisites\n\n- b",
                slide_sections=["What you will learn"],
                **slide,
            ),
            _cell("markdown", "Not on a slide."),
            _cell("code", "plot()", tags=[slides.OUTPUT_ONLY_TAG], **slide),
            _cell("markdown", "See [chapter 2](02_score_decomposition.ipynb#a-b).", **slide),
        ],
    }
    deck = slides.deck_notebook(notebook, "x.ipynb")
    assert [cell["source"] for cell in deck["cells"]] == [
        "# 1. Title\n## What you will learn\n\n- a",
        "plot()",
        "See [chapter 2](../book/02_score_decomposition.html#a-b).",
    ]
    assert "widgets" not in deck["metadata"]
    assert notebook["cells"][0]["source"].startswith("# 1. Title\n\nIntro")  # input unchanged


def test_a_chapter_without_marks_is_an_error():
    with pytest.raises(ValueError, match=r"x\.ipynb marks no cell for its slides"):
        slides.deck_notebook({"metadata": {}, "cells": [_cell("markdown", "# 1. A")]}, "x.ipynb")


def test_decks_are_written_with_reveal_and_load_nothing_from_another_host(tmp_path):
    written = slides.write_decks(tmp_path, ROOT)
    assert [path.name for path in written] == [f"{p.stem}{slides.SUFFIX}" for p in CHAPTERS]
    for name in slides.REVEAL_FILES:
        assert (tmp_path / slides.REVEAL_DIR / name).is_file()
    for css in (tmp_path / slides.REVEAL_DIR).rglob("*.css"):
        assert not re.search(r"@import\s+url\(\s*['\"]?https?:", css.read_text()), css
    for path in written:
        html = path.read_text()
        loaded = re.findall(r"<(?:script|link|img)\b[^>]*\b(?:src|href)=\"([^\"]*)\"", html)
        assert loaded and not [url for url in loaded if re.match(r"https?:|//", url)], path.name
        assert slides.MATHJAX_URL in loaded
    # a figure cell tagged slide-output-only shows its figure, not its code
    chapter = json.loads(CHAPTERS[0].read_text())
    hidden = [
        "".join(cell["source"])
        for cell in chapter["cells"]
        if slides.OUTPUT_ONLY_TAG in cell["metadata"].get("tags", [])
    ]
    assert hidden and hidden[0].splitlines()[0] not in written[0].read_text()
