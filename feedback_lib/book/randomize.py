"""Random parameters for demonstrations and tests (chapters 2-5).

Freshly built modules have zero position terms (``U^K``, ``U^Q``, ``S``) and
layer weights that are all equal, so several terms of the equations would
vanish. The chapters and the tests fill every parameter with random values
first, so each term is visible and every check is meaningful.
"""

from __future__ import annotations

import torch

from feedback_lib.checks import check_nonnegative_int


def randomize_parameters_(
    module: torch.nn.Module, seed: int = 0, std: float = 0.3
) -> torch.nn.Module:
    """Overwrite every parameter of ``module`` with ``N(0, std^2)`` samples
    from ``seed``, in place.

    Returns ``module``. The values depend only on ``seed`` and the parameter
    order, not on the global random state.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"module must be a torch.nn.Module, got {type(module).__name__}"
        )
    seed = check_nonnegative_int("seed", seed)
    if (
        isinstance(std, bool)
        or not isinstance(std, (int, float))
        or not std > 0
    ):
        raise ValueError(f"std must be a positive number, got {std!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen, dtype=torch.float64).to(
                    p.dtype
                )
                * std
            )
    return module
