"""``python -m feedback_lib.training``: see
:mod:`feedback_lib.training.cli`."""

import sys

from feedback_lib.training.cli import main

main(sys.argv[1:])
