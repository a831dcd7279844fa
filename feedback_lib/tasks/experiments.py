"""The multi-seed experiments of chapter 10, resumable::

    python -m feedback_lib.tasks.experiments --seeds 5

trains every arm (a feedback model of ``n_layers`` layers, Transformers
of ``n_layers`` and ``2 * n_layers`` layers, all with the same attention
span) on both tasks (:mod:`~feedback_lib.tasks.recall` and the paper's
:mod:`~feedback_lib.tasks.programs`) for each seed. Each run keeps a
checkpoint under ``--work-dir`` (every ``SAVE_EVERY`` steps, and when
SIGINT or SIGTERM stops it after the step in progress) and writes its
result there when done, so the same command continues an interrupted
batch of runs; the results of all finished runs are collected into
``--out`` (by default the book's ``results/state_tracking.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from feedback_lib.baselines.span import SpanTransformerLM
from feedback_lib.checks import check_positive_int, positive_int_argument
from feedback_lib.model.lm import FeedbackLM
from feedback_lib.tasks import programs, recall
from feedback_lib.training.checkpoint import atomic_write, load_error
from feedback_lib.training.devices import cpu_name
from feedback_lib.training.loop import (
    StepReport,
    fit,
    optimizer_and_schedule,
)
from feedback_lib.training.signals import stop_on_signals

#: The models compared: feedback with ``n_layers`` layers, Transformers
#: with ``n_layers`` and twice as many.
ARMS = ("feedback", "transformer", "transformer-2x")
SAVE_EVERY = 100
RESULTS = Path(__file__).parents[2] / "book" / "results"


@dataclass(frozen=True)
class Setup:
    """One experiment: the task, the models' size and the training."""

    task: str  # "recall" or "programs"
    span: int  # attention span tau of every model
    d_model: int = 64
    heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    batch: int = 32
    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 100
    eval_every: int = 100
    test_rows: int = 1000
    length: int = 40  # recall: tokens per sequence
    n_statements: int = 30  # programs: statements per program
    n_variables: int = 3
    segment: int = 32  # programs: tokens read per call

    def __post_init__(self) -> None:
        if self.task not in ("recall", "programs"):
            raise ValueError(
                f"task must be 'recall' or 'programs', got {self.task!r}"
            )
        for f in dataclasses.fields(self):
            if f.type == "int":
                check_positive_int(f.name, getattr(self, f.name))
        if self.n_variables not in (3, 5):
            raise ValueError(
                f"n_variables must be 3 or 5, got {self.n_variables!r}"
            )
        if not (isinstance(self.lr, float) and self.lr > 0):
            raise ValueError(f"lr must be a float > 0, got {self.lr!r}")

    @property
    def n_vocab(self) -> int:
        return (
            recall.N_VOCAB if self.task == "recall" else len(programs.VOCAB)
        )

    def build(self, arm: str) -> nn.Module:
        """The model of ``arm``; the same seed gives the same weights."""
        if arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
        size = dict(d_model=self.d_model, heads=self.heads, d_ff=self.d_ff)
        if arm == "feedback":
            return FeedbackLM(
                self.n_vocab,
                n_layers=self.n_layers,
                mem_len=self.span,
                positions="paper",
                **size,
            )
        depth = self.n_layers * (2 if arm == "transformer-2x" else 1)
        return SpanTransformerLM(
            self.n_vocab, n_layers=depth, span=self.span, **size
        )

    def batches(self, seed: int) -> Callable[[int], tuple]:
        """The training batch of each step: fixed by the seed and step."""
        if self.task == "recall":
            return lambda step: recall.batch(
                2**32 * seed + step, self.batch, self.length
            )
        return lambda step: programs.batch(
            f"train:{seed}:{step}",
            self.batch,
            self.n_statements,
            self.n_variables,
        )

    def loss(self) -> Callable[..., torch.Tensor]:
        if self.task == "recall":
            return recall.loss
        return programs.printed_loss(self.segment)

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same held-out inputs for every arm and seed."""
        if self.task == "recall":
            return recall.batch(2**63 - 1, self.test_rows, self.length)
        return programs.batch(
            "test", self.test_rows, self.n_statements, self.n_variables
        )

    def evaluate(self, model: nn.Module, test: tuple) -> dict:
        """``accuracy``, and for recall ``by_distance``."""
        if self.task == "recall":
            by_distance = recall.accuracy_by_distance(model, *test)
            return {
                "accuracy": by_distance[1:].mean().item(),
                "by_distance": [round(a, 4) for a in by_distance.tolist()],
            }
        return {"accuracy": programs.accuracy(model, *test, self.segment)}


#: The two experiments at the scale of chapter 10's stored runs.
SETUPS = {
    "recall": Setup(
        "recall", span=4, d_model=32, heads=2, d_ff=64, steps=400
    ),
    "programs": Setup("programs", span=32, steps=1000, eval_every=250),
}


class Stopped(Exception):
    """A signal stopped the run after a step; its checkpoint is saved."""


def run(
    setup: Setup,
    arm: str,
    seed: int,
    work_dir: str | os.PathLike,
    stop: threading.Event | None = None,
    log: Callable[[str], object] = print,
) -> dict:
    """Train ``arm`` on ``setup`` with ``seed``, resuming from its
    checkpoint in ``work_dir``; returns its result (read back if the run
    finished before). Raises :class:`Stopped` if ``stop`` is set."""
    stem = Path(work_dir) / f"{setup.task}-{arm}-seed{seed}"
    done = stem.with_suffix(".json")
    if done.is_file():
        result = json.loads(done.read_text())
        if result["setup"] == dataclasses.asdict(setup):
            return result
    torch.manual_seed(seed)
    model = setup.build(arm)
    optimizer, scheduler = optimizer_and_schedule(
        model,
        lr=setup.lr,
        weight_decay=0.0,
        warmup_steps=setup.warmup,
        steps=setup.steps,
    )
    state = {"step": 0, "curve": [], "cpu_seconds": 0.0}
    checkpoint = stem.with_suffix(".pt")
    if checkpoint.is_file():
        state = resume(checkpoint, setup, model, optimizer, scheduler)
        log(f"{stem.name}: resumed at step {state['step']}")
    test = setup.test_set()
    began = time.process_time() - state["cpu_seconds"]

    def save() -> None:
        state["cpu_seconds"] = time.process_time() - began
        saved = {
            **state,
            "setup": dataclasses.asdict(setup),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        atomic_write(checkpoint, lambda f: torch.save(saved, f))

    def after_step(report: StepReport) -> None:
        state["step"] = report.step
        if report.step % setup.eval_every == 0:
            accuracy = setup.evaluate(model, test)["accuracy"]
            state["curve"].append([report.step, round(accuracy, 4)])
            log(
                f"{stem.name}: step {report.step} loss {report.loss:.3f} "
                f"accuracy {accuracy:.3f}"
            )
        if report.step % SAVE_EVERY == 0 or report.step == setup.steps:
            save()
        if stop is not None and stop.is_set():
            save()
            raise Stopped(f"{stem.name} stopped at step {report.step}")

    fit(
        model,
        setup.batches(seed),
        steps=setup.steps,
        optimizer=optimizer,
        scheduler=scheduler,
        loss=setup.loss(),
        start=state["step"],
        after_step=after_step,
    )
    result = {
        "task": setup.task,
        "arm": arm,
        "seed": seed,
        "setup": dataclasses.asdict(setup),
        **setup.evaluate(model, test),
        "curve": state["curve"],
        "cpu_seconds": round(time.process_time() - began, 1),
    }
    text = json.dumps(result)
    atomic_write(done, lambda f: f.write(text), text=True)
    return result


def resume(
    path: Path,
    setup: Setup,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict:
    """Load the checkpoint of a run into its model and optimizer; returns
    the run's progress. A checkpoint of another setup is an error."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{str(path)!r} cannot be read ({load_error(error)}); delete "
            "it to start this run again"
        ) from None
    if saved.get("setup") != dataclasses.asdict(setup):
        raise ValueError(
            f"{str(path)!r} belongs to another setup; delete it or use "
            "another --work-dir"
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return {k: saved[k] for k in ("step", "curve", "cpu_seconds")}


def collect(work_dir: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Gather every finished run in ``work_dir`` into ``out``, with the
    machine they ran on."""
    runs = [
        json.loads(p.read_text())
        for p in sorted(Path(work_dir).glob("*-seed*.json"))
    ]
    report = {
        "command": "python -m feedback_lib.tasks.experiments --seeds 5",
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "runs": runs,
    }
    text = json.dumps(report, indent=1)
    atomic_write(out, lambda f: f.write(text), text=True)
    return report


def machine() -> str:
    """The CPU model and how many cores this process may use."""
    return f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m feedback_lib.tasks.experiments",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--seeds", type=positive_int_argument, default=5)
    p.add_argument(
        "--tasks", nargs="+", choices=tuple(SETUPS), default=list(SETUPS)
    )
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--work-dir", default="runs/state_tracking")
    p.add_argument("--out", default=str(RESULTS / "state_tracking.json"))
    p.add_argument("--threads", type=positive_int_argument, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    stop = threading.Event()
    with stop_on_signals(stop):
        try:
            for task in args.tasks:
                for seed in range(args.seeds):
                    for arm in args.arms:
                        run(SETUPS[task], arm, seed, args.work_dir, stop)
        except Stopped as stopped:
            print(f"{stopped}; run the same command to continue")
            return 130
        finally:
            collect(args.work_dir, args.out)
    print(f"results of every finished run: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
