"""The book in other languages: message catalogs, translated builds and
translated notebooks (CONTRIBUTING.md, "Translating the book").

English is the source. Sphinx's ``gettext`` builder extracts every page's
translatable messages (paragraphs, headings, list items, table cells,
captions, admonition titles; code, outputs and math stay as they are)
into ``_build/gettext/book/<page>.pot``. Each language keeps one catalog
per page, ``locales/<language>/LC_MESSAGES/book/<page>.po``; a message is
the page's own MyST markdown, so a translation keeps its math, code, links
and roles.
``_config.yml`` lists the languages (``sphinx.config.book_translations``).

    python scripts/translations.py update     # new English into catalogs
    python scripts/translations.py check      # coverage and markup
    python scripts/translations.py notebooks  # book/<language>/*.ipynb
    python scripts/translations.py build      # _build/html/<language>/

``update`` keeps every translation whose English is unchanged, marks one
whose English changed as fuzzy (shown in English until someone re-translates
it) and drops messages that left the book. ``scripts/book_site.py`` builds
each language into ``_build/html/<language>/`` after the English site
(:func:`build`), with a language switcher on every page.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml
from babel import Locale
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po, write_po

ROOT = Path(__file__).resolve().parent.parent
#: Where the gettext builder writes the templates (its doctrees beside).
TEMPLATES = Path("_build") / "gettext"
#: Every language is translated from at least this share of every page's
#: messages (tests/test_translations.py).
MIN_COVERAGE = 0.95
#: Sphinx settings of every gettext and translated build: one catalog per
#: page, named like the page.
GETTEXT_SETTINGS = {
    "gettext_compact": False,
    "gettext_uuid": False,
    "gettext_location": False,
    "gettext_last_translator": "",
}


def languages(root: Path = ROOT) -> list[str]:
    """The translations that ``_config.yml`` asks for (``["zh_CN"]``)."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    sphinx = config.get("sphinx", {}).get("config", {})
    return list(sphinx.get("book_translations", []))


def catalog_dir(language: str, root: Path = ROOT) -> Path:
    """Where ``language``'s catalogs are (Sphinx's ``locale_dirs``)."""
    return root / "locales" / language / "LC_MESSAGES"


def _sphinx_build(
    builder: str,
    outdir: Path,
    *,
    root: Path = ROOT,
    overrides: dict | None = None,
    warningiserror: bool = True,
    keep_going: bool = True,
    quiet: bool = True,
    fresh: bool = False,
) -> int:
    """One Sphinx build of the book with Jupyter Book's configuration (its
    own doctrees, so that it never disturbs the English HTML build)."""
    from jupyter_book.sphinx import build_sphinx

    doctrees = outdir.parent / f".doctrees-{outdir.name}"
    result = build_sphinx(
        str(root),
        str(outdir),
        noconfig=True,
        path_config=str(root / "_config.yml"),
        doctreedir=str(doctrees),
        confoverrides={
            "latex_individualpages": False,
            "locale_dirs": [str(root / "locales")],
            **GETTEXT_SETTINGS,
            **(overrides or {}),
        },
        builder=builder,
        warningiserror=warningiserror,
        keep_going=keep_going,
        quiet=quiet,
        freshenv=fresh,
    )
    if isinstance(result, Exception):
        raise result
    return result


def build(
    language: str, root: Path = ROOT, *, warningiserror: bool = True
) -> int:
    """Build ``language``'s website into ``_build/html/<language>/`` (the
    English site's build does this after its own); Sphinx's status.

    Sphinx writes it to ``_build/<language>/html/`` first: MyST-NB puts a
    build's output images next to its output folder, which must not be
    inside the English site."""
    staging = root / "_build" / language / "html"
    status = _sphinx_build(
        "html",
        staging,
        root=root,
        overrides={"language": language},
        warningiserror=warningiserror,
        quiet=False,
        # Fresh: a page must follow its catalog (and the site's), which
        # Sphinx does not track as a dependency.
        fresh=True,
    )
    if status == 0:
        target = root / "_build" / "html" / language
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(staging, target)
    return status


def extract(root: Path = ROOT) -> Path:
    """Write the message templates of every page; their folder."""
    outdir = root / TEMPLATES
    # Fresh: a page's messages also come from the site's directives.
    status = _sphinx_build("gettext", outdir, root=root, fresh=True)
    if status:
        raise RuntimeError(f"the gettext build failed (status {status})")
    return outdir


