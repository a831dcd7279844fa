"""The package's structure: no import circle between its modules, and each part imports only what
sits below it (model <- fast, baselines, decoding <- training <- tasks; the book's helpers last)."""

import ast
from pathlib import Path

import feedback_lib

ROOT = Path(feedback_lib.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every module of feedback_lib and the feedback_lib modules it imports, anywhere in its code
    (an import inside a function closes a circle too)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:  # `from feedback_lib import fast`: the module fast
                    submodule = f"{node.module}.{alias.name}"
                    found.add(submodule if submodule in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_import_circle():
    graph = imports()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            assert state.get(other) != "open", f"import circle: {' -> '.join(path + [other])}"
            if other not in state:
                visit(other, path + [other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_each_part_imports_only_what_sits_below_it():
    allowed = {
        "model": {"checks", "fast", "reference", "decoding", "model"},
        "fast": {
            "checks",
            "model.attention",
            "model.feed_forward",
            "model.layer",
            "model.scores",
            "fast",
        },
        "reference": {"checks", "model.stack", "reference"},
        "decoding": {"checks"},
        "baselines": {"checks", "decoding", "model", "baselines"},
        "training": {"checks", "lazy", "model", "baselines", "decoding", "training"},
        # the training loop, checkpoints and signals, never the command line
        "tasks": {
            "checks",
            "lazy",
            "decoding",
            "model",
            "baselines",
            "training.loop",
            "training.checkpoint",
            "training.devices",
            "training.signals",
            "tasks",
        },
    }
    for name, targets in imports().items():
        part = name.split(".")[1] if "." in name else ""
        if part not in allowed:
            continue
        for target in targets:
            inner = target.removeprefix("feedback_lib.")
            assert any(inner == a or inner.startswith(a + ".") for a in allowed[part]), (
                f"{name} imports {target}"
            )


def test_the_tree_shows_the_architecture():
    parts = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert parts == {"model", "fast", "reference", "baselines", "training", "tasks", "book"}
    assert {p.name for p in (ROOT / "model").glob("*.py")} >= {
        "scores.py",
        "attention.py",
        "cross_attention.py",
        "feed_forward.py",
        "layer.py",
        "feedback.py",
        "stack.py",
        "memory.py",
        "lm.py",
    }
