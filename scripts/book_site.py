"""The website's own Sphinx extension (``_config.yml``:
``sphinx.local_extensions``).

- **Offline math.** MathJax 3 comes from the pinned PyPI package
  ``sphinx-mathjax-offline`` (used for its files only): its ``static/``
  folder joins ``html_extra_path``, so the site serves ``mathjax/`` next to
  ``index.html``, and ``_config.yml``'s ``mathjax_path`` points there.
  Nothing goes under ``_static/``, where Jupyter Book would turn every
  ``.js`` file into a script tag.
- **Execution status.** The ``{execution-status}`` directive tabulates, for
  every chapter in ``_toc.yml``, when its stored outputs were produced and
  how long the run took, from the timing that Jupyter's executor records in
  each cell's metadata. With ``:colab:`` it shows the measured time beside
  the estimated time on a Colab GPU runtime instead (the teaching guide).
- **Browser hygiene.** One copy of each inline script (see
  :func:`_drop_repeated_scripts`), a colour mode for the theme, and
  ``/favicon.ico``, so that no page logs an error in the console.
- **Publishing.** ``html_baseurl`` (the pages' canonical address) and the
  footer's licence links come from ``_config.yml``'s ``repository``: a
  repository ``https://github.com/OWNER/NAME`` is published by the
  workflow ``.github/workflows/book.yml`` at ``https://OWNER.github.io/NAME/``.
- **Student versions.** After a successful build,
  ``scripts/student_versions.py`` writes every chapter without its solutions
  to ``student/`` in the output, with a zip; the teaching guide lists them
  with the ``{student-versions}`` directive, the navigation does not.
- **Slides.** After a successful build, ``scripts/slides.py`` writes a
  reveal.js deck of every chapter's marked cells to ``slides/``; the
  teaching guide lists them with the ``{slide-decks}`` directive.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path

import colab_cells
import slides
import student_versions
from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

MATHJAX_PACKAGE = "sphinx-mathjax-offline"
#: The site's own layout rules, served from _static/: a stylesheet, and
#: the script that shows a table too wide for a phone row by row.
SITE_STATIC = Path(__file__).parent / "site_static"
LAYOUT_CSS = "book_layout.css"
LAYOUT_JS = "book_layout.js"
#: Where the student versions go, relative to the HTML output folder.
STUDENT_DIR = "student"
#: Where the slide decks go, relative to the HTML output folder.
SLIDES_DIR = "slides"
#: Code that moves a chapter's work to a GPU when there is one.
GPU_CODE = r"""device\s*=\s*["']auto["']|cuda\.is_available\(\)"""


def mathjax_folder() -> Path:
    """The installed folder that holds ``mathjax/tex-chtml.js`` and its
    fonts."""
    try:
        folder = Path(
            metadata.distribution(MATHJAX_PACKAGE).locate_file(
                f"{MATHJAX_PACKAGE}/static"
            )
        )
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            "the website serves MathJax from the PyPI package "
            f"{MATHJAX_PACKAGE!r}, which is not installed: run `make "
            "setup` (or pip install -r requirements.txt)"
        ) from None
    if not (folder / "mathjax" / "tex-chtml.js").is_file():
        raise RuntimeError(
            f"{folder} has no mathjax/tex-chtml.js; reinstall "
            f"{MATHJAX_PACKAGE}"
        )
    return folder


@dataclass(frozen=True)
class ExecutionRecord:
    """When a stored notebook was executed and for how long (from its cells'
    timing metadata)."""

    path: Path
    started: datetime  # the first timed cell's start, UTC
    seconds: float  # the sum of the timed cells' durations
    uses_gpu: bool  # a cell picks the GPU when there is one
    threads: (
        int | None
    )  # set by the chapter with torch.set_num_threads, else the machine's 2


def _timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def execution_record(path: Path) -> ExecutionRecord:
    """The :class:`ExecutionRecord` of one notebook; an error if none of its
    cells carries timing."""
    notebook = json.loads(path.read_text())
    code = [
        cell for cell in notebook["cells"] if cell["cell_type"] == "code"
    ]
    spans = []
    for cell in code:
        timing = cell["metadata"].get("execution", {})
        if (
            "iopub.execute_input" in timing
            and "shell.execute_reply" in timing
        ):
            spans.append(
                (
                    _timestamp(timing["iopub.execute_input"]),
                    _timestamp(timing["shell.execute_reply"]),
                )
            )
    if not spans:
        raise ValueError(
            f"{path.name} has no cell timing: execute it with `jupyter "
            "execute --inplace` (see the Makefile's `notebooks` target)"
        )
    sources = "\n".join("".join(cell["source"]) for cell in code)
    threads = re.search(r"set_num_threads\((\d+)\)", sources)
    return ExecutionRecord(
        path=path,
        started=min(start for start, _ in spans),
        seconds=sum((end - start).total_seconds() for start, end in spans),
        uses_gpu=re.search(GPU_CODE, sources) is not None,
        threads=int(threads.group(1)) if threads else None,
    )


