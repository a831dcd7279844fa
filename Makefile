# Two commands for a fresh machine (see README.md):
#   make book   set up .venv and build the website into _build/html
#   make test   set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup book test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

book: setup
	$(BIN)/jupyter-book build -W --keep-going .

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf _build $(VENV) .pytest_cache
