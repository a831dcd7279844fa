"""The command line loses no work, never hangs and refuses settings that cannot work with a usage error
before any work (chapter 8): checkpoint paths, checkpoints, lengths, devices, signals and non-finite
losses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from feedback_lib.training import checkpoint, cli, data
from feedback_lib.training.cli import main
from tests.test_data import SHARED

TINY = (
    "--d-model 16 --heads 2 --n-layers 1 --d-ff 32 --seq-len 16 --batch-tokens 64 --steps 3 "
    "--eval-windows 2 --no-progress --sample 0 --device cpu"
).split()


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model's steps are small kernels: one thread runs them 20 times faster than two on a
    busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny() -> list[str]:
    """Options of a tiny run on the shared copy of Tiny Shakespeare (never downloaded)."""
    if not SHARED.is_file():
        pytest.fail(f"Tiny Shakespeare is expected at {SHARED} or at ${data.PATH_ENV}")
    return [*TINY, "--data", str(SHARED)]


@pytest.fixture
def no_model(monkeypatch):
    """Building a model is work: a usage error must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the usage error")

    monkeypatch.setattr(cli, "build_model", refuse)


@pytest.fixture
def no_data(monkeypatch, no_model):
    """Reading the text is work too: most usage errors come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the text was read before the usage error")

    monkeypatch.setattr(cli, "shakespeare_path", refuse)


def usage_error(capsys, args: list[str]) -> str:
    """main(args) must exit 2 with a usage line and one error line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m feedback_lib.training") and "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--heads", "3"], "argument --heads: d_model must be divisible by heads, got d_model=16"),
        (["--mem-len", "5000"], "argument --mem-len: mem_len must be at most 4096"),
        (
            ["--seq-len", "5000", "--batch-tokens", "5000"],
            "argument --seq-len: sequences of 5000 tokens are longer than the 4096 relative "
            "positions the feedback model attends over; use sequences of at most 4096 or limit "
            "its memory",
        ),
        (
            ["--model", "twin", "--mem-len", "64", "--curriculum", "16:0.5,5000:0.5"],
            "argument --curriculum: sequences of 5000 tokens are longer than the 4096",
        ),
        (
            ["--seed", str(2**64)],
            "argument --seed: seed must be at most 18446744073709551615 (2**64 - 1)",
        ),
        (["--sample", "-5"], "argument --sample: sample must be from 0 to 4096 characters"),
        (["--sample", "5000"], "argument --sample: sample must be from 0 to 4096 characters"),
        (
            ["--precision", "fp16"],
            "argument --precision: precision 'fp16' needs a CUDA device, got cpu",
        ),
        (["--init-from", "missing.pt"], "argument --init-from: no checkpoint at 'missing.pt'"),
        (["--resume"], "argument --resume: resume=True needs a checkpoint path"),
    ],
)
def test_usage_errors_come_before_the_text_is_read(capsys, tiny, no_data, args, expected):
    assert expected in usage_error(capsys, tiny + args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(capsys, tiny, no_data):
    err = usage_error(capsys, [*tiny, "--device", "cuda"])
    assert "argument --device: device 'cuda' was asked for but torch.cuda.is_available()" in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--val-fraction", "1e-6"],
            "argument --val-fraction: val_fraction=1e-06 holds out 2 of the 1,115,394 characters, "
            "fewer than the 17 of one validation window of 16 tokens and its next character; use "
            "val_fraction >= 0.0001",
        ),
        (
            ["--val-fraction", "0.99999"],
            "argument --val-fraction: val_fraction=0.99999 leaves 11 of the 1,115,394 "
            "characters for training, fewer than the 17",
        ),
        (
            ["--model", "parallel", "--seq-len", "600000", "--batch-tokens", "600000"],
            "argument --seq-len: sequences of 600000 tokens need 600001 characters for training "
            "and 600001 for validation; the text has 1,115,394",
        ),
    ],
)
def test_lengths_are_checked_against_the_text_before_the_model(
    capsys, tiny, no_model, args, expected
):
    assert expected in usage_error(capsys, tiny + args)


def test_a_missing_text_is_a_usage_error(capsys, tiny, no_model, tmp_path):
    err = usage_error(capsys, [*tiny, "--data", str(tmp_path / "missing.txt")])
    assert "argument --data: path points to" in err and "which is not a file" in err


