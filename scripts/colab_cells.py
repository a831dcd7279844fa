"""Keep every chapter's Colab install cell in step with ``_config.yml``'s
``repository``.

The first code cell of each notebook installs ``feedback_lib`` when (and
only when) it runs in Colab, from ``repository.url`` at
``repository.branch``. ``tests/test_book.py`` checks every notebook against
:func:`install_cell_source`; after changing the repository in
``_config.yml``, run

    python scripts/colab_cells.py

to rewrite the cells (it reports which notebooks changed).
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
#: The tag that hides the install cell on the website.
INSTALL_TAGS = ["remove-cell"]


def repository(root: Path = ROOT) -> tuple[str, str]:
    """``(url, branch)`` from ``_config.yml``."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    repo = config["repository"]
    return repo["url"].rstrip("/"), repo["branch"]


def install_cell_source(url: str, branch: str) -> str:
    """The exact source of the install cell for the repository ``url`` at
    ``branch``."""
    return (
        "# In Colab, install feedback_lib from the book's repository "
        "(elsewhere: see the README).\nimport subprocess\nimport sys\n\n"
        f'BOOK = "git+{url}@{branch}"\n'
        'if "google.colab" in sys.modules:\n'
        '    package = f"feedback_lib[book] @ {BOOK}"\n'
        "    subprocess.run(\n"
        '        [sys.executable, "-m", "pip", "install", "--quiet", '
        "package], check=True\n"
        "    )"
    )


def chapter_notebooks(root: Path = ROOT) -> list[Path]:
    """The notebooks listed in ``_toc.yml``, in book order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", [toc]):
        files += [entry["file"] for entry in part.get("chapters", [])]
    return [
        root / f"{name}.ipynb"
        for name in files
        if (root / f"{name}.ipynb").exists()
    ]


def first_code_cell(notebook: dict) -> dict | None:
    return next(
        (cell for cell in notebook["cells"] if cell["cell_type"] == "code"),
        None,
    )


def main() -> int:
    url, branch = repository()
    expected = install_cell_source(url, branch)
    for path in chapter_notebooks():
        notebook = json.loads(path.read_text())
        cell = first_code_cell(notebook)
        if (
            cell is not None
            and "".join(cell["source"]) == expected
            and cell["metadata"].get("tags") == INSTALL_TAGS
        ):
            continue
        if cell is None or "google.colab" not in "".join(cell["source"]):
            # No install cell yet: insert one before the first code cell.
            cell = {
                "cell_type": "code",
                "execution_count": None,
                "id": uuid.uuid4().hex[:8],
                "metadata": {},
                "outputs": [],
                "source": [],
            }
            position = next(
                (
                    i
                    for i, c in enumerate(notebook["cells"])
                    if c["cell_type"] == "code"
                ),
                len(notebook["cells"]),
            )
            notebook["cells"].insert(position, cell)
        cell["source"] = expected.splitlines(keepends=True)
        cell["metadata"]["tags"] = list(INSTALL_TAGS)
        path.write_text(
            json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
        )
        print(f"{path.relative_to(ROOT)}: install cell written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
