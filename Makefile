# Two commands for a fresh machine (see README.md):
#   make book   set up .venv and build the website into _build/html
#   make test   set up .venv, run the library tests, execute every chapter (fast mode) and build
#               the website with warnings as errors (what CI runs: .ci/run)
# For maintainers: `make notebooks` re-executes every chapter in full mode and stores the outputs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CHAPTERS := $(wildcard book/*.ipynb)
# Tiny Shakespeare: the shared copy next to the project, so tests and chapters never download it.
SHAKESPEARE := $(abspath ../shared/data/tinyshakespeare.txt)
export FEEDBACK_LIB_SHAKESPEARE ?= $(if $(wildcard $(SHAKESPEARE)),$(SHAKESPEARE))

.PHONY: setup book test notebooks clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

book: setup
	$(BIN)/jupyter-book build -W --keep-going .

# pytest exits with 5 when it collects nothing, which fails the target. FEEDBACK_LIB_NATIVE=require
# makes a failed build of the C++ step loops an error instead of a silent fall-back to Python.
test: setup
	FEEDBACK_LIB_FAST=1 FEEDBACK_LIB_NATIVE=require $(BIN)/python -m pytest --nbval-lax --nbval-current-env tests book
	$(BIN)/jupyter-book build -W --keep-going .

notebooks: setup
	cd book && for nb in $(notdir $(CHAPTERS)); do ../$(BIN)/jupyter execute --inplace --timeout=3600 $$nb || exit 1; done

clean:
	rm -rf _build $(VENV) .pytest_cache
