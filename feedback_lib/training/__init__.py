"""Training (chapter 8): the loop (``loop``: ``fit``, ``train_step``), the
command line (``cli``; ``python -m feedback_lib.training --help``), Tiny
Shakespeare and batches (``data``), learning-rate and curriculum
schedules (``schedule``), devices and precision (``devices``), torchrun
(``distributed``) and checkpoints (``checkpoint``)."""


def __getattr__(name: str):
    """The modules, imported on first use: ``fl.training.<module>`` after
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
