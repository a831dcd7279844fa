"""Every page of the built website, in every language (English at the top, each translation in
its folder, ``zh_CN/``), opened in headless Chromium from a localhost server. Every page's language
switcher links the same page in every language, and works on a phone.

Each page is loaded once (:func:`visit`); the tests then check what the browser saw: math typeset by
the site's own MathJax with no TeX errors and no raw TeX left in the prose, every image loaded,
nothing fetched from another host, no console errors, no widget placeholder, each cell's printed
lines in one block, every internal link and anchor resolving, well-formed Colab and Binder links on
every chapter, the licences of the text and the code in every page's footer, and every page's canonical
address on GitHub Pages (from ``repository.url``). Every chapter's
slide deck opens offline, with reveal.js ready and its math typeset, and the teaching guide links it. A screenshot of each page is kept in ``_build/screenshots/``. On a phone's viewport (375
CSS pixels), the menu button opens the chapter list on every page and the page-contents button shows
the sections of every chapter. At 1280 px and at 375 px nothing scrolls sideways: no code or output
block, table or displayed equation, and not the page; at 1280 px a code cell's lines fit without
wrapping (scripts/site_static holds the layout rules that make this so). The text of every figure,
SVG diagram or matplotlib PNG, is shown at 9 CSS pixels or more at both widths, and a printed
chapter shows its solutions and cuts no code.

The site must be built first (``make book``; ``make test`` builds it before running this file).
Chromium and ChromeDriver come from Debian's ``chromium`` and ``chromium-driver`` packages
(``make browser`` installs them where apt-get can). Without them the tests are skipped, unless
``FEEDBACK_BOOK_BROWSER=require`` (set by ``make test``) turns the skip into a failure.
"""

from __future__ import annotations

import functools
import html as html_lib
import http.server
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
REQUIRE_ENV = "FEEDBACK_BOOK_BROWSER"
#: The flags that keep Chromium quiet on a machine without a network (no update or sync traffic).
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
]


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV, "").lower() == "require":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=require)", pytrace=False)
    pytest.skip(reason)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="session")
def site() -> Path:
    if not (SITE / "index.html").is_file():
        _unavailable(f"no built website at {SITE}: run `make book` first")
    return SITE


@pytest.fixture(scope="session")
def base_url(site: Path) -> Iterator[str]:
    """``http://127.0.0.1:PORT/``, serving the built site for the whole session."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def driver() -> Iterator[object]:
    """A headless Chromium driven by ChromeDriver, logging the browser console."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (shutil.which(path) or Path(path).is_file()):
            _unavailable(f"{path} not found: install Debian's {package} package (`make browser`)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(60)
    browser.set_script_timeout(60)
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)  # only this run's screenshots count
    SCREENSHOTS.mkdir(parents=True)
    yield browser
    browser.quit()
    shutil.rmtree(profile, ignore_errors=True)


sys.path.insert(0, str(ROOT / "scripts"))

import book_site  # noqa: E402
import colab_cells  # noqa: E402
import translations  # noqa: E402

TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
DOCUMENTS = [TOC["root"], *(entry["file"] for part in TOC["parts"] for entry in part["chapters"])]
#: The site's languages: English at the top, each translation in its folder (``zh_CN/``).
LANGUAGES = translations.languages(ROOT)
PREFIXES = ["", *(f"{language}/" for language in LANGUAGES)]
#: Every page of the book, in every language.
DOCUMENT_PAGES = [f"{prefix}{name}.html" for prefix in PREFIXES for name in DOCUMENTS]
PAGES = [
    *(
        f"{prefix}{page}"
        for prefix in PREFIXES
        for page in ("index.html", "genindex.html", "search.html")
    ),
    *DOCUMENT_PAGES,
]
CHAPTERS = [
    f"{prefix}{path.relative_to(ROOT).with_suffix('').as_posix()}.html"
    for prefix in PREFIXES
    for path in colab_cells.chapter_notebooks(ROOT)
    if path.stem != "index"
]


