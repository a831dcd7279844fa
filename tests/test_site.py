"""The website's own pieces: student versions, the execution-status records, offline MathJax and the
static stand-ins for widgets. ``tests/browser`` checks the built pages themselves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import book_site  # noqa: E402
import colab_cells  # noqa: E402
import student_versions  # noqa: E402

CHAPTERS = colab_cells.chapter_notebooks(ROOT)
SPHINX = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _cell(cell_type: str, source: str, **extra) -> dict:
    cell = {
        "cell_type": cell_type,
        "id": "x",
        "metadata": extra.pop("metadata", {}),
        "source": [source],
    }
    if cell_type == "code":
        cell |= {
            "execution_count": 3,
            "outputs": [{"output_type": "stream", "name": "stdout", "text": ["1\n"]}],
        }
    return cell | extra


def test_strip_solutions_removes_each_block_and_keeps_the_rest():
    text = (
        "**Exercise 1.** Why?\n\n:::{admonition} Solution\n:class: dropdown\n\nBecause $x$.\n:::\n\n"
        "**Exercise 2.** How?\n\n::::{admonition} Solution\n:class: dropdown\n\n:::{note}\nnested\n:::\n"
        "::::\n"
    )
    assert student_versions.strip_solutions(text) == "**Exercise 1.** Why?\n\n**Exercise 2.** How?"
    with pytest.raises(ValueError, match="never closed"):
        student_versions.strip_solutions(
            ":::{admonition} Solution\n:class: dropdown\nforgot the fence\n"
        )


def test_student_notebook_drops_solutions_and_outputs():
    notebook = {
        "metadata": {"widgets": {"state": {}}},
        "nbformat": 4,
        "nbformat_minor": 5,
        "cells": [
            _cell("code", "import feedback_lib"),
            _cell(
                "markdown",
                "**Exercise 1.** Compute it.\n\n:::{admonition} Solution\n:class: dropdown\n\nIt is 2.\n:::",
            ),
            _cell("code", "print(1 + 1)", metadata={"tags": ["hide-cell", "solution"]}),
            _cell(
                "markdown", ":::{admonition} Solution\n:class: dropdown\n\nOnly a solution.\n:::"
            ),
            _cell("markdown", "**Exercise 2.** Build it yourself."),
            _cell("code", "def f():\n    raise NotImplementedError"),
            _cell("code", "def f():\n    return 2", metadata={"tags": ["hide-cell", "solution"]}),
            _cell("code", "fl.book.exercises.check_f(f)"),
        ],
    }
    student = student_versions.student_notebook(notebook, "https://example.org/book")
    sources = ["".join(cell["source"]) for cell in student["cells"]]
    assert sources == [
        student_versions.HEADER.format(url="https://example.org/book"),
        "import feedback_lib",
        "**Exercise 1.** Compute it.",
        student_versions.ANSWER_CELL,
        "**Exercise 2.** Build it yourself.",
        "def f():\n    raise NotImplementedError",  # the student writes here
        "fl.book.exercises.check_f(f)",  # and checks it; the worked solution is gone
    ]
    assert all(
        cell["outputs"] == [] and cell["execution_count"] is None
        for cell in student["cells"]
        if cell["cell_type"] == "code"
    )
    assert "widgets" not in student["metadata"]
    assert notebook["cells"][2]["outputs"], "the input notebook is left unchanged"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_student_version_of_each_chapter(path):
    chapter = json.loads(path.read_text())
    student = student_versions.student_notebook(chapter, colab_cells.repository(ROOT)[0])
    text = json.dumps(student)
    assert "{admonition} Solution" not in text and '"solution"' not in text
    assert not any(cell.get("outputs") for cell in student["cells"])
    solutions = sum("solution" in cell["metadata"].get("tags", []) for cell in chapter["cells"])
    code = ["".join(c["source"]) for c in student["cells"] if c["cell_type"] == "code"]
    skeletons = [i for i, source in enumerate(code) if student_versions.SKELETON in source]
    # a build-it-yourself exercise: the skeleton, then at once its check
    assert all(code[i + 1].startswith("fl.book.exercises.check_") for i in skeletons)
    assert code.count(student_versions.ANSWER_CELL) == solutions - len(skeletons)
    # Every piece of prose outside the solutions is kept, in order, exercises included.
    prose = [
        student_versions.strip_solutions("".join(cell["source"]))
        for cell in chapter["cells"]
        if cell["cell_type"] == "markdown"
    ]
    assert [
        "".join(cell["source"]) for cell in student["cells"][1:] if cell["cell_type"] == "markdown"
    ] == [text for text in prose if text.strip()]
    assert "## Exercises" in text
    assert "".join(colab_cells.first_code_cell(student)["source"]) == "".join(
        colab_cells.first_code_cell(chapter)["source"]
    ), "the install cell stays, for Colab"


def test_write_student_versions_writes_every_chapter_and_a_zip(tmp_path):
    import zipfile

    written = student_versions.write_student_versions(tmp_path)
    assert [path.name for path in written] == [path.name for path in CHAPTERS]
    with zipfile.ZipFile(tmp_path / student_versions.ZIP_NAME) as archive:
        assert len(archive.namelist()) == len(CHAPTERS)


def _timed(start: str, end: str) -> dict:
    return {"iopub.execute_input": start, "shell.execute_reply": end}


def test_execution_record_from_cell_timing(tmp_path):
    notebook = {
        "cells": [
            _cell("code", "install"),
            _cell(
                "code",
                "a",
                metadata={
                    "execution": _timed("2026-01-02T03:04:05.000Z", "2026-01-02T03:04:07.500Z")
                },
            ),
            _cell("markdown", "text"),
            _cell(
                "code",
                'fit(device="auto")',
                metadata={
                    "execution": _timed("2026-01-02T03:04:08.000Z", "2026-01-02T03:05:08.000Z")
                },
            ),
        ]
    }
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps(notebook))
    record = book_site.execution_record(path)
    assert record.started.isoformat() == "2026-01-02T03:04:05+00:00"
    assert record.seconds == pytest.approx(62.5)
    assert (record.uses_gpu, record.threads) == (True, None)
    assert "not measured" in book_site.colab_estimate(record)
    notebook["cells"][1]["source"] = ["torch.set_num_threads(1)"]
    notebook["cells"][3]["source"] = ["fit()"]
    path.write_text(json.dumps(notebook))
    record = book_site.execution_record(path)
    assert (record.uses_gpu, record.threads) == (False, 1)
    assert book_site.measured(record) == "1.0 min (1 thread)"
    path.write_text(json.dumps({"cells": [_cell("code", "x")]}))
    with pytest.raises(ValueError, match="no cell timing"):
        book_site.execution_record(path)


def test_every_chapter_has_an_execution_record():
    records = book_site.execution_records(ROOT)
    assert [record.path for record in records] == CHAPTERS
    assert all(record.seconds > 0 for record in records)
    assert [record.path.stem[:2] for record in records if record.uses_gpu] == ["06", "08"]


@pytest.mark.parametrize(
    "seconds, text", [(8.2, "8 s"), (264.0, "4.4 min"), (3780.0, "1 h 03 min")]
)
def test_format_duration(seconds, text):
    assert book_site.format_duration(seconds) == text


def test_mathjax_is_served_from_the_site_not_from_static():
    folder = book_site.mathjax_folder()
    path = SPHINX["config"]["mathjax_path"]
    assert "://" not in path and path.startswith("../"), "relative to _static/, leaving it"
    assert (folder / path.removeprefix("../")).is_file()
    assert SPHINX["local_extensions"] == {"book_site": "scripts/"}
    assert SPHINX["config"]["nb_ipywidgets_js"] == {}, "no widget JavaScript from CDNs"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_widget_has_a_static_figure_and_a_note(path):
    cells = json.loads(path.read_text())["cells"]
    for i, cell in enumerate(cells):
        if any(WIDGET_VIEW in output.get("data", {}) for output in cell.get("outputs", [])):
            assert "remove-output" in cell["metadata"].get("tags", []), (
                f"{path.name}: cell {i} shows a widget box"
            )
            figure = cells[i - 2]
            assert any(
                "image/png" in output.get("data", {}) for output in figure.get("outputs", [])
            ), f"{path.name}: no static figure before the widget of cell {i}"
            note = "".join(cells[i - 1]["source"])
            assert cells[i - 1]["cell_type"] == "markdown" and "Colab" in note and "Jupyter" in note
