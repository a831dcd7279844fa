"""The paper's algorithmic task: follow a long program's variables and
print their values (chapter 10).

The semantics are those of the authors' generator
(``data/gen_data_algo_seq.py`` in facebookresearch/transformer-sequential;
this is our own code): a program is a stream of statements over ``3`` (or
``5``) variables with values ``1..10``, each statement drawn uniformly
among

- ``x = 7 ;`` introduces a variable not yet assigned (never reassigned),
- ``x ++ ;`` and ``x -- ;`` (never past 10 or below 1),
- ``print x ;`` whose value is a *label* at the ``;``, never part of the
  input,
- ``if x < y : z ++ ;`` (or ``>``), comparing to another variable half
  of the time and to a constant otherwise; the inner statement is an
  assignment or an update, executed only when the condition holds.

A draw that cannot apply (no variable left to introduce, a bound hit,
``print`` or ``if`` inside an ``if``) is redrawn. A program ends with
``END``. The model reads the program in fixed segments with its memory
carried from one to the next, and is scored on the printed values only.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from feedback_lib.checks import check_positive_int

VARIABLES = ("x", "y", "z", "p", "r")
MIN_VALUE, MAX_VALUE = 1, 10
OPERATIONS = ("=", "++", "--", "if", "print")
VALUES = tuple(str(v) for v in range(MIN_VALUE, MAX_VALUE + 1))
#: Every token; ``<pad>`` fills a batch's shorter programs.
VOCAB = (
    "<pad>",
    *VARIABLES,
    *OPERATIONS,
    "<",
    ">",
    ":",
    ";",
    "END",
    *VALUES,
)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
#: The target of a position that is not scored.
IGNORE = -100


class Redraw(Exception):
    """The drawn statement cannot apply to this state; draw another."""


def statement(
    rng: random.Random,
    state: dict[str, int],
    n_variables: int,
    *,
    nested: bool = False,
) -> tuple[list[str], int | None]:
    """One statement, executed on ``state``; returns its tokens and the
    value it prints (None unless it is a ``print``)."""
    while True:
        try:
            return try_statement(rng, state, n_variables, nested)
        except Redraw:
            continue


def try_statement(
    rng: random.Random,
    state: dict[str, int],
    n_variables: int,
    nested: bool,
) -> tuple[list[str], int | None]:
    """Draw an operation and apply it, or raise :class:`Redraw`."""
    op = rng.choice(OPERATIONS)
    if op == "=":
        free = [v for v in VARIABLES[:n_variables] if v not in state]
        if not free:
            raise Redraw
        var = rng.choice(free)
        state[var] = rng.randint(MIN_VALUE, MAX_VALUE)
        return [var, "=", str(state[var]), ";"], None
    if not state or (nested and op in ("if", "print")):
        raise Redraw
    var = rng.choice(sorted(state))
    if op in ("++", "--"):
        step = 1 if op == "++" else -1
        if not MIN_VALUE <= state[var] + step <= MAX_VALUE:
            raise Redraw
        state[var] += step
        return [var, op, ";"], None
    if op == "print":
        return ["print", var, ";"], state[var]
    if rng.random() < 0.5:  # compare to another variable
        if len(state) < 2:
            raise Redraw
        var, other = rng.sample(sorted(state), 2)
        bound, operand = state[other], other
    else:  # compare to a constant
        bound = rng.randint(MIN_VALUE, MAX_VALUE)
        operand = str(bound)
    less = rng.random() < 0.5
    holds = state[var] < bound if less else state[var] > bound
    # Executed only when the condition holds: else on a copy.
    target = state if holds else dict(state)
    body, _ = statement(rng, target, n_variables, nested=True)
    return ["if", var, "<" if less else ">", operand, ":", *body], None


def program(
    rng: random.Random, n_statements: int, n_variables: int = 3
) -> tuple[list[str], list[int | None]]:
    """A program of ``n_statements`` statements and ``END``: its tokens
    and, per token, the value printed there (None where nothing is)."""
    check_positive_int("n_statements", n_statements)
    if n_variables not in (3, 5):
        raise ValueError(f"n_variables must be 3 or 5, got {n_variables!r}")
    state: dict[str, int] = {}
    tokens: list[str] = []
    labels: list[int | None] = []
    for _ in range(n_statements):
        words, printed = statement(rng, state, n_variables)
        tokens += words
        labels += [None] * (len(words) - 1) + [printed]
    return tokens + ["END"], labels + [None]


def run(tokens: list[str]) -> list[int | None]:
    """Execute a program's tokens: the value printed at each token (None
    elsewhere). An interpreter independent of the generator (tests)."""
    state: dict[str, int] = {}
    out: list[int | None] = [None] * len(tokens)
    words: list[str] = []
    for i, token in enumerate(tokens):
        if token != ";":
            words.append(token)
            continue
        if words[0] == "if":
            _, var, op, operand, _, *words = words
            bound = state[operand] if operand in state else int(operand)
            holds = state[var] < bound if op == "<" else state[var] > bound
            if not holds:
                words = []
        if words[:1] == ["print"]:
            out[i] = state[words[1]]
        elif len(words) == 3 and words[1] == "=":
            state[words[0]] = int(words[2])
        elif len(words) == 2:
            state[words[0]] += 1 if words[1] == "++" else -1
        words = []
    return out


def encode(
    programs: list[tuple[list[str], list[int | None]]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and targets ``[batch, longest]`` of ``programs``: the
    target is the printed value's token at a ``print``'s ``;`` and
    :data:`IGNORE` everywhere else (padding included)."""
    longest = max(len(tokens) for tokens, _ in programs)
    x = torch.zeros((len(programs), longest), dtype=torch.long)
    y = torch.full_like(x, IGNORE)
    for row, (tokens, labels) in enumerate(programs):
        x[row, : len(tokens)] = torch.tensor([TOKEN_ID[t] for t in tokens])
        for i, value in enumerate(labels):
            if value is not None:
                y[row, i] = TOKEN_ID[str(value)]
    return x, y