def notebook_of(page: str) -> str:
    """The notebook that a chapter's launch buttons open: ``book/NAME.ipynb``, or for a translated
    page ``LANGUAGE/book/NAME.html`` the generated ``book/LANGUAGE/NAME.ipynb``."""
    language, _, name = page.rpartition("book/")
    language = language.rstrip("/")
    stem = name.removesuffix(".html")
    return f"book/{language}/{stem}.ipynb" if language else f"book/{stem}.ipynb"


#: TeX that must never reach the reader as text (outside code, where it may be shown on purpose).
RAW_TEX = re.compile(
    r"\$\$|\\begin\{|\\end\{|\\(?:frac|sum|sqrt|mathrm|operatorname|top|left|right|cdot)\b"
)

COLLECT = """
const done = arguments[arguments.length - 1];
const finish = () => {
  const article = document.querySelector("article") || document.body;
  const prose = article.cloneNode(true);
  prose.querySelectorAll("pre, code, mjx-container, script, style, .cell_output").forEach(e => e.remove());
  const maths = Array.from(document.querySelectorAll(".math"));
  done({
    title: document.title,
    url: location.href,
    maths: maths.length,
    untypeset: maths.filter(e => !e.querySelector("mjx-container")).map(e => e.textContent.slice(0, 80)),
    tex_errors: Array.from(document.querySelectorAll("mjx-merror")).map(e => e.textContent.slice(0, 80)),
    mathjax: window.MathJax && window.MathJax.version ? window.MathJax.version : null,
    prose: prose.textContent,
    images: Array.from(document.images).map(i => ({src: i.src, ok: i.complete && i.naturalWidth > 0})),
    resources: Array.from(document.querySelectorAll("script[src], link[href][rel~=stylesheet], img[src], iframe[src]"))
      .map(e => e.src || e.href),
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href),
    widgets: document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"], .jupyter-widgets').length,
    // Per cell output: how many blocks each stream (stdout, stderr) was split into.
    split_streams: Array.from(document.querySelectorAll(".cell_output")).flatMap(out => {
      const blocks = Array.from(out.children).filter(e => e.matches(".output.stream"));
      return blocks.length > 2 ? [`${blocks.length} blocks: ${blocks[0].textContent.slice(0, 60)}`] : [];
    }),
    text: document.body.innerText,
  });
};
if (document.querySelector(".math") && window.MathJax && MathJax.startup && MathJax.startup.promise) {
  MathJax.startup.promise.then(finish, finish);
} else {
  finish();
}
"""


def _screenshot_name(page: str) -> str:
    return page.replace("/", "__").removesuffix(".html") + ".png"


@dataclass
class PageReport:
    page: str
    data: dict
    console: list[dict] = field(default_factory=list)


_REPORTS: dict[str, PageReport] = {}


def visit(page: str, driver, base_url: str) -> PageReport:
    """Open ``page`` once, wait for MathJax, and keep what the browser saw and logged."""
    if page not in _REPORTS:
        driver.get_log("browser")  # drop what earlier pages logged
        driver.get(base_url + page)
        # The top-level index.html only redirects (a meta refresh): wait for the page it leads to.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and driver.execute_script(
            "return document.readyState !== 'complete' || !document.body"
            " || !!document.querySelector('meta[http-equiv=refresh]')"
        ):
            time.sleep(0.05)
        # Wait for MathJax's script to define itself where a page loads it (it is deferred).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and driver.execute_script(
            "return !!document.querySelector('script[src*=\"mathjax\"]') && !(window.MathJax && MathJax.startup)"
        ):
            time.sleep(0.05)
        data = driver.execute_async_script(COLLECT)
        time.sleep(0.2)  # let late errors reach the log
        console = driver.get_log("browser")
        driver.save_screenshot(str(SCREENSHOTS / _screenshot_name(page)))
        _REPORTS[page] = PageReport(page, data, console)
    return _REPORTS[page]


@pytest.fixture(params=PAGES)
def report(request, driver, base_url, site) -> PageReport:
    return visit(request.param, driver, base_url)