def templates(folder: Path) -> dict[str, Catalog]:
    """The templates of :func:`extract`, by page (``"book/02_..."``)."""
    return {
        path.relative_to(folder).with_suffix("").as_posix(): read_catalog(
            path
        )
        for path in sorted(folder.rglob("*.pot"))
    }


def read_catalog(path: Path) -> Catalog:
    with path.open(encoding="utf-8") as handle:
        return read_po(handle)


_DATES = re.compile(r'^"(POT-Creation|PO-Revision)-Date: .*\n', re.M)


def write_catalog(catalog: Catalog, path: Path) -> None:
    """Write ``catalog`` to ``path`` (atomically), unless only its dates
    would change."""
    for message in catalog:  # Babel's guess ("99.1% of"); messages are text
        message.flags -= {"python-format", "python-brace-format"}
    buffer = io.BytesIO()
    write_po(buffer, catalog, width=0, omit_header=False)
    text = buffer.getvalue().decode("utf-8")
    if path.exists() and _DATES.sub("", path.read_text()) == _DATES.sub(
        "", text
    ):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".po.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


#: The catalog of the site's own text, outside the pages: the strings that
#: ``scripts/*.py`` pass to :func:`translate` (footer, tables, the student
#: versions' header, the language switcher).
SITE = "site"


def site_template(root: Path = ROOT) -> Catalog:
    """The messages of :data:`SITE`: the book's title, the student versions'
    header and every ``translate(language, "literal")`` of ``scripts/*.py``
    (extracted with Babel)."""
    import student_versions
    from babel.messages.extract import extract_from_file

    template = Catalog()
    config = yaml.safe_load((root / "_config.yml").read_text())
    template.add(config["title"], "")
    template.add(student_versions.HEADER, "")
    for path in sorted((root / "scripts").glob("*.py")):
        for _, message, _, _ in extract_from_file(
            "python", str(path), keywords={"translate": (2,)}
        ):
            template.add(message, "")
    return template


#: The catalog of the theme's own text ("Skip to main content", "Back to
#: top"): Sphinx's domain, whose messages pydata-sphinx-theme adds to
#: Sphinx's and does not translate into every language. A language's
#: ``sphinx.po`` comes first; Sphinx's own catalogs supply the rest.
THEME = "sphinx"
THEME_PACKAGE = "pydata_sphinx_theme"


def theme_template() -> Catalog:
    """The messages of :data:`THEME`: pydata-sphinx-theme's template."""
    from importlib.util import find_spec

    package = Path(find_spec(THEME_PACKAGE).origin).parent
    with (package / "locale" / "sphinx.pot").open(encoding="utf-8") as pot:
        return read_po(pot)


def translate(language: str | None, message: str, root: Path = ROOT) -> str:
    """``message`` (text of the site's scripts) in ``language``: its
    translation in the :data:`SITE` catalog, else the English."""
    if not language or language == "en":
        return message
    table = _site_catalog(language, root)
    return table.get(message) or message


_SITE_CATALOGS: dict[tuple[str, Path], dict[str, str]] = {}


def _site_catalog(language: str, root: Path) -> dict[str, str]:
    key = (language, root)
    if key not in _SITE_CATALOGS:
        _SITE_CATALOGS[key] = page_translations(language, SITE, root)
    return _SITE_CATALOGS[key]


def update(
    language: str, root: Path = ROOT, only: set[str] | None = None
) -> list[Path]:
    """Merge the book's current messages into ``language``'s catalogs (or
    into those of the pages ``only``); the catalogs written."""
    pages = {
        **templates(extract(root)),
        SITE: site_template(root),
        THEME: theme_template(),
    }
    config = yaml.safe_load((root / "_config.yml").read_text())
    written = []
    for page, template in pages.items():
        if only is not None and page not in only:
            continue
        path = catalog_dir(language, root) / f"{page}.po"
        if path.exists():
            catalog = read_catalog(path)
            catalog.update(template, no_fuzzy_matching=False)
            catalog.obsolete.clear()
        else:
            catalog = Catalog(locale=language, project=template.project)
            for message in template:
                if message.id:
                    catalog.add(message.id, "")
        catalog.project = config["title"]
        catalog.version = ""
        catalog.language_team = language
        catalog.copyright_holder = config["author"]
        catalog.last_translator = config["author"]
        catalog.msgid_bugs_address = config["repository"]["url"] + "/issues"
        if not isinstance(catalog.revision_date, datetime):  # unset
            catalog.revision_date = catalog.creation_date
        catalog.fuzzy = False
        catalog.header_comment = (
            f"# {Locale.parse(language).english_name} translation of the "
            f"page {page} of {config['title']}.\n"
            f"# Copyright (C) {config['copyright']} {config['author']}\n"
            "# Distributed under the licence of the book's text, CC BY 4.0 "
            "(LICENSE-text.md)."
        )
        write_catalog(catalog, path)
        written.append(path)
    return written


