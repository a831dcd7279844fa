"""The translations of the book (``scripts/translations.py``): every page's catalog is complete
enough and keeps the markup of the English, the translated notebooks are what the catalogs
generate, and what the site builds from them (student versions, slides) works in every language.
The translated notebooks themselves are executed by nbval with the English ones (``make test``
collects ``book/`` recursively); the built pages are opened by ``tests/browser``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import colab_cells  # noqa: E402
import slides  # noqa: E402
import student_versions  # noqa: E402
import translations  # noqa: E402

LANGUAGES = translations.languages(ROOT)
CHAPTERS = colab_cells.chapter_notebooks(ROOT)


@pytest.fixture(scope="module")
def pages() -> dict:
    """The English messages of every page, extracted now by Sphinx's gettext builder."""
    return {
        **translations.templates(translations.extract(ROOT)),
        translations.SITE: translations.site_template(ROOT),
        translations.THEME: translations.theme_template(),
    }


def test_the_book_has_a_translation():
    assert LANGUAGES == ["zh_CN"]
    for language in LANGUAGES:
        assert translations.catalog_dir(language).is_dir()


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_page_is_translated_from_its_current_english(language, pages):
    """At least 95 % of each page's messages (prose, not math or code) have a translation of
    their current English; a page whose English changed after its translation falls behind."""
    coverage = translations.coverage(language, pages, ROOT)
    assert {item.page for item in coverage} == set(pages)
    assert all(item.total > 0 for item in coverage)
    behind = [
        f"{item.page}: {item.translated}/{item.total} ({item.share:.0%})"
        for item in coverage
        if item.share < translations.MIN_COVERAGE
    ]
    assert not behind, (
        f"{language} pages below {translations.MIN_COVERAGE:.0%}: {behind}; run `python "
        "scripts/translations.py update` and translate the new messages"
    )


def test_coverage_counts_only_current_unfuzzy_translations(tmp_path, pages):
    page = "book/07_shared_kv"
    template = pages[page]
    wanted = [m.id for m in template if m.id and translations.needs_translation(m.id)]
    catalog = translations.Catalog(locale="zh_CN")
    for message in template:
        if message.id:
            catalog.add(message.id, "译文")
    # a changed English sentence: the translation of its old version no longer counts
    catalog.delete(wanted[1])
    catalog.add(wanted[1].removesuffix(".") + ", changed.", "译文")
    catalog[wanted[2]].flags.add("fuzzy")
    catalog[wanted[3]].string = ""
    folder = tmp_path / "locales" / "zh_CN" / "LC_MESSAGES" / "book"
    translations.write_catalog(catalog, folder / "07_shared_kv.po")
    (item,) = translations.coverage("zh_CN", {page: template}, tmp_path)
    assert (item.translated, item.total) == (len(wanted) - 3, len(wanted))


@pytest.mark.parametrize("language", LANGUAGES)
def test_translations_keep_the_math_code_links_and_emphasis(language):
    problems = translations.problems(language, ROOT)
    assert not problems, "\n".join(problems[:10])


@pytest.mark.parametrize("language", LANGUAGES)
def test_glossary_terms_are_translated_the_same_way_everywhere(language):
    """The glossary of the references page gives every technical term one translation, with the
    English beside it; every message that uses a term uses that translation."""
    terms = translations.glossary(language, ROOT)
    assert len(terms) >= 30 and terms["feedback memory"] and terms["attention span"]
    inconsistent = translations.inconsistent_terms(language, ROOT)
    assert not inconsistent, "\n".join(inconsistent[:10])


def test_markup_catches_what_a_translation_must_keep():
    english = "The score $e_j$ of `fl.X`, see {cite}`fan2020feedback` and [chapter 2](02_a.ipynb)."
    assert translations.markup(english) == translations.markup(
        "分数 $e_j$（`fl.X`），见 {cite}`fan2020feedback` 与[第 2 章](02_a.ipynb)。"
    )
    assert translations.markup(english) != translations.markup(
        "分数 $e_i$（`fl.X`），见 {cite}`fan2020feedback` 与[第 2 章](02_a.ipynb)。"
    )
    assert translations.markup(english) != translations.markup(
        "分数 $e_j$（`fl.X`），见 {cite}`fan2020feedback` 与[第 2 章](02_b.ipynb)。"
    )
    # CommonMark: a closing ** after full-width punctuation and before a CJK letter does not close
    assert translations.markup("**memory** is") == translations.markup("**记忆**（memory）是")
    assert translations.markup("**memory** is") != translations.markup("**记忆（memory）**是")
    assert translations.markup("{total} on the CPU") != translations.markup("CPU 上")
    # Sphinx keeps the English where a translation does not parse as one paragraph
    assert not translations.one_paragraph("3. 推导注意力分数")  # an ordered list
    assert translations.one_paragraph("3\\. 推导注意力分数")