def test_page_loads_with_no_console_errors(report):
    errors = [entry["message"] for entry in report.console if entry["level"] == "SEVERE"]
    assert not errors, f"{report.page}: console errors: {errors}"
    assert "404" not in report.data["title"], f"{report.page}: not found"


def test_math_is_typeset_by_the_sites_own_mathjax(report, base_url):
    data = report.data
    if data["maths"]:
        assert data["mathjax"] and data["mathjax"].startswith("3."), (
            f"{report.page}: MathJax 3 did not load"
        )
    assert not data["untypeset"], f"{report.page}: math left untypeset: {data['untypeset'][:5]}"
    assert not data["tex_errors"], f"{report.page}: TeX errors: {data['tex_errors'][:5]}"
    raw = sorted(set(RAW_TEX.findall(data["prose"])))
    assert not raw, f"{report.page}: raw TeX in the text: {raw}"


def test_everything_loads_from_the_site_itself(report, base_url):
    foreign = [url for url in report.data["resources"] if not url.startswith(base_url)]
    assert not foreign, (
        f"{report.page}: loads from other hosts (the site must work offline): {foreign}"
    )
    broken = [image["src"] for image in report.data["images"] if not image["ok"]]
    assert not broken, f"{report.page}: images that did not load: {broken}"


def test_no_widget_placeholder(report):
    assert report.data["widgets"] == 0, (
        f"{report.page}: a widget view with no widget JavaScript to draw it"
    )
    assert "Loading widget" not in report.data["text"]


def test_a_cell_prints_into_one_block(report):
    # nb_merge_streams in _config.yml: a training log is one block, not one block per line.
    split = report.data["split_streams"]
    assert not split, f"{report.page}: a cell's printed lines split into blocks: {split[:3]}"


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)


@functools.cache
def _ids(path: Path) -> set[str]:
    """The ids and anchor names of a built page (parsed once, however many links point to it)."""
    parser = _Ids()
    parser.feed(path.read_text(errors="replace"))
    return parser.ids


def test_internal_links_resolve(report, base_url, site):
    broken = []
    for link in report.data["links"]:
        if not link.startswith(base_url):
            continue
        url, fragment = urldefrag(link)
        path = site / unquote(urlsplit(url).path).lstrip("/")
        if path.is_dir():
            path = path / "index.html"
        if not path.is_file():
            broken.append(link)
        elif fragment and path.suffix == ".html" and unquote(fragment) not in _ids(path):
            broken.append(link)
    assert not broken, f"{report.page}: internal links that do not resolve: {sorted(set(broken))}"


@pytest.mark.parametrize("page", CHAPTERS)
def test_chapter_has_a_well_formed_colab_link(page, driver, base_url, site):
    url, branch = colab_cells.repository(ROOT)
    owner_repo = urlsplit(url).path.strip("/")
    expected = (
        f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/{notebook_of(page)}"
    )
    links = [
        link
        for link in visit(page, driver, base_url).data["links"]
        if "colab.research.google.com" in link
    ]
    assert links == [expected], f"{page}: Colab links {links}, expected [{expected}]"
    assert (ROOT / notebook_of(page)).is_file()


@pytest.mark.parametrize("page", CHAPTERS)
def test_chapter_has_a_well_formed_binder_link(page, driver, base_url, site):
    url, branch = colab_cells.repository(ROOT)
    owner_repo = urlsplit(url).path.strip("/")
    expected = f"https://mybinder.org/v2/gh/{owner_repo}/{branch}?urlpath=tree/{notebook_of(page)}"
    links = [link for link in visit(page, driver, base_url).data["links"] if "mybinder.org" in link]
    assert links == [expected], f"{page}: Binder links {links}, expected [{expected}]"


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_translated_chapter_downloads_as_its_translated_notebook(language, site):
    """The download button of a translated page gives the generated notebook of book/<language>/
    (its markdown translated), not the English chapter."""
    for path in colab_cells.chapter_notebooks(ROOT):
        served = site / language / "_sources" / "book" / path.name
        mine = ROOT / "book" / language / path.name
        assert served.read_bytes() == mine.read_bytes(), f"{served} is not {mine}"
        html = (site / language / "book" / f"{path.stem}.html").read_text()
        assert f'href="../_sources/book/{path.name}"' in html, f"{path.stem}: no download link"