def long_name(tmp_path) -> str:
    """A name that fits the file system but not once the temporary suffix is added."""
    return "x" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 5)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: tmp, "is a directory; a checkpoint is written to a regular file path"),
        (
            lambda tmp: (tmp / "notes.txt").write_text("mine") and tmp / "notes.txt" / "run.pt",
            "notes.txt', which is a file, not a directory",
        ),
        (lambda tmp: os.mkfifo(tmp / "fifo") or tmp / "fifo", "is not a regular file"),
        (lambda tmp: tmp / long_name(tmp), "bytes long, but this file system allows"),
    ],
    ids=["directory", "under-a-file", "fifo", "name-too-long"],
)
def test_checkpoint_paths_are_checked_before_the_text_is_read(
    capsys, tiny, no_data, tmp_path, make, expected
):
    path = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert expected in usage_error(capsys, [*tiny, "--checkpoint", str(path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_unwritable_checkpoint_directory_is_a_usage_error(
    capsys, tiny, no_data, tmp_path, monkeypatch
):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: the check asks os.access, as root too
        real = os.access
        monkeypatch.setattr(
            checkpoint.os, "access", lambda p, mode: Path(p) != locked and real(p, mode)
        )
    try:
        err = usage_error(capsys, [*tiny, "--checkpoint", str(locked / "sub" / "run.pt")])
    finally:
        locked.chmod(0o700)
    assert "cannot be written: no permission to create files in" in err


def test_checkpoint_path_checks_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="'/dev/null' is not a regular file"):
        checkpoint.check_checkpoint_path("/dev/null")  # a character device
    checkpoint.check_checkpoint_path(tmp_path / "new" / "dir" / "run.pt")  # creatable
    checkpoint.check_checkpoint_path(tmp_path / ("x" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 13)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("link", [False, True])
@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_a_checkpoint_over_the_training_text_is_refused(
    capsys, tiny, no_model, tmp_path, link, resume
):
    """An existing file at --checkpoint is never replaced by a new run, and with --resume it must
    be a checkpoint: the training text given as --checkpoint stays as it is."""
    text = tmp_path / "shakespeare.txt"
    shutil.copyfile(SHARED, text)
    target = text
    if link:
        target = tmp_path / "run.pt"
        target.symlink_to(text)
    err = usage_error(capsys, [*tiny, "--data", str(text), "--checkpoint", str(target), *resume])
    expected = "could not be read as a checkpoint" if resume else "exists (an earlier run's"
    assert f"argument --checkpoint: '{target}' " in err and expected in err
    assert data.sha256_of(text) == data.SHAKESPEARE_SHA256


def test_a_new_run_never_replaces_an_earlier_checkpoint(capsys, tiny, no_model, tmp_path):
    path = tmp_path / "run.pt"
    path.write_bytes(b"an earlier run")
    err = usage_error(capsys, [*tiny, "--checkpoint", str(path)])
    assert "pass resume (--resume) to continue that run, or choose another path" in err
    assert path.read_bytes() == b"an earlier run"


@pytest.mark.parametrize("option", ["--resume --checkpoint", "--init-from"])
def test_checkpoints_missing_keys_are_usage_errors(capsys, tiny, no_data, tmp_path, option):
    path = tmp_path / "bare.pt"
    torch.save({"format": 1}, path)
    err = usage_error(capsys, [*tiny, *option.split(), str(path)])
    flag = option.split()[-1]
    assert f"argument {flag}: '{path}' is not a complete feedback_lib training checkpoint" in err
    assert "it lacks ['config', 'model_kind'" in err
    torch.save({"format": 1, **{k: {} for k in checkpoint.CHECKPOINT_KEYS[1:]}}, path)
    err = usage_error(capsys, [*tiny, *option.split(), str(path)])
    assert "'model_kind' is a dict, expected str" in err and "'step' is a dict, expected int" in err
    torch.save([1, 2], path)
    err = usage_error(capsys, [*tiny, *option.split(), str(path)])
    assert "is not a feedback_lib training checkpoint (format 1): it holds a list" in err


def test_resuming_a_finished_run_is_refused(capsys, tiny, tmp_path):
    path = str(tmp_path / "run.pt")
    main([*tiny, "--checkpoint", path])
    capsys.readouterr()
    err = usage_error(capsys, [*tiny, "--checkpoint", path, "--resume"])
    assert f"argument --steps: '{path}' is already at step 3, not before steps=3: the run" in err
    assert f"start a new run from its weights (init_from='{path}'" in err
    torch.save({**checkpoint.load_checkpoint(path), "step": 99}, path)
    err = usage_error(capsys, [*tiny, "--checkpoint", path, "--resume"])
    assert "is already at step 99, not before steps=3: the run has ended and nothing is left" in err
    err = usage_error(capsys, [*tiny, "--checkpoint", path, "--resume", "--steps", "100"])
    assert (
        "argument --resume: cannot resume: the checkpoint was written by a run with other " in err
    )
    assert "(steps: 3 -> 100)" in err


def test_stale_temporary_files_are_removed_at_the_next_save(tiny, tmp_path):
    old, fresh, other = (
        tmp_path / "run.pt.ab_cd123.tmp",
        tmp_path / "run.pt.x1y2z3w4.tmp",
        tmp_path / "other.pt.ab_cd123.tmp",
    )
    for path in (old, fresh, other):
        path.write_bytes(b"half a checkpoint")
    hour_ago = time.time() - 3600
    for path in (old, other):
        os.utime(path, (hour_ago, hour_ago))
    main([*tiny, "--checkpoint", str(tmp_path / "run.pt")])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run.pt", fresh.name, other.name])


def kill_self_at(monkeypatch, step: int, times: int = 1) -> None:
    """Send this process SIGINT ``times`` times while the batch of ``step`` is drawn."""
    batch = data.BatchSampler.batch

    def interrupted(self, at, *args, **kwargs):
        if at == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return batch(self, at, *args, **kwargs)

    monkeypatch.setattr(data.BatchSampler, "batch", interrupted)


def exits_with(code: int, args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == code


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(capsys, monkeypatch, tiny, tmp_path):
    path = str(tmp_path / "run.pt")
    args = [*tiny, "--steps", "4", "--eval-every", "2"]
    # Python's default handler, or SIG_IGN where the shell started pytest in the background
    before = signal.getsignal(signal.SIGINT)
    uninterrupted = main(args).history
    kill_self_at(monkeypatch, 2)
    exits_with(130, [*args, "--checkpoint", path])
    err = capsys.readouterr().err
    assert "SIGINT: stopping after the step in progress (a second signal stops at once)" in err
    assert f"interrupted at step 3 of 4; checkpoint at step 3: {path}; continue with: " in err
    assert err.rstrip().endswith(f"--checkpoint {path} --resume") and "Traceback" not in err
    assert checkpoint.load_checkpoint(path)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # restored
    monkeypatch.undo()
    resumed = main([*args, "--checkpoint", path, "--resume"]).history
    assert resumed.step == uninterrupted.step
    assert resumed.loss == uninterrupted.loss and resumed.val_loss == uninterrupted.val_loss


def test_ctrl_c_without_a_checkpoint_says_nothing_was_saved(capsys, monkeypatch, tiny):
    kill_self_at(monkeypatch, 1)
    exits_with(130, tiny)
    err = capsys.readouterr().err
    assert "interrupted at step 2 of 3; nothing was saved: pass --checkpoint PATH" in err


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(
    capsys, monkeypatch, tiny, tmp_path
):
    path = str(tmp_path / "run.pt")
    kill_self_at(monkeypatch, 3, times=2)
    exits_with(130, [*tiny, "--steps", "6", "--checkpoint", path, "--checkpoint-every", "2"])
    err = capsys.readouterr().err
    assert f"stopped at once; the step in progress is lost; {path} keeps its last checkpoint" in err
    assert "Traceback" not in err and "--resume" in err
    assert checkpoint.load_checkpoint(path)["step"] == 2


def test_a_signal_during_a_save_lets_the_save_finish(capsys, monkeypatch, tiny, tmp_path):
    path = str(tmp_path / "run.pt")
    save = torch.save

    def interrupted_save(*args, **kwargs):
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
        return save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_save)
    exits_with(130, [*tiny, "--steps", "6", "--checkpoint", path, "--checkpoint-every", "2"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "finishing the checkpoint being written first" in err
    assert "interrupted at step 2 of 6; checkpoint at step 2" in err
    assert "Error" not in err and "Traceback" not in err
    assert checkpoint.load_checkpoint(path)["step"] == 2
    assert os.listdir(tmp_path) == ["run.pt"]


def test_a_nan_validation_loss_stops_before_the_final_checkpoint(
    capsys, monkeypatch, tiny, tmp_path
):
    path = str(tmp_path / "run.pt")
    evaluate, calls = cli.evaluate, []

    def nan_at_the_end(*args, **kwargs):
        calls.append(1)
        return float("nan") if len(calls) == 3 else evaluate(*args, **kwargs)

    monkeypatch.setattr(cli, "evaluate", nan_at_the_end)
    args = ["--eval-every", "2", "--checkpoint-every", "1", "--sample", "20"]
    exits_with(1, [*tiny, *args, "--checkpoint", path])
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert (
        "error: the validation loss became nan at step 3; lower the learning rate (its peak is "
        "0.001); in effect: gradient norms clipped to 1 (grad_clip=1), float32 "
        f"(precision='fp32'); the checkpoint '{path}' keeps step 2"
    ) in err
    assert checkpoint.load_checkpoint(path)["step"] == 2


def test_a_nan_training_loss_names_the_guards_in_effect(capsys, monkeypatch, tiny):
    build = cli.build_model

    def nan_model(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(lambda m, i, out: out * float("nan") if m.training else out)
        return model

    monkeypatch.setattr(cli, "build_model", nan_model)
    exits_with(1, [*tiny, "--grad-clip", "0"])
    err = capsys.readouterr().err
    assert (
        "error: the training loss became nan at step 0; lower the learning rate (it was 1e-05) or "
        "clip the gradients (grad_clip); in effect: no gradient clipping (grad_clip=0), float32 "
        "(precision='fp32'); no checkpoint was written"
    ) in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_real_signal_stops_the_process_cleanly(tiny, tmp_path, sig):
    """A separate process, stopped by a signal from outside while it trains."""
    path = tmp_path / "run.pt"
    command = [sys.executable, "-m", "feedback_lib.training", *tiny, "--steps", "100000"]
    command += ["--checkpoint-every", "2", "--checkpoint", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # until the first checkpoint, at step 2
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + sig, err
    assert "Traceback" not in err and f"{signal.Signals(sig).name}: stopping" in err
    step = checkpoint.load_checkpoint(path)["step"]
    assert step >= 2 and f"interrupted at step {step} of 100000; checkpoint at step {step}" in err
    assert f"continue with: python -m feedback_lib.training {' '.join(tiny)}" in err
