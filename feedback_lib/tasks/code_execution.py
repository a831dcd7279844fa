"""The paper's code-execution task: track three variables through a program,
print their values.

A program assigns the variables ``x``, ``y`` and ``z`` values from 1 to 10,
then runs statements that change them: assignment (``x = 5 ;``), increment
(``x ++ ;``), decrement (``x -- ;``) and conditionals (``if x < y : x ++
;``, ``if x > 4 : y -- ;``). After ``print x ;`` the next token is ``x``'s
current value, and only these printed values are scored. To predict one, a
model must know the state after every earlier statement, and a conditional's
effect depends on the state when it ran: the kind of sequential computation
a transformer of limited depth struggles with and the feedback memory can
carry (chapter 10; Fan et al., 2020, section 4.1).

Programs are deterministic from a seed; every value stays within 1 to 10 (a
statement that would leave the range is never generated). Batches are token
ids ``[batch, seq]`` as ``FeedbackLM`` takes them, with targets of -100
(ignored by ``F.cross_entropy``) everywhere except (by default) at the
positions that predict a printed value.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import nn

from feedback_lib.checks import check_positive_int, check_probability
from feedback_lib.training.loop import (
    StepReport,
    fit,
    optimizer_and_schedule,
)

VARIABLES = ("x", "y", "z")
VALUES = tuple(range(1, 11))
#: Every token of the language; ``<pad>`` fills batches of programs of
# different lengths.
VOCAB = (
    "<pad>",
    *VARIABLES,
    *(str(v) for v in VALUES),
    "=",
    "++",
    "--",
    "if",
    "<",
    ">",
    ":",
    ";",
    "print",
)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
PAD = TOKEN_ID["<pad>"]
#: Ids of the value tokens "1" .. "10".
VALUE_IDS = tuple(TOKEN_ID[str(v)] for v in VALUES)
IGNORE = -100


@dataclass(frozen=True)
class Program:
    """One program: its tokens, and for every printed value the index of its
    token."""

    tokens: tuple[str, ...]
    printed: tuple[int, ...]

    def text(self) -> str:
        """The program with one statement per line, each print followed by
        its value."""
        lines, i = [], 0
        while i < len(self.tokens):
            end = self.tokens.index(";", i)
            statement = " ".join(self.tokens[i : end + 1])
            if self.tokens[i] == "print":
                lines.append(f"{statement}    -> {self.tokens[end + 1]}")
                end += 1
            else:
                lines.append(statement)
            i = end + 1
        return "\n".join(lines)


def _statement(rng: random.Random, state: dict[str, int]) -> list[str]:
    """One statement that keeps every value within 1..10 when it runs
    (conditionals: if it runs); updates ``state``."""
    while True:
        kind = rng.choice(("assign", "inc", "dec", "if", "if"))
        var = rng.choice(VARIABLES)
        if kind == "if":
            other = rng.choice(
                [v for v in VARIABLES if v != var]
                + [str(c) for c in VALUES]
            )
            op = rng.choice("<>")
            right = state[other] if other in state else int(other)
            holds = state[var] < right if op == "<" else state[var] > right
            body_state = dict(state)
            body = _simple(rng, body_state)
            if body is None:
                continue
            if holds:
                state.update(body_state)
            return ["if", var, op, other, ":", *body]
        body = _simple(rng, state, kind)
        if body is not None:
            return body


def _simple(
    rng: random.Random, state: dict[str, int], kind: str | None = None
) -> list[str] | None:
    """An assignment, increment or decrement (``kind``, or a random one)
    applied to ``state``, or None if it would leave 1..10."""
    kind = kind or rng.choice(("assign", "inc", "dec"))
    var = rng.choice(VARIABLES)
    if kind == "assign":
        state[var] = rng.choice(VALUES)
        return [var, "=", str(state[var]), ";"]
    step = 1 if kind == "inc" else -1
    if state[var] + step not in VALUES:
        return None
    state[var] += step
    return [var, "++" if step == 1 else "--", ";"]


def make_program(
    n_statements: int, seed: int, print_prob: float = 0.25
) -> Program:
    """A program of ``n_statements`` statements after the three initial
    assignments; each statement is a ``print`` with probability
    ``print_prob`` (and the last one always is)."""
    check_positive_int("n_statements", n_statements)
    check_probability("print_prob", print_prob)
    rng = random.Random(seed)
    state = {v: rng.choice(VALUES) for v in VARIABLES}
    tokens = [t for v in VARIABLES for t in (v, "=", str(state[v]), ";")]
    printed = []
    for i in range(n_statements):
        if i == n_statements - 1 or rng.random() < print_prob:
            var = rng.choice(VARIABLES)
            tokens += ["print", var, ";", str(state[var])]
            printed.append(len(tokens) - 1)
        else:
            tokens += _statement(rng, state)
    return Program(tuple(tokens), tuple(printed))


def run_program(tokens: tuple[str, ...] | list[str]) -> list[int]:
    """An interpreter, independent of the generator: the values the
    program's prints must show."""
    return [value for value, _ in execute(tokens)]