def _prose_of(path: Path) -> str:
    """A built page's text outside code, outputs, scripts and styles, spaces normalized."""
    text = re.sub(r"(?is)<(pre|code|script|style)\b.*?</\1>", " ", path.read_text())
    text = html_lib.unescape(re.sub(r"<[^>]+>", " ", text))
    return " ".join(text.split())


@pytest.mark.parametrize("language", LANGUAGES)
def test_translated_pages_show_their_translations(language, site):
    """Sphinx uses a translation only when it parses as the English does: where it does not (a
    title "3. ..." read as a list), the page silently keeps the English. No six-word run of a
    translated message's English may remain on its translated page."""
    kept = []
    for name in DOCUMENTS:
        prose = _prose_of(site / language / f"{name}.html")
        for english in translations.page_translations(language, name, ROOT):
            for run in re.split(r"[$`*_\[\](){}|\\]", english):
                words = run.split()
                for start in range(len(words) - 5):
                    window = words[start : start + 6]
                    if all(re.search("[A-Za-z]{2}", word) for word in window):
                        if " ".join(window) in prose:
                            kept.append(f"{name}: {' '.join(window)!r}")
                        break  # one window per run
    assert not kept, f"{language}: English left on translated pages: {kept[:10]}"


#: Draws two different Chinese characters in the font of the page's first paragraph: without a
#: font that has them, both are the same empty box ("tofu").
GLYPHS = """
const p = document.querySelector("article p");
const canvas = document.createElement("canvas");
canvas.width = canvas.height = 40;
const context = canvas.getContext("2d");
const draw = text => {
  context.clearRect(0, 0, 40, 40);
  context.font = `32px ${getComputedStyle(p).fontFamily}`;
  context.fillText(text, 2, 34);
  return Array.from(context.getImageData(0, 0, 40, 40).data).join(",");
};
return {font: getComputedStyle(p).fontFamily, differ: draw("注") !== draw("意")};
"""


@pytest.mark.parametrize("language", LANGUAGES)
def test_chinese_text_is_drawn_with_a_chinese_font(language, driver, base_url, site):
    if not language.startswith("zh"):
        pytest.skip("not a Chinese edition")
    for page in (f"{language}/book/index.html", f"{language}/book/05_feedback_transformer.html"):
        visit(page, driver, base_url)  # loads the page (and keeps its report)
        driver.get(base_url + page)
        drawn = driver.execute_script(GLYPHS)
        assert drawn["differ"], f"{page}: Chinese drawn as empty boxes with {drawn['font']}"


#: A word that every language's search must find, by language folder.
SEARCH_WORDS = {"": "memory", "zh_CN/": "注意力"}


@pytest.mark.parametrize("prefix", PREFIXES)
def test_search_finds_pages_in_every_language(prefix, driver, base_url, site):
    """Sphinx's search, in the page's language (the Chinese index splits words with jieba)."""
    from urllib.parse import quote

    from selenium.webdriver.support.ui import WebDriverWait

    word = SEARCH_WORDS[prefix]
    driver.get(f"{base_url}{prefix}search.html?q={quote(word)}")
    found = WebDriverWait(driver, 20).until(
        lambda d: d.execute_script(
            "const r = document.querySelectorAll('#search-results ul.search li');"
            "return r.length > 0 ? r.length : null;"
        )
    )
    assert found >= 3, f"{prefix}search.html: {found} results for {word!r}"


