"""What publishing needs, checked offline: the licences, CITATION.cff, the GitHub Pages workflow,
the base URL and the Binder environment (README: "Publishing", "Licence and citation").

CITATION.cff and the workflow are validated against the Citation File Format and GitHub-workflow
schemas that the pinned ``check-jsonschema`` ships (no download)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import book_site  # noqa: E402
import colab_cells  # noqa: E402

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def check_jsonschema(schema: str, *paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, *map(str, paths)],
        capture_output=True,
        text=True,
    )


def test_licences_cover_the_code_and_the_text():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    assert "The Feedback Transformer book contributors" in (ROOT / "LICENSE").read_text()
    text = (ROOT / "LICENSE-text.md").read_text()
    assert "Creative Commons Attribution 4.0 International" in text
    assert "Section 1 – Definitions." in text and "Section 8 – Interpretation." in text
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"
    readme = (ROOT / "README.md").read_text()
    assert "CC BY 4.0" in readme and "MIT" in readme


def test_citation_file_is_valid_and_agrees_with_the_config():
    result = check_jsonschema("vendor.citation-file-format", ROOT / "CITATION.cff")
    assert result.returncode == 0, result.stdout + result.stderr
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url, _ = colab_cells.repository(ROOT)
    assert citation["title"] == config["title"]
    assert citation["repository-code"] == url
    assert citation["url"] == book_site.pages_url(url)
    assert citation["license"] == "MIT"
    assert (
        citation["version"]
        == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    )
    assert any("2002.09402" in str(ref) for ref in citation["references"])


def test_a_broken_citation_file_fails_the_schema(tmp_path):
    broken = tmp_path / "CITATION.cff"
    broken.write_text("cff-version: 1.2.0\ntitle: no authors and no message\n")
    assert check_jsonschema("vendor.citation-file-format", broken).returncode != 0


def test_workflows_are_valid():
    assert WORKFLOWS, "no workflow in .github/workflows"
    result = check_jsonschema("vendor.github-workflows", *WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def test_the_workflow_tests_builds_and_deploys_with_pinned_actions_and_least_permissions():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    jobs = workflow["jobs"]
    uses = [step["uses"] for job in jobs.values() for step in steps(job) if "uses" in step]
    for action in uses:  # owner/name@<full commit hash>
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", action), f"not pinned: {action}"
    names = {action.split("@")[0] for action in uses}
    assert {"actions/upload-pages-artifact", "actions/deploy-pages"} <= names
    assert workflow["permissions"] == {"contents": "read"}
    writers = {name for name, job in jobs.items() if "permissions" in job}
    assert writers == {"deploy"}
    assert jobs["deploy"]["permissions"] == {"pages": "write", "id-token": "write"}
    assert jobs["deploy"]["environment"]["name"] == "github-pages"
    runs = [step.get("run", "") for job in jobs.values() for step in steps(job)]
    assert "make test" in runs, "the workflow must run the README's test command"
    # Tiny Shakespeare lands where the Makefile and the tests look for it, before `make test`.
    build = steps(jobs["test-and-build"])
    (download,) = [i for i, step in enumerate(build) if "shakespeare_path" in step.get("run", "")]
    assert build[download]["env"]["FEEDBACK_LIB_CACHE"] == "../shared/data"
    assert download < [step.get("run") for step in build].index("make test")
    assert "../shared/data/tinyshakespeare.txt" in (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme


@pytest.mark.parametrize(
    "url, expected",
    [
        ("https://github.com/feedback-transformer-book/feedback-transformer-book",
         "https://feedback-transformer-book.github.io/feedback-transformer-book/"),
        ("https://github.com/Someone/my.book/", "https://someone.github.io/my.book/"),
        ("https://github.com/someone/book.git", "https://someone.github.io/book/"),
    ],
)  # fmt: skip
def test_pages_url_from_the_repository(url, expected):
    assert book_site.pages_url(url) == expected


def test_pages_url_refuses_a_repository_that_is_not_on_github():
    with pytest.raises(ValueError, match=r"repository.url in _config.yml must be a GitHub"):
        book_site.pages_url("https://gitlab.com/someone/book")


def pins(path: Path) -> dict[str, str]:
    """``name -> version`` of the exact pins of a requirements file (a local version such as
    ``+cpu`` left out)."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s+;#]+)(\+\w+)?\s*(#.*)?", line.strip())
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def test_binder_pins_the_versions_of_requirements():
    binder, local = pins(ROOT / "binder" / "requirements.txt"), pins(ROOT / "requirements.txt")
    assert {"torch", "numpy", "matplotlib", "ipywidgets", "tqdm", "ninja"} <= binder.keys()
    assert {name: local.get(name) for name in binder} == binder
    text = (ROOT / "binder" / "requirements.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text
    assert "torch==2.13.0+cpu" in text  # the CPU wheel, not PyPI's CUDA build
    post_build = ROOT / "binder" / "postBuild"
    assert (
        post_build.stat().st_mode & 0o111 and "pip install --no-deps -e ." in post_build.read_text()
    )
    assert (ROOT / "binder" / "runtime.txt").read_text().strip() == "python-3.11"