def execution_records(
    root: Path = colab_cells.ROOT,
) -> list[ExecutionRecord]:
    """One record per chapter notebook of ``_toc.yml``, in book order."""
    return [
        execution_record(path)
        for path in colab_cells.chapter_notebooks(root)
    ]


def format_duration(seconds: float) -> str:
    """``"8 s"``, ``"4.4 min"`` or ``"1 h 05 min"``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def measured(record: ExecutionRecord) -> str:
    """The measured run time, with the thread count where the chapter set
    its own."""
    threads = (
        ""
        if record.threads is None
        else f" ({record.threads} thread{'s' * (record.threads != 1)})"
    )
    return format_duration(record.seconds) + threads


def colab_estimate(record: ExecutionRecord) -> str:
    """The estimated time on a Colab GPU runtime (the teaching guide gives
    the reasons)."""
    if record.uses_gpu:
        return (
            "not measured: runs on the GPU there, partly with other code; "
            "same order as the CPU (estimated)"
        )
    return "the CPU time or more: runs on Colab's CPU (estimated)"


def _table(
    header: list[str], widths: list[int], rows: list[list[nodes.Node | str]]
) -> nodes.table:
    """A docutils table (parser-independent, unlike text handed to
    nested_parse)."""

    def row(cells: list[nodes.Node | str]) -> nodes.row:
        line = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += (
                cell
                if isinstance(cell, nodes.Node)
                else nodes.paragraph(text=cell)
            )
            line += entry
        return line

    group = nodes.tgroup(cols=len(header))
    group += [nodes.colspec(colwidth=width) for width in widths]
    group += nodes.thead("", row(list(header)))
    group += nodes.tbody("", *(row(cells) for cells in rows))
    return nodes.table("", group, classes=["execution-status"])


class ExecutionStatus(SphinxDirective):
    """A table of the chapters' stored runs; ``:colab:`` adds the estimated
    time in Colab."""

    option_spec = {"colab": lambda argument: True}

    def run(self) -> list[nodes.Node]:
        root = Path(self.env.srcdir)
        records = execution_records(root)
        for record in records:
            self.env.note_dependency(str(record.path))
        if "colab" in self.options:
            header, widths = (
                [
                    "Chapter",
                    "2-core CPU (measured)",
                    "Colab GPU runtime (estimated)",
                ],
                [4, 2, 4],
            )
            rows = [
                [
                    self._link(record, root),
                    measured(record),
                    colab_estimate(record),
                ]
                for record in records
            ]
        else:
            header, widths = (
                [
                    "Chapter",
                    "Outputs produced (UTC)",
                    "Run time, 2-core CPU (measured)",
                ],
                [5, 3, 3],
            )
            rows = [
                [
                    self._link(record, root),
                    record.started.strftime("%Y-%m-%d %H:%M"),
                    measured(record),
                ]
                for record in records
            ]
        total = sum(record.seconds for record in records)
        return [
            _table(header, widths, rows),
            nodes.paragraph(
                text=f"All chapters together: {format_duration(total)} on "
                "the CPU."
            ),
        ]

    def _link(self, record: ExecutionRecord, root: Path) -> nodes.paragraph:
        target = (
            "/" + record.path.relative_to(root).with_suffix("").as_posix()
        )
        reference = addnodes.pending_xref(
            "",
            nodes.inline(text=record.path.stem),
            refdomain="std",
            reftype="doc",
            reftarget=target,
            refexplicit=False,
            refdoc=self.env.docname,
        )
        return nodes.paragraph("", "", reference)


class StudentVersions(SphinxDirective):
    """A list of download links to the student versions (written by the
    build, not in the navigation)."""

    def run(self) -> list[nodes.Node]:
        to_root = "../" * self.env.docname.count("/")
        items = [
            (
                f"{to_root}{STUDENT_DIR}/{student_versions.ZIP_NAME}",
                "All chapters (zip)",
            )
        ]
        for path in colab_cells.chapter_notebooks(Path(self.env.srcdir)):
            items.append((f"{to_root}{STUDENT_DIR}/{path.name}", path.name))
        listing = "".join(
            f'<li><a class="reference download" href="{href}" download>'
            f"{label}</a></li>"
            for href, label in items
        )
        return [
            nodes.raw(
                "",
                f'<ul class="student-versions">{listing}</ul>',
                format="html",
            )
        ]


def pages_url(repository_url: str) -> str:
    """Where GitHub Pages publishes the repository ``repository_url``
    (``https://github.com/OWNER/NAME``): ``https://OWNER.github.io/NAME/``.
    """
    match = re.fullmatch(
        r"https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?",
        repository_url,
    )
    if match is None:
        raise ValueError(
            "repository.url in _config.yml must be a GitHub repository "
            f"https://github.com/OWNER/NAME, got {repository_url!r}"
        )
    owner, name = match.groups()
    return f"https://{owner.lower()}.github.io/{name}/"


def licence_footer(repository_url: str, branch: str) -> str:
    """The footer of every page: the licences of the text and the code."""
    files = f"{repository_url}/blob/{branch}"
    return (
        '<p class="book-licence">Text and figures: <a href='
        '"https://creativecommons.org/licenses/by/4.0/">CC BY 4.0</a> '
        f'(<a href="{files}/LICENSE-text.md">LICENSE-text.md</a>). Code: '
        f'<a href="{files}/LICENSE">MIT</a>.</p>'
    )


class SlideDecks(SphinxDirective):
    """A list of links to the chapters' slide decks (written by the build,
    not in the navigation)."""

    def run(self) -> list[nodes.Node]:
        to_root = "../" * self.env.docname.count("/")
        items = []
        for path in colab_cells.chapter_notebooks(Path(self.env.srcdir)):
            title = slides.title(json.loads(path.read_text()), path)
            items.append(
                f'<li><a class="reference external" href="{to_root}'
                f'{SLIDES_DIR}/{path.stem}{slides.SUFFIX}">'
                f"{html.escape(title)}</a></li>"
            )
        return [
            nodes.raw(
                "",
                f'<ul class="slide-decks">{"".join(items)}</ul>',
                format="html",
            )
        ]


def _configure(app: Sphinx, config) -> None:
    url, branch = colab_cells.repository(Path(app.srcdir))
    # The canonical address of every page, where the workflow publishes it.
    config.html_baseurl = config.html_baseurl or pages_url(url)
    config.html_theme_options = {
        **config.html_theme_options,
        "extra_footer": licence_footer(url, branch),
    }
    config.html_extra_path = [
        *config.html_extra_path,
        str(mathjax_folder()),
    ]
    # The layout rules of scripts/site_static/.
    config.html_static_path = [*config.html_static_path, str(SITE_STATIC)]
    # pydata-sphinx-theme logs a console error on every page when the colour
    # mode is unset.
    config.html_context = {"default_mode": "auto", **config.html_context}


def _drop_repeated_scripts(
    app: Sphinx, pagename: str, templatename: str, context: dict, doctree
) -> None:
    """Keep one copy of each script. Inline scripts added through both the
    registry and the builder (sphinx-thebe's ``const THEBE_JS_URL``,
    sphinx-togglebutton's selector) reach the page twice, and a second
    ``const`` is a SyntaxError in the browser."""
    seen, unique = set(), []
    for script in context.get("script_files", []):
        # The registry names an inline script's file None, the builder '';
        # they are the same script.
        key = (
            getattr(script, "filename", script) or "",
            tuple(sorted(getattr(script, "attributes", {}).items())),
        )
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"][:] = (
        unique  # in place: later handlers (MathJax) append to this list
    )


def _finish(app: Sphinx, exception: Exception | None) -> None:
    """Write the student versions, and the favicon where browsers ask first
    (``/favicon.ico``, for the top-level redirect page, which has no icon
    link of its own)."""
    if exception is None and app.builder.format == "html":
        outdir = Path(app.outdir)
        student_versions.write_student_versions(
            outdir / STUDENT_DIR, Path(app.srcdir)
        )
        slides.write_decks(outdir / SLIDES_DIR, Path(app.srcdir))
        if app.config.html_favicon:
            shutil.copyfile(
                outdir / "_static" / Path(app.config.html_favicon).name,
                outdir / "favicon.ico",
            )


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _configure)
    # Early: html-page-context stops at the first handler that returns a
    # template name.
    app.connect("html-page-context", _drop_repeated_scripts, priority=100)
    app.connect("build-finished", _finish)
    app.add_css_file(LAYOUT_CSS)
    app.add_js_file(LAYOUT_JS)
    app.add_directive("execution-status", ExecutionStatus)
    app.add_directive("student-versions", StudentVersions)
    app.add_directive("slide-decks", SlideDecks)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