def updates_since_assignment(
    tokens: tuple[str, ...] | list[str],
) -> list[int]:
    """For every print, how many statements since the printed variable last
    received a literal value (``x = 5 ;`` that ran) could have changed it:
    its increments and decrements, and every conditional whose body writes
    it, whether or not the condition held. 0 means the value can be copied
    from the text; ``k`` means the model must apply ``k`` updates in order
    (chapter 10)."""
    return [updates for _, updates in execute(tokens)]


def execute(tokens: tuple[str, ...] | list[str]) -> list[tuple[int, int]]:
    """Run the program; for every print, its value and
    :func:`updates_since_assignment`'s count."""
    state: dict[str, int] = {}
    updates: dict[str, int] = {}
    out, i = [], 0
    while i < len(tokens):
        if tokens[i] == "print":
            var = tokens[i + 1]
            out.append((state[var], updates[var]))
            i += 4
            continue
        run = True
        if tokens[i] == "if":
            var, op, other = tokens[i + 1 : i + 4]
            right = state[other] if other in state else int(other)
            run = state[var] < right if op == "<" else state[var] > right
            i += 5
        var, op = tokens[i], tokens[i + 1]
        if op == "=":
            if run:
                state[var] = int(tokens[i + 2])
                updates[var] = 0
            else:
                updates[var] += 1
            i += 4
        else:
            if run:
                state[var] += 1 if op == "++" else -1
            updates[var] += 1
            i += 3
    return out


#: Seeds of held-out programs start here; training seeds stay below it.
HELD_OUT_SEED = 10**9


#: What :func:`batch` makes a target: only the printed values, or every
# next token.
TARGETS = ("printed", "all")


