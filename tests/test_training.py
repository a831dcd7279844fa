"""The training loop: schedules, checkpoints, determinism, resuming, the warm start, the command line
and data parallelism under torchrun."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
from feedback_lib.baselines.twin import ParallelTwinLM, feedback_from_twin
from feedback_lib.training import checkpoint, data
from feedback_lib.training.cli import History, TrainConfig, main, train
from feedback_lib.training.devices import pick_device, pick_precision
from feedback_lib.training.schedule import Curriculum, WarmupCosine

WORDS = "the king hath sent for thee my lord and she shall speak of love to him".split()
TEXT = " ".join(
    WORDS[i] for i in torch.randint(len(WORDS), (3000,), generator=torch.Generator().manual_seed(0))
)


def tiny(**overrides) -> TrainConfig:
    settings = dict(
        d_model=16,
        heads=2,
        n_layers=2,
        d_ff=32,
        seq_len=16,
        batch_tokens=64,
        steps=6,
        warmup_steps=2,
        eval_every=3,
        eval_windows=4,
        progress=False,
        device="cpu",
    )
    return TrainConfig(**{**settings, **overrides})


def test_warmup_then_cosine():
    f = WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert (
        f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    )
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_curriculum_stages_and_errors():
    c = Curriculum.parse("32:0.25,64:0.25,128:0.5")
    assert [c.seq_len(s, 8) for s in range(8)] == [32, 32, 64, 64, 128, 128, 128, 128]
    assert c.longest == 128 and str(c) == "32:0.25,64:0.25,128:0.5"
    assert Curriculum.parse("64").seq_len(5, 10) == 64
    with pytest.raises(ValueError, match="add up to 1"):
        Curriculum.parse("32:0.5,64:0.25")
    with pytest.raises(ValueError, match="seq_len:fraction"):
        Curriculum.parse("32-0.5")


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="model must be one of"):
        TrainConfig(model="rnn")
    with pytest.raises(ValueError, match="batch_tokens=8 is less than one sequence of 16"):
        TrainConfig(seq_len=16, batch_tokens=8)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint"):
        TrainConfig(resume=True)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got nan"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="min_lr_ratio must be a finite number in"):
        TrainConfig(min_lr_ratio=2.0)
    with pytest.raises(ValueError, match=r"val_fraction must be a finite number in \(0, 1\)"):
        TrainConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        TrainConfig(dropout=1.5)
    with pytest.raises(ValueError, match="mem_len applies to the feedback and twin models"):
        TrainConfig(model="parallel", mem_len=64)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train({"steps": 3})


def test_devices_and_precision_on_this_machine():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda.is_available"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="device must be"):
        pick_device("tpu")
    cpu = torch.device("cpu")
    assert pick_precision(cpu).dtype is None and pick_precision(cpu, "bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        pick_precision(cpu, "fp16")


def test_training_lowers_the_loss_and_records_history():
    result = train(tiny(steps=30, eval_every=10, lr=3e-3), text=TEXT)
    h = result.history
    assert h.step == list(range(1, 31)) and h.val_step == [0, 10, 20, 30]
    assert h.tokens[-1] == 30 * 64 and h.seq_len == [16] * 30
    assert h.val_loss[-1] < h.val_loss[0] - 0.5
    assert math.isfinite(h.tokens_per_second())
    assert isinstance(result.sample("the ", 20), str) and len(result.sample("the ", 20)) == 24


def test_same_seed_same_losses_other_seed_other_losses():
    a, b = (train(tiny(), text=TEXT).history for _ in range(2))
    assert a.loss == b.loss and a.val_loss == b.val_loss
    assert train(tiny(seed=1), text=TEXT).history.loss != a.loss


def test_curriculum_keeps_the_tokens_per_step():
    h = train(tiny(curriculum="8:0.5,16:0.5", steps=4, eval_every=4), text=TEXT).history
    assert h.seq_len == [8, 8, 16, 16] and h.tokens == [64, 128, 192, 256]


def test_checkpoint_is_atomic_and_loads_with_weights_only(tmp_path):
    path = tmp_path / "run.pt"
    result = train(tiny(checkpoint=str(path)), text=TEXT)
    state = torch.load(path, weights_only=True)
    assert set(checkpoint.CHECKPOINT_KEYS) <= set(state) and state["step"] == 6
    assert state["config"] == dataclasses.asdict(result.config)
    assert History(**state["history"]).loss == result.history.loss
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left
    with pytest.raises(ValueError, match="needs the keys"):
        checkpoint.save_checkpoint(path, {"model": {}})
    assert torch.load(path, weights_only=True)["step"] == 6  # the failed save left it intact
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt' could not be read as a checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": 99}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a feedback_lib training checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "missing.pt")


def test_a_trained_model_is_kept_with_its_checksum_and_loads_back(tmp_path):
    result = train(tiny(mem_len=5), text=TEXT)
    path = result.save_model(tmp_path / "model.pt")
    sums = tmp_path / "model.pt.sha256"
    assert sums.read_text() == f"{checkpoint.sha256(path)}  model.pt\n"  # sha256sum's format
    state = torch.load(path, weights_only=True)
    assert set(state) == set(checkpoint.MODEL_KEYS)  # no optimizer, schedule or random state
    # of the position tables, only the mem_len = 5 distances the memory reaches
    assert state["model"]["transformer.layers.0.attn.key_pos_bias"].shape == (5, 2)
    assert (
        path.stat().st_size < 200_000
    )  # the full tables alone would be 4096 * 2 layers * 18 floats
    loaded = type(result).load(path)
    tokens = torch.randint(result.tokenizer.n_vocab, (2, 12))  # longer than mem_len
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), result.model(tokens), rtol=0, atol=0)
    assert not loaded.model.training and loaded.tokenizer.chars == result.tokenizer.chars
    assert loaded.history == result.history and loaded.config == result.config
    assert loaded.sample("the ", 20, seed=3) == result.sample("the ", 20, seed=3)
    # A damaged file, or one whose checksum is missing, is refused before it is read.
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(ValueError, match="model.pt' has the SHA-256 .* damaged"):
        type(result).load(path)
    sums.unlink()
    with pytest.raises(FileNotFoundError, match="model.pt.sha256'; a trained model is a file"):
        type(result).load(path)
    # A file whose checksum matches but which is no model file names what it lacks.
    torch.save({"format": 1, "model": {}}, path)
    sums.write_text(f"{checkpoint.sha256(path)}  model.pt\n")
    with pytest.raises(ValueError, match="not a complete feedback_lib trained model.*lacks"):
        type(result).load(path)
    with pytest.raises(ValueError, match="a model file needs the keys"):
        checkpoint.save_model(path, {"model": {}})


def test_the_book_stores_chapter_8s_model_for_chapter_9():
    from pathlib import Path

    from feedback_lib.book import stored

    folder = Path(__file__).resolve().parents[1] / "book" / "results"
    run = stored.stored_model("shakespeare_feedback.pt", folder)
    config = run.config
    assert (config.model, config.d_model, config.n_layers, config.steps) == (
        "feedback",
        128,
        4,
        1200,
    )
    assert config.curriculum == "32:0.25,64:0.25,128:0.5" and run.steps_done == 1200
    assert (folder / "shakespeare_feedback.pt").stat().st_size < 4 * 2**20  # small enough for git


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_an_interrupted_run_resumes_with_the_same_losses(tmp_path, monkeypatch, dropout):
    config = tiny(
        steps=8,
        eval_every=2,
        checkpoint=str(tmp_path / "run.pt"),
        checkpoint_every=3,
        dropout=dropout,
    )
    uninterrupted = train(
        dataclasses.replace(config, checkpoint=None, checkpoint_every=0), text=TEXT
    ).history

    batch = data.BatchSampler.batch

    def crash_at_step_5(self, step, *args, **kwargs):
        if step == 5:
            raise Interrupted
        return batch(self, step, *args, **kwargs)

    monkeypatch.setattr(data.BatchSampler, "batch", crash_at_step_5)
    with pytest.raises(Interrupted):
        train(config, text=TEXT)
    monkeypatch.setattr(data.BatchSampler, "batch", batch)
    assert checkpoint.load_checkpoint(config.checkpoint)["step"] == 3
    resumed = train(dataclasses.replace(config, resume=True), text=TEXT).history
    assert resumed.step == uninterrupted.step
    assert resumed.loss == uninterrupted.loss and resumed.val_loss == uninterrupted.val_loss


def test_resume_refuses_other_settings(tmp_path):
    config = tiny(checkpoint=str(tmp_path / "run.pt"), steps=2)
    train(config, text=TEXT)
    with pytest.raises(ValueError, match=r"cannot resume.*lr: 0.001 -> 0.002"):
        train(dataclasses.replace(config, lr=2e-3, resume=True), text=TEXT)


def test_parallel_twin_is_the_feedback_model_when_the_memory_is_the_layer_input():
    """With one layer and the memory's mixture all on the embedding, the feedback model attends to
    exactly what the twin attends to, so the two give the same logits: the copy is one to one."""
    torch.manual_seed(0)
    for mem_len in (None, 3):
        twin = ParallelTwinLM(
            11, d_model=16, heads=2, n_layers=1, d_ff=32, mem_len=mem_len
        ).double()
        for p in twin.parameters():
            torch.nn.init.normal_(p, std=0.3)
        lm = feedback_from_twin(twin)
        assert [n for n, _ in lm.named_parameters() if n not in dict(twin.named_parameters())] == [
            "transformer.weights"
        ]
        with torch.no_grad():
            lm.transformer.weights.copy_(torch.tensor([50.0, -50.0]))
        tokens = torch.randint(11, (3, 9))
        torch.testing.assert_close(twin(tokens), lm(tokens), rtol=0, atol=1e-12)


def test_warm_start_from_a_twin_checkpoint(tmp_path):
    twin_path = tmp_path / "twin.pt"
    twin = train(tiny(model="twin", steps=40, lr=3e-3, checkpoint=str(twin_path)), text=TEXT)
    warm = train(tiny(steps=1, lr=1e-9, warmup_steps=0, init_from=str(twin_path)), text=TEXT)
    twin_state, warm_state = (twin.model.state_dict(), warm.model.state_dict())
    assert set(warm_state) - set(twin_state) == {"transformer.weights"}
    for name, value in twin_state.items():
        torch.testing.assert_close(warm_state[name], value, atol=1e-6, rtol=0, msg=name)
    assert warm.history.val_loss[0] < train(tiny(steps=1), text=TEXT).history.val_loss[0] - 0.3
    with pytest.raises(ValueError, match="another shape"):
        train(tiny(d_model=32, init_from=str(twin_path)), text=TEXT)
    with pytest.raises(ValueError, match="token ids would mean other characters"):
        train(tiny(init_from=str(twin_path)), text=TEXT.replace("k", "q"))
    with pytest.raises(ValueError, match="cannot start from a twin"):
        train(tiny(model="parallel", init_from=str(twin_path)), text=TEXT)


def test_parallel_baseline_trains():
    h = train(tiny(model="parallel", steps=30, eval_every=30, lr=3e-3), text=TEXT).history
    assert h.val_loss[-1] < h.val_loss[0] - 0.5


def test_command_line_help_and_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--curriculum", "--init-from", "--resume", "--precision", "--batch-tokens"):
        assert option in out
    with pytest.raises(SystemExit):
        main(["--model", "rnn"])
    assert "invalid choice: 'rnn'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--batch-tokens", "8", "--seq-len", "16"])
    assert "batch_tokens=8 is less than one sequence of 16" in capsys.readouterr().err


def run_cli(args: list[str], nproc: int, tmp_path, env: dict) -> History:
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]
    path = tmp_path / f"run{nproc}.pt"
    command = (launcher if nproc > 1 else [sys.executable]) + [
        "-m",
        "feedback_lib.training",
        *args,
        "--checkpoint",
        str(path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return History(**checkpoint.load_checkpoint(path)["history"])


@pytest.mark.slow
def test_two_processes_follow_the_single_process_run(tmp_path):
    """torchrun with 2 CPU processes (gloo), each taking half of every global batch, gives the losses
    of one process with the whole batch, up to the order of the floating-point sums."""
    from tests.test_data import SHARED

    if not SHARED.is_file():
        pytest.fail(f"Tiny Shakespeare is expected at {SHARED}")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        data.PATH_ENV: str(SHARED),
        "PYTHONPATH": os.getcwd(),
    }
    args = [
        "--d-model",
        "32",
        "--heads",
        "2",
        "--n-layers",
        "2",
        "--d-ff",
        "64",
        "--seq-len",
        "16",
        "--batch-tokens",
        "128",
        "--steps",
        "5",
        "--eval-every",
        "5",
        "--eval-windows",
        "4",
        "--device",
        "cpu",
        "--no-progress",
        "--sample",
        "0",
    ]
    single, double = (run_cli(args, 1, tmp_path, env), run_cli(args, 2, tmp_path, env))
    assert len(double.loss) == 5
    torch.testing.assert_close(
        torch.tensor(double.loss), torch.tensor(single.loss), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(double.val_loss), torch.tensor(single.val_loss), rtol=1e-4, atol=1e-5
    )


def test_the_twin_uses_every_row_of_its_position_tables():
    """At the longest sequence the tables allow (one row per distance 1..seq-1 plus one unused), the
    twin's gather stays in bounds; here with tables cut to 8 rows and sequences of 8."""
    twin = ParallelTwinLM(11, d_model=16, heads=2, n_layers=1, d_ff=32)
    attn = twin.transformer.layers[0].attn
    attn.key_pos_embeddings = torch.nn.Parameter(torch.randn(8, 2, 8))
    attn.key_pos_bias = torch.nn.Parameter(torch.randn(8, 2))
    assert torch.isfinite(twin.logits(torch.randint(11, (2, 8)))).all()


