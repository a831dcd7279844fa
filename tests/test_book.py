"""The book's structure: table of contents, Colab install cells, stored outputs, chapter layout.

These tests read the files only; CI executes the notebooks themselves with ``pytest --nbval-lax book``.
"""

from __future__ import annotations

import base64
import importlib
import json
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import colab_cells  # noqa: E402

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
CHAPTERS = colab_cells.chapter_notebooks(ROOT)
SECTIONS = ["## What you will learn", "## Prerequisites", "## Summary", "## Exercises"]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def markdown(notebook: dict) -> str:
    return "\n".join(
        "".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "markdown"
    )


def test_every_chapter_is_in_the_toc_and_exists():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    listed = [entry["file"] for part in toc["parts"] for entry in part["chapters"]]
    for name in [toc["root"], *listed]:
        assert list(ROOT.glob(f"{name}.*")), f"{name} is in _toc.yml but has no file"
    on_disk = {str(p.relative_to(ROOT).with_suffix("")) for p in (ROOT / "book").glob("*.ipynb")}
    assert on_disk <= set(listed), (
        f"notebooks missing from _toc.yml: {sorted(on_disk - set(listed))}"
    )
    assert len(CHAPTERS) >= 5


def test_chapter_1_maps_every_chapter_in_the_toc_order():
    """Chapter 1's "map of this book" links each numbered chapter of _toc.yml, in its order."""
    text = markdown(load(ROOT / "book" / "01_why_feedback.ipynb"))
    section = text.split("## The map of this book", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^(\d+)\. (.*)$", section, flags=re.MULTILINE)
    linked = [re.search(r"\]\(([^)]+)\.ipynb\)", item) for _, item in items]
    mapped = ["01_why_feedback"] + [link.group(1) for link in linked[1:] if link]
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    numbered = [
        Path(entry["file"]).name
        for part in toc["parts"]
        for entry in part["chapters"]
        if re.match(r"\d\d_", Path(entry["file"]).name)
    ]
    assert mapped == numbered, f"chapter 1's map {mapped} != _toc.yml's chapters {numbered}"
    assert [int(n) for n, _ in items] == list(range(1, len(numbered) + 1))


def test_config_pitfalls():
    assert CONFIG["repository"]["branch"] == "main"
    assert {"_build", ".pytest_cache", ".venv"} <= set(CONFIG["exclude_patterns"])
    assert CONFIG["execute"]["execute_notebooks"] == "off"  # the stored outputs are published
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_colab_install_cell_matches_config(path):
    url, branch = colab_cells.repository(ROOT)
    cell = colab_cells.first_code_cell(load(path))
    assert cell is not None
    assert "".join(cell["source"]) == colab_cells.install_cell_source(url, branch), (
        f"{path.name}: the install cell does not match _config.yml; run python scripts/colab_cells.py"
    )
    assert cell["metadata"].get("tags") == colab_cells.INSTALL_TAGS
    assert f"git+{url}@{branch}" in "".join(cell["source"])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_is_stored_executed_without_errors(path):
    notebook = load(path)
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code[1:]]  # the install cell prints nothing
    assert all(n is not None for n in counts), f"{path.name}: some cells were never executed"
    assert counts == sorted(counts), f"{path.name}: cells were not executed top to bottom"
    for cell in code:
        for output in cell["outputs"]:
            assert output["output_type"] != "error", f"{path.name}: a stored output is an error"
            if output.get("name") == "stderr":
                assert "Traceback" not in "".join(output["text"]), (
                    f"{path.name}: a traceback on stderr"
                )
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_layout(path):
    notebook = load(path)
    text = markdown(notebook)
    assert re.match(r"# \d+\. ", text), f"{path.name}: must open with '# N. Title'"
    positions = [text.find(section) for section in SECTIONS]
    assert -1 not in positions, f"{path.name}: missing one of {SECTIONS}"
    assert positions == sorted(positions), f"{path.name}: sections out of order"
    exercises = text[positions[-1] :]
    assert exercises.count(":class: dropdown") >= 3, (
        f"{path.name}: each exercise needs a solution in a dropdown"
    )
    tagged = [c for c in notebook["cells"] if "nbval-check-output" in c["metadata"].get("tags", [])]
    assert tagged, f"{path.name}: no cell's output is compared by nbval"
    assert not re.search(r"\bTODO\b|\bFIXME\b", json.dumps(notebook)), (
        f"{path.name}: a TODO is left"
    )


#: Control characters other than the newline: a TAB typed where ``\t`` was meant turns
#: ``\text{model}`` into "ext{model}" on the page.
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