# --- What a message needs -------------------------------------------------

_MARKDOWN = None


def markdown_parser():
    """The markdown-it parser that MyST builds for this book's settings."""
    global _MARKDOWN
    if _MARKDOWN is None:
        from markdown_it.renderer import RendererHTML
        from myst_parser.config.main import MdParserConfig
        from myst_parser.parsers.mdit import create_md_parser

        config = yaml.safe_load((ROOT / "_config.yml").read_text())
        extensions = set(config["parse"]["myst_enable_extensions"])
        _MARKDOWN = create_md_parser(
            MdParserConfig(enable_extensions=extensions), RendererHTML
        )
    return _MARKDOWN


def _walk(tokens):
    for token in tokens:
        yield token
        if token.children:
            yield from _walk(token.children)


def markup(text: str) -> Counter:
    """What a translation must keep of a message: its math, inline code,
    roles, link targets, emphasis and ``{placeholders}``, counted."""
    kept: Counter = Counter(
        ("placeholder", found.group(1) or found.group(2))
        for found in re.finditer(r"\{(\w+)\}(?!`)|%\((\w+)\)s", text)
    )
    for token in _walk(markdown_parser().parse(text)):
        if token.type in ("math_inline", "math_block", "code_inline"):
            kept[(token.type, token.content)] += 1
        elif token.type == "myst_role":
            # a cross-reference's title is text: "title <target>"
            titled = re.fullmatch(r"(?s).*<([^<>]+)>", token.content)
            target = titled.group(1) if titled else token.content
            kept[("role", token.meta.get("name"), target)] += 1
        elif token.type == "link_open":
            kept[("link", token.attrs.get("href"))] += 1
        elif token.type in ("strong_open", "em_open"):
            kept[(token.type,)] += 1
    return kept


_NOT_PROSE = re.compile(
    r"\$\$.*?\$\$|\$[^$]*\$|`[^`]*`|\{[a-z-]+\}|\]\([^)]*\)|https?://\S+",
    re.S,
)


def needs_translation(message_id: str) -> bool:
    """False for messages with no prose: display math (Sphinx extracts it
    too), code, numbers, links' targets."""
    if message_id.startswith("\n") or message_id.lstrip().startswith("\\"):
        return False  # a math block
    prose = _NOT_PROSE.sub(" ", message_id)
    return re.search(r"[A-Za-z]{2,}", prose) is not None


@dataclass(frozen=True)
class Coverage:
    page: str
    translated: int
    total: int  # the messages that need a translation

    @property
    def share(self) -> float:
        return self.translated / self.total if self.total else 1.0


def coverage(
    language: str, pages: dict[str, Catalog], root: Path = ROOT
) -> list[Coverage]:
    """How much of each page (``pages``: the templates) ``language``
    translates. A message counts when its catalog holds it with the same
    English, not fuzzy, with a translation."""
    result = []
    for page, template in pages.items():
        path = catalog_dir(language, root) / f"{page}.po"
        catalog = read_catalog(path) if path.exists() else None
        wanted = [
            m.id for m in template if m.id and needs_translation(m.id)
        ]
        done = 0
        for message_id in wanted:
            message = catalog.get(message_id) if catalog else None
            if message and message.string and not message.fuzzy:
                done += 1
        result.append(Coverage(page, done, len(wanted)))
    return result


def one_paragraph(text: str) -> bool:
    """Whether ``text`` reads as one paragraph, as Sphinx requires of a
    translation (a title ``3. ...`` would start a list: ``3\\. ...``)."""
    blocks = [t.type for t in markdown_parser().parse(text) if t.level == 0]
    return blocks == ["paragraph_open", "paragraph_close"]


