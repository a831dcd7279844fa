"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (chapter 8): the
training command and the experiments of chapter 10 finish the step in
progress, save, and say how to continue."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

from feedback_lib.training import distributed
from feedback_lib.training.checkpoint import atomic_write


def inside_save(frame: FrameType | None) -> bool:
    """Whether the interrupted code is writing a file atomically (a
    checkpoint, a results file)."""
    while frame is not None:
        if frame.f_code is atomic_write.__code__:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """While inside, SIGINT (Ctrl-C) and SIGTERM set ``stop``, so that a
    training run (:func:`feedback_lib.training.cli.train`, the task
    experiments) ends after the step in progress; yields the list of
    the signals received. Once ``stop`` is set a signal stops at once
    (KeyboardInterrupt), except while a checkpoint is being written: the
    write finishes first, so the checkpoint on disk is whole (torch.save
    stopped midway would also end in an unrelated RuntimeError). Under
    torchrun, which forwards a signal to every process, the processes
    only stop after the step. Installed only in the main thread; the
    previous handlers come back on exit."""
    received: list[int] = []
    place = distributed.launched()
    single = not place.enabled

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if not stop.is_set():
            stop.set()
            if place.is_main:
                print(
                    f"\n{signal.Signals(signum).name}: stopping after the "
                    "step in progress"
                    + (
                        " (a second signal stops at once)" if single else ""
                    ),
                    file=sys.stderr,
                    flush=True,
                )
        elif single and inside_save(frame):
            print(
                "finishing the checkpoint being written first",
                file=sys.stderr,
                flush=True,
            )
        elif single:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield received
    finally:
        for s, before in previous.items():
            signal.signal(s, before)
