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
- **Translations.** ``book_translations`` (``_config.yml``) lists the
  languages of ``locales/``. After the English site, each is built into
  ``<language>/`` next to it (``scripts/translations.py``), with its own
  student versions, slides and notebooks (``book/<language>/``, which its
  launch and download buttons give); every page of every language has a
  language switcher in its header.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path

import colab_cells
import slides
import student_versions
import translations
from babel import Locale
from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

MATHJAX_PACKAGE = "sphinx-mathjax-offline"
#: The site's own layout rules, served from _static/: a stylesheet, and
#: the script that shows a table too wide for a phone row by row.
SITE_STATIC = Path(__file__).parent / "site_static"
#: The site's own templates: the language switcher.
SITE_TEMPLATES = Path(__file__).parent / "site_templates"
LANGUAGE_SWITCHER = "language-switcher.html"
#: The language of the book's source.
SOURCE_LANGUAGE = "en"
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


def measured(record: ExecutionRecord, language: str | None = None) -> str:
    """The measured run time, with the thread count where the chapter set
    its own."""
    if record.threads is None:
        threads = ""
    elif record.threads == 1:
        threads = " " + translations.translate(language, "(1 thread)")
    else:
        threads = " " + translations.translate(
            language, "({threads} threads)"
        ).format(threads=record.threads)
    return format_duration(record.seconds) + threads


def colab_estimate(
    record: ExecutionRecord, language: str | None = None
) -> str:
    """The estimated time on a Colab GPU runtime (the teaching guide gives
    the reasons)."""
    if record.uses_gpu:
        return translations.translate(
            language,
            "not measured: runs on the GPU there, partly with other code; "
            "same order as the CPU (estimated)",
        )
    return translations.translate(
        language, "the CPU time or more: runs on Colab's CPU (estimated)"
    )


def translation_of(config) -> str | None:
    """The language of a translated build (one of ``book_translations``);
    None for the English site."""
    language = config.language
    return language if language in config.book_translations else None


