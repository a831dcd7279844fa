"""Slide decks of the chapters, for teaching (the teaching guide links
them).

A chapter marks the cells of its deck with Jupyter's standard cell
metadata ``"slideshow": {"slide_type": "slide"}`` (or ``"subslide"``,
``"fragment"``, ``"-"``; in Jupyter: the property inspector's Slide Type).
Unmarked cells are not in the deck. Two more marks shorten a slide:

- a markdown cell with ``"slide_sections": ["Summary"]`` shows only its
  title line (``# ...``) and those ``##`` sections;
- a code cell tagged ``slide-output-only`` shows its stored output (a
  figure) without its code.

Every chapter must mark at least one cell. The decks are reveal.js pages
written by nbconvert's slides exporter with ``slide_template/``, which
loads nothing from another host: reveal.js comes from the files of the
pinned PyPI package ``sphinx-revealjs`` (copied next to the decks) and
MathJax 3 from the website (``../mathjax/``). The website's build writes
them to ``_build/html/slides/`` (``scripts/book_site.py``); by hand:

    python scripts/slides.py OUT_DIR
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

import colab_cells
import nbformat
from nbconvert import SlidesExporter
from nbconvert.preprocessors import TagRemovePreprocessor

REVEAL_PACKAGE = "sphinx-revealjs"
#: The folder, next to the decks, that holds reveal.js.
REVEAL_DIR = "reveal.js"
#: reveal.js's files that the decks load (paths inside its folder).
REVEAL_FILES = [
    "dist/reveal.css",
    "dist/reveal.js",
    "dist/theme/white.css",
    "plugin/notes/notes.js",
]
#: Folders of reveal.js that the decks load (the theme's own font; the
#: themes that import Google's fonts would need the network).
REVEAL_FOLDERS = ["dist/theme/fonts/source-sans-pro"]
THEME = "white"
#: The site's own MathJax 3, relative to the decks' folder.
MATHJAX_URL = "../mathjax/tex-chtml.js"
TEMPLATE = Path(__file__).parent / "slide_template"
SLIDE_TYPES = {"slide", "subslide", "fragment", "-"}
OUTPUT_ONLY_TAG = "slide-output-only"
SUFFIX = ".slides.html"


def reveal_folder() -> Path:
    """The installed folder of reveal.js (``dist/``, ``plugin/``)."""
    try:
        folder = Path(
            metadata.distribution(REVEAL_PACKAGE).locate_file(
                "sphinx_revealjs/_static/revealjs"
            )
        )
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            "the slides take reveal.js from the PyPI package "
            f"{REVEAL_PACKAGE!r}, which is not installed: run `make "
            "setup` (or pip install -r requirements.txt)"
        ) from None
    missing = [
        name for name in REVEAL_FILES if not (folder / name).is_file()
    ]
    if missing:
        raise RuntimeError(
            f"{folder} lacks {missing}; reinstall {REVEAL_PACKAGE}"
        )
    return folder


def keep_sections(markdown: str, sections: list[str]) -> str:
    """The title line of ``markdown`` and its ``## `` sections named in
    ``sections`` (each up to the next ``## `` heading)."""
    kept, keeping = [], False
    for line in markdown.splitlines():
        if line.startswith("# "):
            kept.append(line)
            keeping = False
        elif line.startswith("## "):
            keeping = line[3:].strip() in sections
            if keeping:
                kept.append(line)
        elif keeping:
            kept.append(line)
    return "\n".join(kept).strip()


def myst_to_markdown(text: str) -> str:
    """The chapter's MyST as plain Markdown for nbconvert: citations
    (``{cite}`key` ``) left out, links to chapters pointed at their web
    pages next to the decks' folder."""
    text = re.sub(r"\s?\{cite(?::\w+)?\}`[^`]*`", "", text)
    return re.sub(
        r"\]\((\d\d_\w+)\.ipynb(#[\w-]+)?\)", r"](../book/\1.html\2)", text
    )


def is_marked(cell: dict) -> bool:
    slideshow = cell.get("metadata", {}).get("slideshow", {})
    return slideshow.get("slide_type") in SLIDE_TYPES


def deck_notebook(notebook: dict, name: str) -> dict:
    """The notebook of a chapter's deck: its marked cells only, shortened
    by their marks, without widget state (the input is left unchanged).
    ``name`` names the chapter in the error when none is marked."""
    deck = copy.deepcopy(notebook)
    cells = [cell for cell in deck["cells"] if is_marked(cell)]
    if not cells:
        raise ValueError(
            f"{name} marks no cell for its slides: give the cells of its "
            'deck the metadata "slideshow": {"slide_type": "slide"} '
            "(scripts/slides.py)"
        )
    for cell in cells:
        cell["source"] = "".join(cell["source"])
        if cell["cell_type"] != "markdown":
            continue
        text = myst_to_markdown(cell["source"])
        sections = cell["metadata"].get("slide_sections")
        cell["source"] = keep_sections(text, sections) if sections else text
        if not cell["source"]:
            raise ValueError(
                f"{name}: a cell's slide_sections {sections} match no "
                "'## ' section of it"
            )
    deck["cells"] = cells
    deck["metadata"].pop("widgets", None)
    return deck


def exporter() -> SlidesExporter:
    """nbconvert's slides exporter with the book's template and the
    site's own reveal.js and MathJax."""
    slides = SlidesExporter(
        extra_template_basedirs=[str(TEMPLATE.parent)],
        template_name=TEMPLATE.name,
        reveal_url_prefix=REVEAL_DIR,
        reveal_theme=THEME,
        mathjax_url=MATHJAX_URL,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    slides.register_preprocessor(
        TagRemovePreprocessor(remove_input_tags={OUTPUT_ONLY_TAG}),
        enabled=True,
    )
    return slides


def write_decks(
    out_dir: Path,
    root: Path = colab_cells.ROOT,
    notebooks: list[Path] | None = None,
) -> list[Path]:
    """Write the deck of every chapter in ``_toc.yml`` (or of ``notebooks``,
    a translation's) to ``out_dir``, with the reveal.js files they load."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source = reveal_folder()
    for name in REVEAL_FILES:
        target = out_dir / REVEAL_DIR / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target)
    for name in REVEAL_FOLDERS:
        shutil.copytree(
            source / name, out_dir / REVEAL_DIR / name, dirs_exist_ok=True
        )
    slides, written = exporter(), []
    for path in notebooks or colab_cells.chapter_notebooks(root):
        deck = deck_notebook(json.loads(path.read_text()), path.name)
        html, _ = slides.from_notebook_node(
            nbformat.from_dict(deck),
            resources={"metadata": {"name": title(deck, path)}},
        )
        target = out_dir / (path.stem + SUFFIX)
        target.write_text(html)
        written.append(target)
    return written


def title(notebook: dict, path: Path) -> str:
    """The chapter's title, from its first ``# `` line (as text: a
    translation writes ``# 3\\. ...``)."""
    for cell in notebook["cells"]:
        found = re.search(r"^# (.+)$", "".join(cell["source"]), re.M)
        if found:
            return re.sub(
                r"\\([!-/:-@\[-`{-~])", r"\1", found.group(1).strip()
            )
    return path.stem


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for path in write_decks(Path(argv[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