def problems(language: str, root: Path = ROOT) -> list[str]:
    """Translations that Sphinx would not use (not one paragraph) or that
    lose or add markup, which would change what the page shows (a formula,
    a link, a piece of code)."""
    found = []
    for path in sorted(catalog_dir(language, root).rglob("*.po")):
        for message in read_catalog(path):
            if not message.id or not message.string:
                continue
            if needs_translation(message.id) and not one_paragraph(
                message.string
            ):
                found.append(
                    f"{path.relative_to(root)}: {message.string[:60]!r}: "
                    "not one paragraph, so Sphinx keeps the English "
                    "(escape a leading number: 3\\. ...)"
                )
            if markup(message.id) != markup(message.string):
                english, translated = (
                    markup(message.id),
                    markup(message.string),
                )
                lost = english - translated
                added = translated - english
                found.append(
                    f"{path.relative_to(root)}: {message.id[:60]!r}...: "
                    f"the translation loses {sorted(lost)} and adds "
                    f"{sorted(added)}"
                )
    return found


#: The page whose glossary table fixes the translation of each technical
#: term: a translated term cell reads ``译名（English term）``.
GLOSSARY_PAGE = "book/references"


def glossary(language: str, root: Path = ROOT) -> dict[str, str]:
    """English term -> its translation, from the glossary table of
    :data:`GLOSSARY_PAGE` (a cell naming several terms, ``query, key,
    value``, gives one entry each)."""
    terms = {}
    for english, translated in page_translations(
        language, GLOSSARY_PAGE, root
    ).items():
        cell = re.fullmatch(r"(.+?)[（(](.+)[）)]", translated)
        if cell is None or cell.group(2) != english:
            continue
        names = re.split(r"\s*[、,，]\s*", cell.group(1))
        englishes = re.split(r",\s*", english)
        if len(names) == len(englishes):
            terms.update(zip(englishes, names, strict=True))
    return terms


def inconsistent_terms(language: str, root: Path = ROOT) -> list[str]:
    """Translations that render a glossary term otherwise: a message whose
    English uses the term must use its translation (or keep the English
    term, as an API name)."""
    terms = glossary(language, root)
    found = []
    for path in sorted((catalog_dir(language, root) / "book").glob("*.po")):
        for english, translated in page_translations(
            language, f"book/{path.stem}", root
        ).items():
            prose = _NOT_PROSE.sub(" ", english)
            for term, name in terms.items():
                used = re.search(rf"\b{re.escape(term)}\b", prose, re.I)
                if (
                    used
                    and name not in translated
                    and term not in translated
                ):
                    found.append(
                        f"{path.stem}: {term!r} is not {name!r} in "
                        f"{translated[:50]!r}..."
                    )
    return found


# --- Translated notebooks -------------------------------------------------


def _normal(text: str) -> str:
    """A message as Sphinx extracts it: lines joined by spaces."""
    return text.replace("\n", " ").strip()


def _flexible(text: str) -> re.Pattern:
    """``text`` as it may sit in the source, wrapped and indented."""
    words = _normal(text).split(" ")
    return re.compile(r"[ \t]*\n?[ \t]*".join(re.escape(w) for w in words))


def translate_markdown(source: str, translations: dict[str, str]) -> str:
    """``source`` (a markdown cell) with every message that ``translations``
    translates replaced, markup and layout otherwise unchanged."""
    tokens = markdown_parser().parse(source)
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    pieces, cursor = [], 0

    def replace(start: int, end: int, old: str, new: str) -> None:
        nonlocal cursor
        start = max(start, cursor)
        match = _flexible(old).search(source, start, end)
        if match is None:
            raise ValueError(f"cannot find {old[:60]!r} in the cell")
        pieces.append(source[cursor : match.start()])
        pieces.append(new)
        cursor = match.end()

    block_map = None
    for token in tokens:
        if token.map is not None:
            block_map = token.map
        start, end = offsets[block_map[0]], offsets[block_map[1]]
        if token.type == "inline":
            key = _normal(token.content)
            if translations.get(key):
                replace(start, end, token.content, translations[key])
        elif token.type == "colon_fence":
            # A directive: its title and its body are messages of their own.
            name, _, title = token.info.partition(" ")
            if title and translations.get(_normal(title)):
                replace(start, end, title, translations[_normal(title)])
            body = token.content
            options = re.match(r"(?:[ \t]*:[\w-]+:.*\n)*", body).group(0)
            text = body[len(options) :]
            if text.strip():
                new = translate_markdown(text, translations)
                if new != text:
                    at = source.index(text, max(start, cursor), end)
                    pieces.append(source[cursor:at])
                    pieces.append(new)
                    cursor = at + len(text)
    pieces.append(source[cursor:])
    return "".join(pieces)