class _Canonical(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "link" and attributes.get("rel") == "canonical":
            self.hrefs.append(attributes.get("href"))


def test_every_page_names_its_canonical_address_on_github_pages(site):
    """html_baseurl, which book_site derives from repository.url, reaches every page (the root
    index.html only redirects to the landing page, which has its own)."""
    url, _ = colab_cells.repository(ROOT)
    base = book_site.pages_url(url)  # https://OWNER.github.io/NAME/
    for page in [page for page in PAGES if page not in REDIRECTS]:
        parser = _Canonical()
        parser.feed((site / page).read_text())
        assert parser.hrefs == [base + page], f"{page}: canonical links {parser.hrefs}"


#: The top folder of each language only redirects to its landing page.
REDIRECTS = {f"{prefix}index.html" for prefix in PREFIXES}


class _Switcher(HTMLParser):
    """The page's language (``<html lang>``) and its language switcher's links."""

    def __init__(self) -> None:
        super().__init__()
        self.lang: str | None = None
        self.links: list[dict] = []
        self._inside = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "html":
            self.lang = attributes.get("lang")
        elif tag == "div" and "dropdown-language-switcher" in classes:
            self._inside = 1
        elif tag == "div" and self._inside:
            self._inside += 1
        elif tag == "a" and self._inside:
            self.links.append(attributes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._inside:
            self._inside -= 1


def test_every_page_links_its_counterpart_in_every_language(site):
    """The switcher in every page's header links the same page in English and in every
    translation, marks the current language, and every counterpart exists."""
    for page in [page for page in PAGES if page not in REDIRECTS]:
        prefix = next(p for p in reversed(PREFIXES) if page.startswith(p))
        name = page.removeprefix(prefix)
        parser = _Switcher()
        parser.feed((site / page).read_text())
        language = prefix.rstrip("/") or "en"
        assert parser.lang == language.replace("_", "-"), f"{page}: <html lang={parser.lang}>"
        targets = {}
        for link in parser.links:
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), link["href"]))
            targets[link["hreflang"]] = resolved
            assert (site / resolved).is_file(), f"{page}: the switcher links {resolved}, not built"
            if link["hreflang"] == parser.lang:
                assert link.get("aria-current") == "page", f"{page}: current language not marked"
        expected = {(p.rstrip("/") or "en").replace("_", "-"): f"{p}{name}" for p in PREFIXES}
        assert targets == expected, f"{page}: switcher links {targets}, expected {expected}"