def test_uneven_global_batches_are_refused():
    from feedback_lib.training.distributed import Distributed

    assert Distributed(1, 2).rows(16) == slice(8, 16)
    with pytest.raises(ValueError, match="16 rows does not split evenly over 3 processes"):
        Distributed(0, 3).rows(16)


def test_histories_of_two_stages_join():
    first = History(
        step=[1, 2],
        tokens=[10, 20],
        seconds=[1.0, 2.0],
        loss=[3.0, 2.5],
        lr=[0.1, 0.1],
        seq_len=[8, 8],
        val_step=[0, 2],
        val_tokens=[0, 20],
        val_seconds=[0.0, 2.0],
        val_loss=[4.0, 2.6],
    )
    second = History(
        step=[1],
        tokens=[10],
        seconds=[0.5],
        loss=[2.4],
        lr=[0.2],
        seq_len=[16],
        val_step=[0, 1],
        val_tokens=[0, 10],
        val_seconds=[0.0, 0.5],
        val_loss=[2.7, 2.3],
    )
    joined = first.then(second)
    assert (
        joined.step == [1, 2, 3]
        and joined.tokens == [10, 20, 30]
        and joined.seconds == [1.0, 2.0, 2.5]
    )
    assert (
        joined.loss == [3.0, 2.5, 2.4]
        and joined.lr == [0.1, 0.1, 0.2]
        and joined.seq_len == [8, 8, 16]
    )
    assert joined.val_step == [0, 2, 2, 3] and joined.val_seconds == [0.0, 2.0, 2.0, 2.5]
    assert joined.val_loss == [4.0, 2.6, 2.7, 2.3] and joined.val_tokens == [0, 20, 20, 30]