@pytest.mark.parametrize(
    ("message", "needed"),
    [
        ("What you will learn", True),
        ("term", True),
        ("\n\\delta_j = n - j\n", False),
        ("$n$", False),
        ("`fl.FeedbackLM`", False),
        ("`torch.softmax` and $x$", True),
        ("[`FeedbackLM`](05_feedback_transformer.ipynb)", False),
        ("2.3", False),
    ],
)
def test_needs_translation(message, needed):
    assert translations.needs_translation(message) is needed


def test_translate_markdown_replaces_each_message_in_place():
    source = (
        "## What you will learn\n\n"
        "- Why the higher\n  layers are out of reach.\n"
        "- Untranslated item.\n\n"
        "A wrapped paragraph with $x$\nand `code`.\n\n"
        "$$\nm_t = x\n$$\n\n"
        "| term | depends |\n| --- | --- |\n| A | yes |\n\n"
        ":::{admonition} Solution\n:class: dropdown\n\nThe answer.\n:::\n"
    )
    table = {
        "What you will learn": "你将学到什么",
        "Why the higher layers are out of reach.": "为什么更高的层无法触及。",
        "A wrapped paragraph with $x$ and `code`.": "一个含 $x$ 与 `code` 的段落。",
        "term": "项",
        "yes": "是",
        "Solution": "解答",
        "The answer.": "答案。",
    }
    assert translations.translate_markdown(source, table) == (
        "## 你将学到什么\n\n"
        "- 为什么更高的层无法触及。\n"
        "- Untranslated item.\n\n"
        "一个含 $x$ 与 `code` 的段落。\n\n"
        "$$\nm_t = x\n$$\n\n"
        "| 项 | depends |\n| --- | --- |\n| A | 是 |\n\n"
        ":::{admonition} 解答\n:class: dropdown\n\n答案。\n:::\n"
    )
    assert translations.translate_markdown(source, {}) == source


@pytest.mark.parametrize("language", LANGUAGES)
def test_translated_notebooks_are_generated_from_the_catalogs(language):
    """book/<language>/ holds exactly what `python scripts/translations.py notebooks` writes:
    the English chapters' code, outputs and metadata, with the markdown translated."""
    folder = translations.notebook_folder(language, ROOT)
    assert sorted(p.name for p in folder.glob("*.ipynb")) == sorted(p.name for p in CHAPTERS)
    for english in CHAPTERS:
        expected = translations.translated_notebook(english, language, ROOT)
        stored = json.loads((folder / english.name).read_text())
        assert stored == expected, (
            f"{folder.name}/{english.name} is out of date: run `python scripts/translations.py "
            "notebooks`"
        )
        source = json.loads(english.read_text())
        for mine, theirs in zip(stored["cells"], source["cells"], strict=True):
            assert mine["cell_type"] == theirs["cell_type"]
            if mine["cell_type"] == "code":
                assert mine == theirs  # the same install cell, code and stored outputs
        translated = sum(
            m["source"] != t["source"]
            for m, t in zip(stored["cells"], source["cells"], strict=True)
            if m["cell_type"] == "markdown"
        )
        markdown = sum(c["cell_type"] == "markdown" for c in source["cells"])
        assert translated >= 0.9 * markdown, f"{english.name}: {translated}/{markdown} translated"


@pytest.mark.parametrize("language", LANGUAGES)
def test_translated_student_versions_drop_the_solutions(language, tmp_path):
    title = translations.solution_title(language, ROOT)
    assert title != student_versions.SOLUTION
    header = translations.translate(language, student_versions.HEADER)
    assert header != student_versions.HEADER and "{url}" in header
    written = student_versions.write_student_versions(
        tmp_path,
        ROOT,
        notebooks=translations.translated_notebooks(language, ROOT),
        solution=title,
        header=header,
    )
    assert [p.name for p in written] == [p.name for p in CHAPTERS]
    for path in written:
        text = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"])
        assert "{admonition} " + title not in text, path.name
        assert "{admonition} Solution" not in text, path.name
        assert header.split("{url}")[0] in text


@pytest.mark.parametrize("language", LANGUAGES)
def test_translated_slides_keep_their_sections(language):
    """A cell that shows only some sections on its slide names them in the translation."""
    for path in translations.translated_notebooks(language, ROOT):
        deck = slides.deck_notebook(json.loads(path.read_text()), path.name)
        assert deck["cells"], path.name


def test_the_command_line_refuses_an_unknown_language(capsys):
    with pytest.raises(SystemExit) as exit_info:
        translations.main(["check", "--language", "xx"])
    assert exit_info.value.code == 2
    assert "--language xx is not in _config.yml" in capsys.readouterr().err