def batch(
    seed: str, rows: int, n_statements: int, n_variables: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` programs drawn from ``random.Random(seed)`` (a string such
    as ``"train:0:17"``: the same seed gives the same programs)."""
    rng = random.Random(seed)
    return encode(
        [program(rng, n_statements, n_variables) for _ in range(rows)]
    )


def segment_logits(
    model: nn.Module, x: torch.Tensor, segment: int
) -> torch.Tensor:
    """Read ``x [batch, seq]`` in segments of ``segment`` tokens, carrying
    the model's memory from one to the next without gradients through
    it (truncated backpropagation, as the authors train); returns the
    logits ``[batch, seq, n_vocab]``."""
    memory, out = None, []
    for start in range(0, x.shape[1], segment):
        logits, memory = model(
            x[:, start : start + segment], memory, return_memory=True
        )
        memory = memory.detach()
        out.append(logits)
    return torch.cat(out, dim=1)


def printed_loss(segment: int) -> Callable[..., torch.Tensor]:
    """The loss of :func:`~feedback_lib.training.loop.fit`: cross-entropy
    on the printed values only (the authors' ``--data-omit-labels _``)."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logits = segment_logits(model, x, segment)
        total = F.cross_entropy(
            logits.flatten(0, 1), y.flatten(), reduction="sum"
        )
        # The mean over printed values; 0 for a batch without any.
        return total / (y != IGNORE).sum().clamp(min=1)

    return loss


@torch.no_grad()
def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, segment: int
) -> float:
    """The fraction of printed values predicted exactly, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        predicted = segment_logits(model, x, segment).argmax(-1)
    finally:
        model.train(was_training)
    scored = y != IGNORE
    if not scored.any():
        raise ValueError("y holds no printed value to score")
    return (predicted[scored] == y[scored]).float().mean().item()
