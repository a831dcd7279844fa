"""The chapters' helpers: figures (``plots``) and controls (``widgets``),
which need the book's extras; showing the library's source (``display``);
the information-flow graphs (``information_flow``); the fast mode
(``fast_mode``) and random parameters (``randomize``)."""

_MODULES = (
    "display",
    "fast_mode",
    "information_flow",
    "plots",
    "randomize",
    "widgets",
)


def __getattr__(name: str):
    """``feedback_lib.book.plots`` after ``import feedback_lib``: imported
    on first use, so that importing the library never needs matplotlib."""
    if name in _MODULES:
        import importlib

        return importlib.import_module(f"feedback_lib.book.{name}")
    raise AttributeError(
        f"module 'feedback_lib.book' has no attribute {name!r}"
    )