def batch(
    n_programs: int,
    n_statements: int,
    first_seed: int,
    print_prob: float = 0.25,
    *,
    vary_length: bool = False,
    targets: str = "printed",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``[n_programs, seq]`` for programs ``first_seed,
    first_seed + 1, ...``.

    The input is the program without its last token, the target the program
    shifted by one, with -100 except where the next token is a printed
    value; shorter programs are padded at the end. With ``targets="all"``
    every next token of the program is a target (a language model's loss;
    the padding still is not). With ``vary_length`` program ``s`` has
    between 1 and ``n_statements`` statements (drawn from its seed), so that
    training also sees short programs, where a value is easy to look up.
    """
    check_positive_int("n_programs", n_programs)
    check_positive_int("n_statements", n_statements)
    if targets not in TARGETS:
        raise ValueError(
            f"targets must be one of {TARGETS}, got {targets!r}"
        )
    seeds = range(first_seed, first_seed + n_programs)
    lengths = [
        varied_length(s, n_statements) if vary_length else n_statements
        for s in seeds
    ]
    programs = [
        make_program(n, s, print_prob) for n, s in zip(lengths, seeds)
    ]
    longest = max(len(p.tokens) for p in programs)
    ids = torch.full((n_programs, longest), PAD, dtype=torch.long)
    target_ids = torch.full((n_programs, longest), IGNORE, dtype=torch.long)
    for row, program in enumerate(programs):
        ids[row, : len(program.tokens)] = torch.tensor(
            [TOKEN_ID[t] for t in program.tokens]
        )
        scored = (
            program.printed
            if targets == "printed"
            else range(len(program.tokens))
        )
        for i in scored:
            target_ids[row, i] = ids[row, i]
    return ids[:, :-1], target_ids[:, 1:]


def varied_length(seed: int, n_statements: int) -> int:
    """The number of statements, 1 to ``n_statements``, of program ``seed``
    in a ``vary_length`` batch.

    Drawn from its own generator: one seeded with ``seed`` itself (or
    ``-seed``, the same for Python) would repeat the program's first draws
    and tie the length to its initial values."""
    return random.Random(f"length of program {seed}").randint(
        1, n_statements
    )


@torch.no_grad()
def print_correct(
    model: nn.Module,
    n_programs: int,
    n_statements: int,
    seed: int = HELD_OUT_SEED,
    print_prob: float = 0.25,
    chunk: int = 64,
) -> torch.Tensor:
    """Whether the model predicts each printed value of ``n_programs``
    held-out programs of ``n_statements`` statements (the argmax over the
    whole vocabulary equals the value), in eval mode: bool ``[n_prints]``,
    program ``seed`` first and each program's prints in order."""
    check_positive_int("n_programs", n_programs)
    check_positive_int("chunk", chunk)
    was_training = model.training
    model.eval()
    correct = []
    try:
        for start in range(0, n_programs, chunk):
            x, y = batch(
                min(chunk, n_programs - start),
                n_statements,
                seed + start,
                print_prob,
            )
            scored = y != IGNORE  # row-major: program order
            predicted = model(x).argmax(-1)  # [batch, seq]
            correct.append(predicted[scored] == y[scored])
    finally:
        model.train(was_training)
    return torch.cat(correct)


def accuracy(
    model: nn.Module,
    n_programs: int,
    n_statements: int,
    seed: int = HELD_OUT_SEED,
    print_prob: float = 0.25,
    chunk: int = 64,
) -> float:
    """The share of printed values of ``n_programs`` held-out programs that
    the model predicts."""
    return (
        print_correct(
            model, n_programs, n_statements, seed, print_prob, chunk
        )
        .float()
        .mean()
        .item()
    )


def accuracy_by_updates(
    model: nn.Module,
    n_programs: int,
    n_statements: int,
    seed: int = HELD_OUT_SEED,
    print_prob: float = 0.25,
) -> dict[int, tuple[float, int]]:
    """Held-out accuracy grouped by :func:`updates_since_assignment`:
    ``{updates: (accuracy, number of printed values)}``, in increasing order
    of ``updates``."""
    correct = print_correct(
        model, n_programs, n_statements, seed, print_prob
    )
    updates = torch.tensor(
        [
            u
            for s in range(seed, seed + n_programs)
            for u in updates_since_assignment(
                make_program(n_statements, s, print_prob).tokens
            )
        ]
    )
    return {
        u: (
            correct[updates == u].float().mean().item(),
            int((updates == u).sum()),
        )
        for u in sorted(set(updates.tolist()))
    }


@dataclass
class TaskHistory:
    """Loss per step, held-out accuracy at each evaluation, and the seconds
    of the training steps (batches included, evaluations not) (chapter 10).
    """

    loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train(
    model: nn.Module,
    *,
    steps: int,
    batch_size: int,
    n_statements: int,
    lr: float = 3e-3,
    warmup_steps: int = 100,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    print_prob: float = 0.5,
    targets: str = "printed",
    eval_every: int = 100,
    eval_programs: int = 256,
    seed: int = 0,
) -> TaskHistory:
    """Train ``model`` (a language model over :data:`VOCAB`) with the book's
    training loop (:func:`~feedback_lib.training.loop.fit`: AdamW, warmup
    then cosine decay, clipping) on programs of 1 to ``n_statements``
    statements that print with probability ``print_prob`` (more prints, more
    signal), the loss on ``targets`` (see :func:`batch`; accuracy always
    scores the printed values). Step ``s`` trains on programs ``seed + s *
    batch_size, ...``; accuracy is measured on held-out programs of exactly
    ``n_statements`` statements every ``eval_every`` steps and at the end.
    """
    check_training_programs(steps, batch_size, eval_every, seed)
    optimizer, scheduler = optimizer_and_schedule(
        model,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=min(warmup_steps, steps),
        steps=steps,
    )
    history = TaskHistory()

    def programs(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batch(
            batch_size,
            n_statements,
            seed + step * batch_size,
            print_prob,
            vary_length=True,
            targets=targets,
        )

    def after_step(report: StepReport) -> None:
        history.seconds += report.seconds
        if report.step % eval_every == 0 or report.step == steps:
            history.eval_step.append(report.step)
            history.eval_accuracy.append(
                accuracy(model, eval_programs, n_statements)
            )

    history.loss = fit(
        model,
        programs,
        steps=steps,
        optimizer=optimizer,
        scheduler=scheduler,
        grad_clip=grad_clip,
        after_step=after_step,
    )
    model.eval()
    return history


def check_training_programs(
    steps: int, batch_size: int, eval_every: int, seed: int
) -> None:
    """Raise unless :func:`train`'s sizes are positive integers and its
    training programs stay below the held-out seeds."""
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("eval_every", eval_every),
    ):
        check_positive_int(name, value)
    if seed + steps * batch_size >= HELD_OUT_SEED:
        raise ValueError(
            "training seeds would reach the held-out programs (seed "
            f"{HELD_OUT_SEED} on)"
        )


def chance_accuracy(
    n_programs: int, n_statements: int, seed: int = HELD_OUT_SEED
) -> float:
    """The accuracy of always answering the most frequent printed value (a
    floor for the models)."""
    _, y = batch(n_programs, n_statements, seed)
    values = y[y != IGNORE]
    return torch.bincount(values).max().item() / len(values)
