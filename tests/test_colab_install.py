"""The Colab path, as far as it can be tested offline.

A fresh virtual environment stands in for a Colab runtime: it sees the packages of the environment
running the tests as its preinstalled ones (Colab ships torch, numpy, matplotlib and ipywidgets), but
not ``feedback_lib``. The chapter's own install cell then runs there, exactly as stored, with
``google.colab`` present and only the repository URL swapped for a copy of this checkout. Finally the
first chapter runs in that environment, in fast mode, and must import ``feedback_lib`` from what the
install cell put there.

pip works offline here: ``PIP_NO_INDEX`` keeps it off the network, and the one package that the
isolated build of ``feedback_lib`` needs (setuptools) comes from ``.venv/wheelhouse``, which
``make setup`` fills.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import colab_cells  # noqa: E402

WHEELHOUSE = ROOT / ".venv" / "wheelhouse"
#: What a Colab runtime does not have before the install cell runs: feedback_lib itself; and the new
#: environment's own pip and setuptools must not be shadowed by ours.
NOT_PREINSTALLED = (
    "feedback_lib",
    "__editable__",
    "pip",
    "setuptools",
    "_distutils_hack",
    "distutils-precedence",
)
FIRST_CHAPTER = colab_cells.chapter_notebooks(ROOT)[0]


def _preinstalled(folder: Path) -> Path:
    """``folder`` filled with links to this environment's packages, minus ``NOT_PREINSTALLED``."""
    folder.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().replace("-", "_").startswith(NOT_PREINSTALLED):
            (folder / entry.name).symlink_to(entry)
    return folder


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{command[:4]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.mark.slow
def test_install_cell_then_first_chapter_in_a_clean_environment(tmp_path):
    if not list(WHEELHOUSE.glob("setuptools-*.whl")):
        pytest.fail(
            f"no setuptools wheel in {WHEELHOUSE}: run `make setup` (it downloads one for this test)",
            pytrace=False,
        )
    checkout = tmp_path / "checkout"
    shutil.copytree(
        ROOT,
        checkout,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "_build", "build", "*.egg-info", ".pytest_cache", "__pycache__"
        ),
    )
    venv = tmp_path / "colab"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site_packages = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            tmp_path,
            dict(os.environ),
        ).strip()
    )
    preinstalled = _preinstalled(tmp_path / "preinstalled")
    (site_packages / "colab_preinstalled.pth").write_text(
        f"import site; site.addsitedir({str(preinstalled)!r})\n"
    )

    env = {
        **os.environ,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(WHEELHOUSE),
        "FEEDBACK_LIB_FAST": "1",
        "MPLBACKEND": "Agg",
        "JUPYTER_DATA_DIR": str(tmp_path / "jupyter"),
        "PYTHONPATH": "",
    }
    probe = "import importlib.util as u; print(u.find_spec('feedback_lib') is None, u.find_spec('torch') is not None)"
    assert _run([str(python), "-c", probe], tmp_path, env).split() == ["True", "True"], (
        "the clean environment must see torch but not feedback_lib before the install cell"
    )

    # The install cell exactly as stored, with the repository URL swapped for the local checkout.
    notebook = json.loads(FIRST_CHAPTER.read_text())
    cell = "".join(colab_cells.first_code_cell(notebook)["source"])
    url, branch = colab_cells.repository(ROOT)
    remote = f"git+{url}@{branch}"
    assert remote in cell
    cell = cell.replace(remote, checkout.as_uri())
    colab = "import sys, types; sys.modules['google.colab'] = types.ModuleType('google.colab')\n"
    _run([str(python), "-c", colab + cell], tmp_path, env)
    location = _run(
        [str(python), "-c", "import feedback_lib; print(feedback_lib.__file__)"], tmp_path, env
    )
    assert Path(location.strip()).is_relative_to(site_packages), location

    # The first chapter, every cell, on a kernel of the clean environment; a last cell says where
    # feedback_lib came from.
    notebook["cells"].append(
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "where",
            "metadata": {},
            "outputs": [],
            "source": [
                "import feedback_lib, sys\n",
                "print(sys.executable, feedback_lib.__file__)",
            ],
        }
    )
    chapter = tmp_path / FIRST_CHAPTER.name
    chapter.write_text(json.dumps(notebook))
    runner = (
        "import sys, nbformat, nbclient\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "nbclient.NotebookClient(nb, kernel_name='python3', timeout=600).execute()\n"
        "print(''.join(nb.cells[-1].outputs[0].text))\n"
    )
    where = _run([str(python), "-c", runner, str(chapter)], tmp_path, env).split()
    assert where == [str(python), location.strip()], where