@pytest.mark.parametrize("page", ["book/05_feedback_transformer.html", "book/index.html"])
def test_the_language_switcher_works_on_a_phone(page, phone, base_url, site):
    """On a phone the switcher's button is on screen; a tap opens it and a tap on each other
    language opens the same page in that language, and back."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for prefix in PREFIXES[1:]:
        for start, goal in ((page, f"{prefix}{page}"), (f"{prefix}{page}", page)):
            phone.get(base_url + start)
            button = phone.find_element(By.CSS_SELECTOR, ".dropdown-language-switcher button")
            box = phone.execute_script(
                "const r = arguments[0].getBoundingClientRect();"
                "return [r.left, r.right, r.width, window.innerWidth];",
                button,
            )
            assert box[2] > 0 and box[0] >= 0 and box[1] <= box[3], (
                f"{start}: switcher off screen {box}"
            )
            button.click()
            code = (goal.split("/")[0] if goal.startswith(prefix) else "en").replace("_", "-")
            link = phone.find_element(
                By.CSS_SELECTOR, f'.dropdown-language-switcher a[hreflang="{code}"]'
            )
            WebDriverWait(phone, 5).until(lambda d, link=link: link.is_displayed())
            link.click()
            WebDriverWait(phone, 10).until(lambda d, url=base_url + goal: d.current_url == url)


def test_every_page_names_the_licences_in_its_footer(driver, base_url, site):
    for page in PAGES:
        links = visit(page, driver, base_url).data["links"]
        assert "https://creativecommons.org/licenses/by/4.0/" in links, page
        assert any(link.endswith("/LICENSE") for link in links), page


def test_every_page_has_a_screenshot(driver, base_url, site):
    for page in PAGES:
        visit(page, driver, base_url)
    shots = {path.name for path in SCREENSHOTS.glob("*.png") if path.stat().st_size > 0}
    pages = {name for name in shots if not name.startswith("slides__")}  # the decks' own below
    assert pages == {_screenshot_name(page) for page in PAGES}, shots


#: The chapters' slide decks (scripts/slides.py), written next to the site by its build.
DECKS = [
    f"{prefix}slides/{path.stem}.slides.html"
    for prefix in PREFIXES
    for path in colab_cells.chapter_notebooks(ROOT)
]

DECK_STATE = r"""
const done = arguments[arguments.length - 1];
const report = () => done({
  ready: !!(window.Reveal && Reveal.isReady()),
  slides: window.Reveal ? Reveal.getTotalSlides() : 0,
  typeset: document.querySelectorAll("mjx-container").length,
  tex_errors: Array.from(document.querySelectorAll("mjx-merror")).map(e => e.textContent.slice(0, 80)),
  text: document.querySelector(".reveal").innerText,
});
const wait = () => (window.Reveal && Reveal.isReady() ? Promise.resolve() : new Promise(r => setTimeout(r, 100)).then(wait));
Promise.all([wait(), window.MathJax && MathJax.startup ? MathJax.startup.promise : null]).then(report, report);
"""


@pytest.mark.parametrize("deck", DECKS)
def test_slide_deck_opens_offline_with_its_math_typeset(deck, driver, base_url, site):
    report = visit(deck, driver, base_url)
    errors = [entry["message"] for entry in report.console if entry["level"] == "SEVERE"]
    assert not errors, f"{deck}: console errors: {errors}"
    # the figures are inside the deck, as data: URLs
    foreign = [
        url for url in report.data["resources"] if not url.startswith((base_url, "data:image/"))
    ]
    assert not foreign, f"{deck}: loads from other hosts: {foreign}"
    state = driver.execute_async_script(DECK_STATE)
    assert state["ready"] and state["slides"] >= 5, f"{deck}: reveal.js not ready: {state}"
    raw = RAW_TEX.findall(state["text"]) + re.findall(r"\$[^$\s][^$]*\$", state["text"])
    assert not state["tex_errors"] and not raw, f"{deck}: math not typeset: {raw or state}"


@pytest.mark.parametrize("prefix", PREFIXES)
def test_the_teaching_guide_links_every_deck(prefix, driver, base_url, site):
    links = visit(f"{prefix}book/teaching_guide.html", driver, base_url).data["links"]
    decks = [base_url + deck for deck in DECKS if deck.startswith(f"{prefix}slides/")]
    assert [link for link in links if "/slides/" in link] == decks


#: A phone's viewport (CSS pixels), emulated through the DevTools protocol so that the page's
#: ``<meta name="viewport">`` and its small-screen layout apply as on a real phone.
PHONE = {"width": 375, "height": 812, "deviceScaleFactor": 2, "mobile": True}

SIDEBAR = """
const e = document.querySelector(arguments[0]);
if (!e) return null;
const r = e.getBoundingClientRect();
const links = Array.from(e.querySelectorAll("a[href]")).filter(a => {
  const b = a.getBoundingClientRect();
  return b.width > 0 && b.height > 0 && b.left >= 0 && b.right <= window.innerWidth + 1;
});
return {on_screen: r.width > 0 && r.left >= 0 && r.right <= window.innerWidth + 1
        && getComputedStyle(e).visibility !== "hidden", links: links.length};
