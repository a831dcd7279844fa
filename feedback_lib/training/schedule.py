"""Schedules of the training chapter: the learning rate and the
sequence-length curriculum."""

from __future__ import annotations

import math
from dataclasses import dataclass

from feedback_lib.checks import check_nonnegative_int, check_positive_int


class WarmupCosine:
    """Learning-rate multiplier: linear warmup from ``1/warmup`` to 1 over
    ``warmup`` steps, then a cosine decay to ``min_ratio`` at step ``total``
    (for ``torch.optim.lr_scheduler.LambdaLR``, whose ``state_dict`` stores
    this object's three numbers)."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.1):
        check_nonnegative_int("warmup", warmup)
        check_positive_int("total", total)
        if not 0 <= min_ratio <= 1:
            raise ValueError(
                f"min_ratio must be in [0, 1], got {min_ratio!r}"
            )
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(
            1.0, (step - self.warmup) / max(1, self.total - self.warmup)
        )
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )


@dataclass(frozen=True)
class Curriculum:
    """Sequence lengths by training progress: ``stages`` are ``(seq_len,
    fraction of the steps)``.

    ``Curriculum.parse("32:0.25,64:0.25,128:0.5")`` trains on 32-token
    sequences for the first quarter of the steps, 64 for the second and 128
    for the rest. The fractions must add up to 1. Short sequences come
    first because they are cheaper per token; here each batch
    keeps the same number of tokens (more, shorter rows), so a step costs
    less but sees as much text.
    """

    stages: tuple[tuple[int, float], ...]

    def __post_init__(self):
        if not self.stages:
            raise ValueError(
                "a curriculum needs at least one (seq_len, fraction) stage"
            )
        for seq_len, fraction in self.stages:
            check_positive_int("seq_len", seq_len)
            if not 0 < fraction <= 1:
                raise ValueError(
                    "each stage's fraction of the steps must be in (0, "
                    f"1], got {fraction!r}"
                )
        if abs(sum(f for _, f in self.stages) - 1) > 1e-6:
            raise ValueError(
                "the fractions of a curriculum must add up to 1, got "
                f"{sum(f for _, f in self.stages):g} in {self.stages}"
            )

    @classmethod
    def parse(cls, text: str) -> Curriculum:
        """Read ``"seq_len:fraction,seq_len:fraction,..."``; a single number
        is a fixed length."""
        parts = (
            [part.split(":") for part in str(text).split(",")]
            if ":" in str(text)
            else [[str(text), "1"]]
        )
        try:
            stages = tuple((int(a), float(b)) for a, b in parts)
        except ValueError:  # also a part without exactly one ':'
            raise ValueError(
                "a curriculum is written seq_len:fraction,... such as "
                f"'32:0.25,64:0.25,128:0.5'; got {text!r}"
            ) from None
        return cls(stages)

    @property
    def longest(self) -> int:
        return max(seq_len for seq_len, _ in self.stages)

    def seq_len(self, step: int, total: int) -> int:
        """The sequence length of ``step`` (0-based) in a run of ``total``
        steps."""
        end = 0.0
        for seq_len, fraction in self.stages:
            end += fraction * total
            if step < round(end):
                return seq_len
        return self.stages[-1][0]

    def __str__(self) -> str:
        return ",".join(f"{s}:{f:g}" for s, f in self.stages)