def site_notebooks(env) -> list[Path]:
    """The chapters of the build: the English notebooks, or a translated
    build's own (``book/<language>/``)."""
    root, language = Path(env.srcdir), translation_of(env.config)
    if language is None:
        return colab_cells.chapter_notebooks(root)
    return translations.translated_notebooks(language, root)


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
        language = translation_of(self.env.config)
        records = execution_records(root)
        for record in records:
            self.env.note_dependency(str(record.path))
        if "colab" in self.options:
            header, widths = (
                [
                    translations.translate(language, "Chapter"),
                    translations.translate(
                        language, "2-core CPU (measured)"
                    ),
                    translations.translate(
                        language, "Colab GPU runtime (estimated)"
                    ),
                ],
                [4, 2, 4],
            )
            rows = [
                [
                    self._link(record, root),
                    measured(record, language),
                    colab_estimate(record, language),
                ]
                for record in records
            ]
        else:
            header, widths = (
                [
                    translations.translate(language, "Chapter"),
                    translations.translate(
                        language, "Outputs produced (UTC)"
                    ),
                    translations.translate(
                        language, "Run time, 2-core CPU (measured)"
                    ),
                ],
                [5, 3, 3],
            )
            rows = [
                [
                    self._link(record, root),
                    record.started.strftime("%Y-%m-%d %H:%M"),
                    measured(record, language),
                ]
                for record in records
            ]
        total = sum(record.seconds for record in records)
        return [
            _table(header, widths, rows),
            nodes.paragraph(
                text=translations.translate(
                    language, "All chapters together: {total} on the CPU."
                ).format(total=format_duration(total)),
                # translated here (the site catalog), not from the page's
                translatable=False,
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
        language = translation_of(self.env.config)
        items = [
            (
                f"{to_root}{STUDENT_DIR}/{student_versions.ZIP_NAME}",
                translations.translate(language, "All chapters (zip)"),
            )
        ]
        for path in site_notebooks(self.env):
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


def licence_footer(
    repository_url: str, branch: str, language: str | None = None
) -> str:
    """The footer of every page: the licences of the text and the code."""
    files = f"{repository_url}/blob/{branch}"
    text = translations.translate(
        language,
        "Text and figures: {text_licence} ({text_file}). "
        "Code: {code_licence}.",
    )
    cc_by = "https://creativecommons.org/licenses/by/4.0/"
    links = {
        "text_licence": f'<a href="{cc_by}">CC BY 4.0</a>',
        "text_file": f'<a href="{files}/LICENSE-text.md">'
        "LICENSE-text.md</a>",
        "code_licence": f'<a href="{files}/LICENSE">MIT</a>',
    }
    return f'<p class="book-licence">{text.format(**links)}</p>'


class SlideDecks(SphinxDirective):
    """A list of links to the chapters' slide decks (written by the build,
    not in the navigation)."""

    def run(self) -> list[nodes.Node]:
        to_root = "../" * self.env.docname.count("/")
        items = []
        for path in site_notebooks(self.env):
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
    language = translation_of(config)
    # The canonical address of every page, where the workflow publishes it
    # (a translation: in its folder).
    config.html_baseurl = config.html_baseurl or (
        pages_url(url) + (f"{language}/" if language else "")
    )
    config.html_theme_options = {
        **config.html_theme_options,
        "extra_footer": licence_footer(url, branch, language),
        "article_header_end": [
            *config.html_theme_options.get(
                "article_header_end", ["article-header-buttons.html"]
            ),
            LANGUAGE_SWITCHER,
        ],
    }
    config.templates_path = [*config.templates_path, str(SITE_TEMPLATES)]
    if language:
        config.html_title = translations.translate(
            language, config.html_title
        )
        # The toggle of a hidden cell (the chapters hide whole cells only).
        config.nb_code_prompt_show = translations.translate(
            language, "Show code cell content"
        )
        config.nb_code_prompt_hide = translations.translate(
            language, "Hide code cell content"
        )
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


def _languages(
    app: Sphinx, pagename: str, templatename: str, context: dict, doctree
) -> None:
    """The language switcher's links (``site_templates/``): before the
    theme drops the templates that render empty (priority 500)."""
    language = translation_of(app.config)
    to_root = "../" * pagename.count("/")
    to_site = to_root + ("../" if language else "")  # the English site
    codes = [SOURCE_LANGUAGE, *app.config.book_translations]
    context["book_languages"] = [
        {
            "code": code.replace("_", "-"),
            "name": Locale.parse(code).get_language_name(code),
            "url": to_site
            + ("" if code == SOURCE_LANGUAGE else f"{code}/")
            + f"{pagename}.html",
            "current": code == (language or SOURCE_LANGUAGE),
        }
        for code in codes
    ]
    context["book_language_label"] = translations.translate(
        language, "Language"
    )


def _launch_translation(
    app: Sphinx, pagename: str, templatename: str, context: dict, doctree
) -> None:
    """In a translated build, the launch buttons open its own notebooks
    (``book/<language>/``): after the theme adds them (priority 501)."""
    language = translation_of(app.config)
    if language:
        root = Path(app.srcdir)
        own = translations.notebook_folder(language, root)
        path = (own / Path(pagename).name).with_suffix(".ipynb")
        _rewrite_urls(
            context.get("header_buttons", []),
            f"{pagename}.ipynb",
            path.relative_to(root).as_posix(),
        )


def _translate_captions(app: Sphinx, doctree: nodes.document) -> None:
    """In a translated build, the captions of the table of contents (the
    parts of ``_toc.yml``): sphinx-external-toc inserts their toctrees after
    Sphinx has translated the page, so their messages, which the root
    page's catalog holds, are applied here."""
    language = translation_of(app.config)
    if language is None:
        return
    table = translations.page_translations(
        language, app.env.docname, Path(app.srcdir)
    )
    for toctree in doctree.findall(addnodes.toctree):
        caption = table.get(toctree.get("caption") or "")
        if caption:
            toctree["caption"] = toctree["rawcaption"] = caption


def _rewrite_urls(buttons: list[dict], old: str, new: str) -> None:
    """Point the header buttons' links to other sites (Colab, Binder) at
    ``new`` instead of ``old``; the download button's stays in the site."""
    for button in buttons:
        if button.get("url", "").startswith("https://"):
            button["url"] = button["url"].replace(old, new)
        _rewrite_urls(button.get("buttons", []), old, new)


def _finish(app: Sphinx, exception: Exception | None) -> None:
    """Write the student versions, the slides and the favicon where browsers
    ask first (``/favicon.ico``, for the top-level redirect page, which has
    no icon link of its own); after the English site, build each
    translation; in a translation, serve its notebooks for download."""
    if exception is not None or app.builder.format != "html":
        return
    outdir, root = Path(app.outdir), Path(app.srcdir)
    language = translation_of(app.config)
    notebooks = site_notebooks(app.env)
    student_versions.write_student_versions(
        outdir / STUDENT_DIR,
        root,
        notebooks=notebooks,
        solution=translations.solution_title(language, root)
        if language
        else student_versions.SOLUTION,
        header=translations.translate(language, student_versions.HEADER),
    )
    slides.write_decks(outdir / SLIDES_DIR, root, notebooks)
    if app.config.html_favicon:
        shutil.copyfile(
            outdir / "_static" / Path(app.config.html_favicon).name,
            outdir / "favicon.ico",
        )
    if language:
        for path in notebooks:  # the download button's .ipynb
            target = outdir / "_sources" / "book" / path.name
            if target.exists():
                shutil.copyfile(path, target)
        return
    for other in app.config.book_translations:
        command = [
            sys.executable,
            str(Path(__file__).with_name("translations.py")),
            "build",
            "--language",
            other,
        ]
        if not app.warningiserror:
            command.append("--warnings-allowed")
        if subprocess.run(command, cwd=root).returncode:
            raise RuntimeError(
                f"the {other} translation of the book failed to build (its "
                "warnings and errors are above)"
            )


def setup(app: Sphinx) -> dict:
    app.add_config_value("book_translations", [], "html", types=[list])
    app.connect("config-inited", _configure)
    # Early: html-page-context stops at the first handler that returns a
    # template name.
    app.connect("html-page-context", _drop_repeated_scripts, priority=100)
    app.connect("html-page-context", _languages, priority=450)
    app.connect("html-page-context", _launch_translation, priority=600)
    app.connect("doctree-read", _translate_captions)
    app.connect("build-finished", _finish)
    app.add_css_file(LAYOUT_CSS)
    app.add_js_file(LAYOUT_JS)
    app.add_directive("execution-status", ExecutionStatus)
    app.add_directive("student-versions", StudentVersions)
    app.add_directive("slide-decks", SlideDecks)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