"""


@pytest.fixture
def phone(driver):
    """The driver with a phone's viewport, restored to the desktop size afterwards."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    yield driver
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _open_sidebar(driver, base_url: str, page: str, toggle: str, sidebar: str) -> tuple[dict, dict]:
    """The sidebar's state before and after a tap on its toggle button."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base_url + page)
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )
    before = driver.execute_script(SIDEBAR, sidebar)
    driver.find_element(By.CSS_SELECTOR, toggle).click()
    after = before
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the sidebar slides in
        after = driver.execute_script(SIDEBAR, sidebar)
        if after and after["on_screen"]:
            break
        time.sleep(0.1)
    return before, after


@pytest.mark.parametrize("page", DOCUMENT_PAGES)
def test_menu_opens_the_chapter_list_on_a_phone(page, phone, base_url, site):
    before, after = _open_sidebar(
        phone, base_url, page, "button.primary-toggle", ".bd-sidebar-primary"
    )
    assert before is not None and not before["on_screen"], (
        f"{page}: the chapter list is not hidden at first"
    )
    assert after["on_screen"], f"{page}: the menu button did not open the chapter list"
    assert after["links"] >= len(DOCUMENTS) - 1, (
        f"{page}: the opened menu shows {after['links']} links"
    )


@pytest.mark.parametrize("page", CHAPTERS)
def test_contents_button_opens_the_page_contents_on_a_phone(page, phone, base_url, site):
    before, after = _open_sidebar(
        phone, base_url, page, "button.secondary-toggle", ".bd-sidebar-secondary"
    )
    assert before is not None and not before["on_screen"], (
        f"{page}: the page contents are not hidden at first"
    )
    assert after["on_screen"] and after["links"] > 0, (
        f"{page}: the page-contents button did not show the page's sections"
    )


#: Waits until MathJax has typeset the page (at once where the page has no MathJax).
TYPESET = """
const done = arguments[0];
const typeset = window.MathJax && MathJax.startup && MathJax.startup.promise;
(typeset || Promise.resolve()).then(() => done(), () => done());
"""


def _open_typeset(driver, base_url: str, page: str) -> None:
    """Load ``page`` (``driver.get`` waits for the load event) and wait for MathJax, which changes
    the width of what it typesets."""
    driver.get(base_url + page)
    driver.execute_async_script(TYPESET)


#: What would make a reader scroll sideways: any box in the article that scrolls its content
#: sideways (a code or output block, the container of a wide table, a displayed equation), and the
#: page itself when it is wider than the window. With ``nowrap``, the code cells' own lines are
#: measured unwrapped instead.
OVERFLOW = """
const nowrap = arguments[0];
const scrolls = e => ["auto", "scroll"].includes(getComputedStyle(e).overflowX);
const boxes = nowrap ? document.querySelectorAll("article .cell_input pre")
                     : Array.from(document.querySelectorAll("article *")).filter(scrolls);
const wide = [];
boxes.forEach(e => {
  if (e.getClientRects().length === 0) return;  // not displayed (a collapsed solution)
  if (nowrap) e.style.whiteSpace = "pre";
  if (e.scrollWidth > e.clientWidth + 1)
    wide.push(`${e.scrollWidth} > ${e.clientWidth} px: ${e.textContent.trim().slice(0, 60)}`);
  if (nowrap) e.style.whiteSpace = "";
});
const root = document.documentElement;
return {blocks: wide, page: root.scrollWidth, window: root.clientWidth};
"""


def _assert_nothing_scrolls(driver, base_url: str, page: str, width: str) -> None:
    _open_typeset(driver, base_url, page)
    seen = driver.execute_script(OVERFLOW, False)
    assert not seen["blocks"], (
        f"{page} at {width}: blocks that scroll sideways: {seen['blocks'][:3]}"
    )
    assert seen["page"] <= seen["window"], f"{page} at {width}: the page is {seen['page']} px wide"


@pytest.mark.parametrize("page", DOCUMENT_PAGES)
def test_nothing_scrolls_sideways_on_a_laptop(page, driver, base_url, site):
    _assert_nothing_scrolls(driver, base_url, page, "1280 px")
    # A code cell's lines (at most 88 characters, book/ruff.toml) fit without wrapping here.
    wrapped = driver.execute_script(OVERFLOW, True)["blocks"]
    assert not wrapped, f"{page} at 1280 px: code lines that wrap: {wrapped[:3]}"


@pytest.mark.parametrize("page", DOCUMENT_PAGES)
def test_nothing_scrolls_sideways_on_a_phone(page, phone, base_url, site):
    _assert_nothing_scrolls(phone, base_url, page, "375 px")


#: What a printed chapter would hide or cut, once the browser's ``beforeprint`` event has run: the
#: content of a closed ``details`` (a hidden code solution) or of a closed dropdown (a prose
#: solution), and code or output blocks wider than the page.
PRINTED = """
window.dispatchEvent(new Event("beforeprint"));
const visible = e => e.checkVisibility({visibilityProperty: true, contentVisibilityAuto: true});
const hidden = [];
document.querySelectorAll("article details, article .dropdown.admonition").forEach(box => {
  const content = box.querySelector(":scope > :not(summary):not(.admonition-title)");
  if (content && !visible(content)) hidden.push(box.textContent.trim().slice(0, 60));
});
const cut = Array.from(document.querySelectorAll("article pre"))
  .filter(e => visible(e) && e.scrollWidth > e.clientWidth + 1)
  .map(e => `${e.scrollWidth} > ${e.clientWidth} px: ${e.textContent.trim().slice(0, 60)}`);
