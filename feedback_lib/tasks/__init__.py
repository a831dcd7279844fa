"""The book's tasks, trained with :func:`feedback_lib.training.loop.fit`:
the paper's code-execution task (``code_execution``, chapter 10) and
sequence reversal with an encoder (``reversal``, chapter 11)."""


def __getattr__(name: str):
    """The modules, imported on first use: ``fl.tasks.<module>`` after
    ``import feedback_lib as fl``."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":  # a dependency is missing
            raise
        raise AttributeError(
            f"module {__name__!r} has no attribute {name!r}"
        ) from None
