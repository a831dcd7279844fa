"""Student versions of the chapters: exercise solutions and answer cells
removed, outputs cleared.

A chapter marks its answers in two ways (``tests/test_book.py`` requires the
dropdowns):

- prose solutions are colon-fenced dropdowns that open with
  ``:::{admonition} Solution``;
- code that answers an exercise is a cell tagged ``solution``.

The student version drops every solution block, replaces every ``solution``
cell with an empty cell that asks for the reader's answer (or drops it
where it follows a build-it-yourself skeleton, which is where the student
writes, and which the check cell after it tests), clears all
outputs (students run the notebook themselves) and opens with a note that
says where it came from. The website's build writes them to
``_build/html/student/`` with a zip of all of them
(``scripts/book_site.py``); by hand:

    python scripts/student_versions.py OUT_DIR
"""

from __future__ import annotations

import copy
import json
import re
import sys
import zipfile
from pathlib import Path

import colab_cells

#: The title of a prose solution's admonition (a translated chapter has
#: its own).
SOLUTION = "Solution"


def solution_opening(title: str = SOLUTION) -> re.Pattern:
    """A line that opens a prose solution: a colon fence (three or more
    colons) and the admonition titled ``title``."""
    return re.compile(
        rf"^(:{{3,}})\{{admonition\}}\s+{re.escape(title)}(?!\w)"
    )


#: The tag of code cells that answer an exercise.
SOLUTION_TAG = "solution"
ANSWER_CELL = "# Your answer to the exercise above.\n"
#: What a build-it-yourself exercise's skeleton cell raises until the
#: student fills it in; its worked solution is dropped without an answer
#: cell, and the check cell after it stays.
SKELETON = "raise NotImplementedError"
ZIP_NAME = "feedback-transformer-student-notebooks.zip"
HEADER = (
    "**Student version.** The solutions of the exercises are removed and "
    "the outputs cleared; run the cells top to bottom. The full chapter, "
    "with solutions and the outputs of a real run, is on the book's "
    "website and in its repository, {url}."
)


def strip_solutions(markdown: str, title: str = SOLUTION) -> str:
    """``markdown`` without its ``:::{admonition} Solution`` blocks (fence
    to matching fence; ``title``: the admonition's title)."""
    kept, closing, opens = [], None, solution_opening(title)
    for line in markdown.splitlines(keepends=True):
        if closing is None:
            opening = opens.match(line)
            if opening:
                closing = opening.group(1)
                continue
            kept.append(line)
        elif line.strip() == closing:
            closing = None
    if closing is not None:
        raise ValueError(
            f"a solution block opened with {closing!r} is never closed"
        )
    return re.sub(r"\n{3,}", "\n\n", "".join(kept)).rstrip("\n")


def student_notebook(
    notebook: dict,
    url: str,
    *,
    solution: str = SOLUTION,
    header: str = HEADER,
) -> dict:
    """The student version of one chapter notebook of the book at repository
    ``url`` (the input is left unchanged). A translated chapter gives its
    solutions' title and the translated ``header``."""
    student, opens = copy.deepcopy(notebook), solution_opening(solution)
    cells, skeleton = [], False  # is the last code cell a skeleton?
    for cell in student["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code":
            if SOLUTION_TAG in cell["metadata"].get("tags", []):
                if skeleton:  # the student writes in the skeleton above
                    continue
                source = ANSWER_CELL
                cell["metadata"] = {}
            skeleton = SKELETON in source
            cell["outputs"], cell["execution_count"] = [], None
            cell["metadata"].pop("execution", None)
        elif cell["cell_type"] == "markdown" and any(
            map(opens.match, source.splitlines())
        ):
            source = strip_solutions(source, solution)
            if not source.strip():
                continue
        cell["source"] = source.splitlines(keepends=True)
        cells.append(cell)
    student["cells"] = [
        {
            "cell_type": "markdown",
            "id": "student-version",
            "metadata": {},
            "source": [header.format(url=url)],
        }
    ] + cells
    student["metadata"].pop(
        "widgets", None
    )  # saved widget state belongs to the run
    return student


def write_student_versions(
    out_dir: Path,
    root: Path = colab_cells.ROOT,
    *,
    notebooks: list[Path] | None = None,
    solution: str = SOLUTION,
    header: str = HEADER,
) -> list[Path]:
    """Write the student version of every chapter in ``_toc.yml`` (or of
    ``notebooks``, a translation's) and a zip of them to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, (url, _) = [], colab_cells.repository(root)
    for path in notebooks or colab_cells.chapter_notebooks(root):
        target = out_dir / path.name
        notebook = student_notebook(
            json.loads(path.read_text()),
            url,
            solution=solution,
            header=header,
        )
        target.write_text(
            json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
        )
        written.append(target)
    with zipfile.ZipFile(
        out_dir / ZIP_NAME, "w", zipfile.ZIP_DEFLATED
    ) as archive:
        for target in written:
            archive.write(
                target, f"feedback-transformer-student/{target.name}"
            )
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for path in write_student_versions(Path(argv[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