@pytest.mark.parametrize("model", ["feedback", "twin", "parallel"])
def test_bfloat16_autocast_trains_on_the_cpu(model):
    """The mixed-precision path (autocast, float32 loss) runs for every model; on CUDA the same code
    runs in bfloat16 or float16."""
    h = train(
        tiny(model=model, precision="bf16", steps=20, eval_every=20, lr=3e-3), text=TEXT
    ).history
    assert all(math.isfinite(v) for v in h.loss) and h.val_loss[-1] < h.val_loss[0] - 0.3


def test_twin_and_warm_start_errors_name_the_problem():
    from feedback_lib import FeedbackLM
    from feedback_lib.baselines.twin import load_twin_weights

    twin = ParallelTwinLM(11, d_model=16, heads=2, n_layers=1, d_ff=32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        twin(torch.full((1, 4), 11))
    with pytest.raises(ValueError, match="the twin takes at most 4096"):
        twin(torch.zeros(1, 4097, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a ParallelTwinLM"):
        feedback_from_twin(FeedbackLM(11, d_model=16, heads=2, n_layers=1, d_ff=32))
    with pytest.raises(TypeError, match="shared_kv=True"):
        load_twin_weights(
            FeedbackLM(11, d_model=16, heads=2, n_layers=1, d_ff=32, shared_kv=False),
            twin.state_dict(),
        )
    with pytest.raises(ValueError, match="not a twin of this model"):
        load_twin_weights(FeedbackLM(11, d_model=16, heads=2, n_layers=1, d_ff=32), {})
    assert twin.generate(torch.zeros(1, 3, dtype=torch.long), 5).shape == (1, 8)