def notebook_folder(language: str, root: Path = ROOT) -> Path:
    """Where the translated notebooks are kept, ``book/<language>/``: Colab
    opens them from the repository."""
    return root / "book" / language


def translated_notebook(
    path: Path, language: str, root: Path = ROOT
) -> dict:
    """The chapter ``path`` with its markdown in ``language``: the catalog's
    translations, the English where a message has none; links to images
    point one folder up."""
    notebook = json.loads(path.read_text())
    page = path.relative_to(root).with_suffix("").as_posix()
    translations = page_translations(language, page, root)
    for cell in notebook["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        source = "".join(cell["source"])
        text = translate_markdown(source, translations)
        text = re.sub(r"(\]\(|\{figure\} )images/", r"\1../images/", text)
        cell["source"] = text.splitlines(keepends=True)
        sections = cell["metadata"].get("slide_sections")
        if sections:  # the slides keep these sections: their headings
            cell["metadata"]["slide_sections"] = [
                translations.get(name) or name for name in sections
            ]
    notebook["metadata"]["book_translation"] = {
        "language": language,
        "source": path.relative_to(root).as_posix(),
        "generated_by": "scripts/translations.py notebooks",
    }
    return notebook


def page_translations(
    language: str, page: str, root: Path = ROOT
) -> dict[str, str]:
    """The translated messages of ``page`` (``"book/01_why_feedback"``),
    English to ``language``; fuzzy ones left out."""
    path = catalog_dir(language, root) / f"{page}.po"
    if not path.exists():
        return {}
    return {
        message.id: message.string
        for message in read_catalog(path)
        if message.id and message.string and not message.fuzzy
    }


def solution_title(language: str, root: Path = ROOT) -> str:
    """How ``language``'s chapters title a solution's admonition."""
    import student_versions

    name = student_versions.SOLUTION
    for path in sorted((catalog_dir(language, root) / "book").glob("*.po")):
        found = page_translations(language, f"book/{path.stem}", root)
        if found.get(name):
            return found[name]
    return name


def translated_notebooks(language: str, root: Path = ROOT) -> list[Path]:
    """The translated notebooks of the chapters, in book order."""
    import colab_cells

    folder = notebook_folder(language, root)
    return [folder / p.name for p in colab_cells.chapter_notebooks(root)]


def write_notebooks(language: str, root: Path = ROOT) -> list[Path]:
    """Write ``book/<language>/`` from the English chapters and the
    catalogs; the notebooks that changed."""
    import colab_cells

    folder = notebook_folder(language, root)
    folder.mkdir(exist_ok=True)
    changed = []
    for path in colab_cells.chapter_notebooks(root):
        text = (
            json.dumps(
                translated_notebook(path, language, root),
                indent=1,
                ensure_ascii=False,
            )
            + "\n"
        )
        target = folder / path.name
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
            changed.append(target)
    return changed


# --- Command line ---------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command",
        choices=["update", "check", "notebooks", "build"],
        help="what to do",
    )
    parser.add_argument(
        "--warnings-allowed",
        action="store_true",
        help="build: do not treat Sphinx's warnings as errors",
    )
    parser.add_argument(
        "--language",
        action="append",
        help="a language of _config.yml's book_translations (default: all)",
    )
    args = parser.parse_args(argv)
    chosen = args.language or languages()
    unknown = sorted(set(chosen) - set(languages()))
    if unknown:
        parser.error(
            f"--language {unknown[0]} is not in _config.yml's "
            f"sphinx.config.book_translations {languages()}"
        )
    status = 0
    for language in chosen:
        if args.command == "update":
            for path in update(language):
                print(path.relative_to(ROOT))
        elif args.command == "build":
            status |= build(
                language, warningiserror=not args.warnings_allowed
            )
        elif args.command == "notebooks":
            for path in write_notebooks(language):
                print(f"{path.relative_to(ROOT)}: written")
        else:
            pages = {
                **templates(extract()),
                SITE: site_template(),
                THEME: theme_template(),
            }
            for item in coverage(language, pages):
                flag = (
                    "" if item.share >= MIN_COVERAGE else "  <- below 95 %"
                )
                counts = (
                    f"{item.translated}/{item.total} ({item.share:.0%})"
                )
                print(f"{language} {item.page}: {counts}{flag}")
                status |= item.share < MIN_COVERAGE
            for problem in problems(language):
                print(problem)
                status = 1
    return status


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