@pytest.mark.parametrize(
    "path", [*CHAPTERS, *sorted((ROOT / "book").glob("*.md"))], ids=lambda p: p.stem
)
def test_prose_holds_no_control_characters(path):
    text = markdown(load(path)) if path.suffix == ".ipynb" else path.read_text()
    found = [
        (m.start(), text[max(0, m.start() - 20) : m.end() + 20]) for m in CONTROL.finditer(text)
    ]
    assert not found, f"{path.name}: control characters in the prose: {found[:3]}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_code_lines_fit_the_website(path):
    """No code line, comment or string of a chapter is longer than 88 characters (book/ruff.toml):
    longer ones scroll sideways on the website."""
    long = [
        line
        for cell in load(path)["cells"]
        if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).splitlines()
        if len(line) > 88
    ]
    assert not long, f"{path.name}: {len(long)} code lines over 88 characters, e.g. {long[0]!r}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_stored_figures_follow_the_book_style(path):
    """Every stored figure was drawn in the book's style (feedback_lib.book.style): its PNG records
    its resolution and smallest font, at most 5 % wider than style.MAX_WIDTH_IN, with no text below
    style.MIN_FONT_PT. tests/browser measures how large that text is shown on the website."""
    from feedback_lib.book import style

    for index, cell in enumerate(load(path)["cells"]):
        for output in cell.get("outputs", []):
            if "image/png" not in output.get("data", {}):
                continue
            info = style.png_info(base64.b64decode(output["data"]["image/png"]))
            assert info["dpi"] == style.DPI and info["font"] is not None, (
                f"{path.name}, cell {index}: a figure drawn without the book's style: {info}"
            )
            assert info["font"] >= style.MIN_FONT_PT, f"{path.name}, cell {index}: {info}"
            assert info["width"] <= 1.05 * style.MAX_WIDTH_IN * style.DPI, (
                f"{path.name}, cell {index}: a figure {info['width']} px wide"
            )


def test_references_bib_has_the_cited_works():
    bib = (ROOT / "references.bib").read_text()
    keys = set(re.findall(r"@\w+\{([^,]+),", bib))
    assert {"fan2020feedback", "dai2019transformerxl", "vaswani2017attention"} <= keys
    for path in CHAPTERS + [ROOT / "book" / "index.md"]:
        text = path.read_text()
        for key in re.findall(r"\{cite[:a-z]*\}`([^`]+)`", text):
            for one in key.split(","):
                assert one.strip() in keys, f"{path.name} cites unknown key {one!r}"


#: The widest line of a code block that the website shows without scrolling at 1280 px (measured in
#: Chromium with the book's theme: 640 px of 8.4 px characters); pyproject.toml's ruff line length.
LISTING_WIDTH = 76


def listing_cells(path: Path):
    """``(target, stored text)`` of every cell of a chapter ending in ``show_source(...)``."""
    for cell in load(path)["cells"]:
        source = "".join(cell["source"]).strip()
        match = re.search(r"show_source\(([^()]*)\)$", source)
        if cell["cell_type"] == "code" and match:
            yield match.group(1), "".join(cell["outputs"][0]["data"]["text/markdown"])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_stored_source_listings_match_the_library(path):
    """Every ``show_source(fl.X)`` shows the library's current source of ``fl.X``: a public name
    (the model, not checking code or private helpers), in lines that fit the website's code block."""
    import feedback_lib as fl
    from feedback_lib.book.display import show_source

    for target, stored in listing_cells(path):
        assert re.fullmatch(r"fl(\.\w+)+", target), (
            f"{path.name}: show_source({target}) must name its object from fl (fl.model.lm.FeedbackLM)"
        )
        names = target.split(".")[1:]
        private = [n for n in names if n.startswith("_") and not n.endswith("__")]
        checking = [n for n in names if n == "checks" or n.startswith("check_")]
        assert not private and not checking, (
            f"{path.name}: show_source({target}) shows a private name or checking code"
        )
        obj = fl
        for name in names:
            if isinstance(obj, types.ModuleType) and not hasattr(obj, name):
                importlib.import_module(f"{obj.__name__}.{name}")
            obj = getattr(obj, name)
        assert stored == show_source(obj).data, (
            f"{path.name}: the stored listing of {target} is out of date; re-execute the chapter"
        )
        wide = [line for line in stored.splitlines() if len(line) > LISTING_WIDTH]
        assert not wide, (
            f"{path.name}: listing of {target} has lines wider than {LISTING_WIDTH}: {wide}"
        )


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_stored_cpp_listings_match_the_library(path):
    """A cell ending in ``show_cpp("name")`` must show the current C++ source of that function."""
    from feedback_lib.book.display import show_cpp

    for cell in load(path)["cells"]:
        match = re.search(r'show_cpp\("(\w+)"\)\s*$', "".join(cell["source"]).strip())
        if cell["cell_type"] == "code" and match:
            stored = "".join(cell["outputs"][0]["data"]["text/markdown"])
            assert stored == show_cpp(match.group(1)).data, (
                f"{path.name}: the stored listing of {match.group(1)} is out of date; re-execute the chapter"
            )
            wide = [line for line in stored.splitlines() if len(line) > LISTING_WIDTH]
            assert not wide, (
                f"{path.name}: {match.group(1)} has lines wider than {LISTING_WIDTH}: {wide}"
            )
