# Two commands for a fresh machine (see README.md):
#   make book   set up .venv and build the website into _build/html
#   make test   set up .venv, check the style, run the library tests, execute every chapter (fast
#               mode), build the website with warnings as errors and open every page in headless
#               Chromium (what CI runs: .ci/run)
# For maintainers: `make test-lib` runs the library's tests alone (a few minutes, slow tests
# skipped), `make lint` the style checks, `make notebooks` re-executes every chapter in full mode
# and stores the outputs, `make experiments` runs (or resumes) chapter 10's five-seed experiments
# and writes book/results/state_tracking.json.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CHAPTERS := $(wildcard book/*.ipynb)
# Tiny Shakespeare: the shared copy next to the project, so tests and chapters never download it.
SHAKESPEARE := $(abspath ../shared/data/tinyshakespeare.txt)
export FEEDBACK_LIB_SHAKESPEARE ?= $(if $(wildcard $(SHAKESPEARE)),$(SHAKESPEARE))

.PHONY: setup book test test-lib lint browser notebooks experiments clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-compare.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-compare.txt
	# tests/test_colab_install.py runs pip offline; the isolated build of feedback_lib needs setuptools.
	$(BIN)/python -m pip download --quiet --no-deps --dest $(VENV)/wheelhouse "setuptools>=77"
	touch $@

book: setup
	$(BIN)/jupyter-book build -W --keep-going .

# pytest exits with 5 when it collects nothing, which fails the target. FEEDBACK_LIB_NATIVE=require
# makes a failed build of the C++ step loops an error instead of a silent fall-back to Python;
# FEEDBACK_LIB_REQUIRE_LABML=1 makes a missing labml an error instead of skipped comparisons.
export FEEDBACK_LIB_REQUIRE_LABML := 1
test: setup lint browser
	FEEDBACK_LIB_FAST=1 FEEDBACK_LIB_NATIVE=require $(BIN)/python -m pytest --nbval-lax --nbval-current-env \
		--ignore=tests/browser tests book
	$(BIN)/jupyter-book build -W --keep-going .
	FEEDBACK_BOOK_BROWSER=require $(BIN)/python -m pytest tests/browser

# The library alone: every test of feedback_lib but the book's, the site's and the slow ones.
test-lib: setup
	FEEDBACK_LIB_NATIVE=require $(BIN)/python -m pytest -m "not slow" --ignore=tests/browser \
		--ignore=tests/test_book.py --ignore=tests/test_site.py tests

lint: setup
	$(BIN)/ruff check feedback_lib tests scripts
	$(BIN)/ruff format --check feedback_lib tests scripts $(CHAPTERS)

# The browser test (tests/browser) drives Debian's Chromium with its ChromeDriver, and draws the
# Chinese pages with a Chinese font (Debian's fonts-noto-cjk). Installed here when missing and
# apt-get can (as root, as in CI); elsewhere install them yourself or point CHROMIUM and CHROMEDRIVER
# at your own copies.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
export CHROMIUM CHROMEDRIVER
HAS_CJK_FONT = command -v fc-list >/dev/null && fc-list :lang=zh-cn | grep -q .
browser:
	@if [ -x "$(CHROMIUM)" ] && [ -x "$(CHROMEDRIVER)" ] && $(HAS_CJK_FONT); then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
			chromium-driver fonts-noto-cjk >/dev/null; \
	else \
		echo "make test opens the website in Chromium: install Debian's chromium, chromium-driver and" \
		     "fonts-noto-cjk packages (sudo apt-get install chromium chromium-driver fonts-noto-cjk)," \
		     "or set CHROMIUM and CHROMEDRIVER" >&2; \
		exit 1; \
	fi

notebooks: setup
	cd book && for nb in $(notdir $(CHAPTERS)); do ../$(BIN)/jupyter execute --inplace --timeout=3600 $$nb || exit 1; done

# Two processes of one thread each: 114 CPU minutes in all, an hour on 2 cores; interrupted runs
# resume.
experiments: setup
	$(BIN)/python -m feedback_lib.tasks.experiments --seeds 5 --arms feedback transformer & first=$$!; \
	$(BIN)/python -m feedback_lib.tasks.experiments --seeds 5 --arms transformer-2x; second=$$?; \
	wait $$first && [ $$second = 0 ]
	$(BIN)/python -m feedback_lib.tasks.experiments --seeds 5

clean:
	rm -rf _build $(VENV) .pytest_cache
