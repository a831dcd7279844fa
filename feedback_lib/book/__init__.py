"""The chapters' helpers: figures (``plots``) and controls (``widgets``),
which need the book's extras; showing the library's source (``display``);
the information-flow graphs (``information_flow``); the fast mode
(``fast_mode``), random parameters (``randomize``), stored results
(``stored``) and the checks of the build-it-yourself exercises
(``exercises``)."""

from feedback_lib.lazy import submodules

# The modules, imported on first use (feedback_lib.lazy).
__getattr__ = submodules(__name__)