window.dispatchEvent(new Event("afterprint"));
const reclosed = document.querySelectorAll("article details[open]").length;
return {hidden, cut, reclosed};
"""
#: A printed A4 page, about 720 CSS pixels wide inside its margins.
PRINT_PAGE = {"width": 720, "height": 1000, "deviceScaleFactor": 1, "mobile": False}


@pytest.mark.parametrize("page", CHAPTERS)
def test_printing_shows_every_solution_and_cuts_no_code(page, driver, base_url, site):
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PRINT_PAGE)
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
    try:
        _open_typeset(driver, base_url, page)
        printed = driver.execute_script(PRINTED)
    finally:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert not printed["hidden"], f"{page}: solutions that print closed: {printed['hidden'][:3]}"
    assert not printed["cut"], f"{page}: code cut at the printed page's edge: {printed['cut'][:3]}"
    assert printed["reclosed"] == 0, f"{page}: solutions left open after printing"


#: The smallest text a reader should have to read, in CSS pixels.
MIN_TEXT_PX = 9
#: The font sizes an SVG diagram sets: attributes (font-size="14") and style rules (font-size: 12px).
SVG_FONT_SIZE = re.compile(r'font-size(?:="|:\s*)(\d+(?:\.\d+)?)')
FIGURES = """
return Array.from(document.querySelectorAll("article img"))
  .filter(img => img.getClientRects().length > 0)  // not in a closed solution
  .map(img => ({src: img.src, width: img.getBoundingClientRect().width}));
"""


def _smallest_figure_text(driver, base_url: str, site: Path, page: str) -> list[str]:
    """The figures of ``page`` whose smallest text is shown below MIN_TEXT_PX. An SVG diagram
    states its font sizes in its own units (its viewBox); a PNG figure records its resolution and
    its smallest font in points (feedback_lib.book.style), so that font is drawn at
    ``points * dpi / 72`` image pixels, which the page scales by shown width / image width."""
    from feedback_lib.book import style

    driver.get(base_url + page)
    small = []
    for image in driver.execute_script(FIGURES):
        path = site / unquote(urlsplit(image["src"]).path).lstrip("/")
        if path.suffix == ".svg":
            svg = path.read_text()
            width = float(re.search(r'viewBox="[\d.]+ [\d.]+ ([\d.]+)', svg).group(1))
            smallest = min(float(size) for size in SVG_FONT_SIZE.findall(svg))
        else:
            info = style.png_info(path.read_bytes())
            if info["font"] is None or info["dpi"] is None:
                small.append(f"{image['src']}: no record of its smallest font and resolution")
                continue
            width, smallest = info["width"], info["font"] * info["dpi"] / 72
        shown = smallest * image["width"] / width
        if shown < MIN_TEXT_PX:
            small.append(f"{image['src']}: {shown:.1f} px")
    return small


@pytest.mark.parametrize("page", DOCUMENT_PAGES)
def test_figure_text_is_legible_on_a_laptop_and_a_phone(page, driver, base_url, site):
    small = _smallest_figure_text(driver, base_url, site, page)
    assert not small, f"{page} at 1280 px: figure text below {MIN_TEXT_PX} px: {small}"
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    try:
        small = _smallest_figure_text(driver, base_url, site, page)
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert not small, f"{page} at 375 px: figure text below {MIN_TEXT_PX} px: {small}"
