"""Results that a chapter uses but does not compute: files under the
book's ``results/`` folder, written by the experiment scripts (chapter
10's ``python -m feedback_lib.tasks.experiments``) and by chapter 8's full
run (the trained model that chapter 9 loads).

A chapter runs with ``book/`` as its working directory and finds them
there (a translated chapter, in ``book/<language>/``, one folder up); a
notebook opened alone (in Colab) fetches the same file from the book's
repository.
"""

from __future__ import annotations

import json
import tempfile
import urllib.request
from pathlib import Path

from feedback_lib.training.checkpoint import checksum_path
from feedback_lib.training.cli import TrainResult

#: The book's repository and branch (``_config.yml``; a test keeps them
#: equal).
REPOSITORY = (
    "https://github.com/feedback-transformer-book/feedback-transformer-book"
)
BRANCH = "main"


def raw_url(path: str) -> str:
    """The download address of ``path`` (from the repository's root)."""
    owner_repo = REPOSITORY.removeprefix("https://github.com/")
    return f"https://raw.githubusercontent.com/{owner_repo}/{BRANCH}/{path}"


def stored_file(name: str, folder: str | Path = "results") -> Path:
    """The results file ``name``: ``folder/name`` when it exists (the
    chapters' working directory is ``book/``), or for a relative ``folder``
    ``../folder/name`` (a translated chapter's, ``book/<language>/``),
    else a copy downloaded from ``book/results/name`` in the book's
    repository."""
    places = [Path(folder) / name]
    if not Path(folder).is_absolute():
        places.append(Path("..") / folder / name)
    for local in places:
        if local.is_file():
            return local
    local = Path(tempfile.gettempdir()) / name
    urllib.request.urlretrieve(raw_url(f"book/results/{name}"), local)
    return local


def stored_results(name: str, folder: str | Path = "results") -> dict:
    """The JSON results file ``name`` (see :func:`stored_file`)."""
    return json.loads(stored_file(name, folder).read_text())


def stored_model(name: str, folder: str | Path = "results") -> TrainResult:
    """The trained model ``name`` and its SHA-256 beside it (see
    :func:`stored_file`), loaded by ``TrainResult.load``, which checks the
    one against the other."""
    path = stored_file(name, folder)
    stored_file(checksum_path(name).name, folder)
    return TrainResult.load(path)
