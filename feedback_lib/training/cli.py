"""Training on Tiny Shakespeare from the command line (chapter 8):
``python -m feedback_lib.training --help``.

:func:`train` trains any of the three language models of the book on
Tiny Shakespeare with :func:`~feedback_lib.training.loop.fit`:

* ``feedback``: :class:`~feedback_lib.FeedbackLM` (shared keys and values),
  token by token;
* ``twin``: :class:`~feedback_lib.ParallelTwinLM`, the same
  layers run in parallel (the first stage of a warm start; ``init_from`` its
  checkpoint to continue as a feedback model);
* ``parallel``: :class:`~feedback_lib.ParallelLM`, a standard
  ``nn.TransformerEncoder`` model.

It uses AdamW with linear warmup and cosine decay, gradient clipping,
periodic validation, an optional sequence-length curriculum, mixed precision
and TF32 on CUDA, data parallelism under ``torchrun``, and atomic
checkpoints from which a run resumes with the losses it would have had.

A setting that cannot work is refused before the work it would spoil
(:class:`ConfigError`, a usage error on the command line); Ctrl-C or
SIGTERM stops :func:`main` after the step in progress, with a checkpoint
to resume from.

Examples::

    python -m feedback_lib.training --steps 2000 --checkpoint run.pt
    python -m feedback_lib.training --model twin --checkpoint twin.pt
    python -m feedback_lib.training --init-from twin.pt --steps 500
    torchrun --nproc_per_node=2 -m feedback_lib.training --steps 100
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from feedback_lib.baselines.parallel import ParallelLM
from feedback_lib.baselines.twin import ParallelTwinLM, load_twin_weights
from feedback_lib.checks import (
    check_heads,
    check_nonnegative_int,
    check_positive_int,
    check_probability,
)
from feedback_lib.model.lm import FeedbackLM
from feedback_lib.model.scores import MAX_POSITIONS
from feedback_lib.training import distributed
from feedback_lib.training.checkpoint import (
    FORMAT,
    check_checkpoint_path,
    load_checkpoint,
    load_model_file,
    remove_stale_temporaries,
    save_checkpoint,
    save_model,
)
from feedback_lib.training.data import (
    BatchSampler,
    CharTokenizer,
    shakespeare_path,
    split_ids,
)
from feedback_lib.training.devices import (
    PRECISIONS,
    Precision,
    configure_backends,
    pick_device,
    pick_precision,
)
from feedback_lib.training.loop import (
    StepReport,
    evaluate,
    fit,
    optimizer_and_schedule,
    to_device,
)
from feedback_lib.training.schedule import Curriculum
from feedback_lib.training.signals import stop_on_signals

MODEL_KINDS = ("feedback", "twin", "parallel")
#: The position tables of the attention, one row per distance, the
#: nearest last (chapter 2).
POSITION_TABLES = ("key_pos_embeddings", "key_pos_bias")
#: Fields of a TrainConfig that may change when a run resumes (they do not
# change what is computed).
RUNTIME_FIELDS = (
    "device",
    "data",
    "checkpoint",
    "checkpoint_every",
    "resume",
    "progress",
    "log",
)
#: The largest seed: torch.manual_seed takes seeds below 2**64 (the batch
# sampler reduces the seeds it derives modulo 2**64).
MAX_SEED = 2**64 - 1
#: The most characters main samples after training: a feedback model
# without mem_len decodes with a memory of at most MAX_POSITIONS steps.
MAX_SAMPLE = MAX_POSITIONS


class ConfigError(ValueError):
    """A setting that cannot work, found before any work starts (chapter
    8). ``option`` is the :class:`TrainConfig` field (or ``sample``);
    :func:`main` reports it as a usage error of ``--option``."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option

    @property
    def flag(self) -> str:
        """The command-line option: ``--`` and the field's name with
        dashes."""
        return "--" + self.option.replace("_", "-")


@contextlib.contextmanager
def _setting(option: str) -> Iterator[None]:
    """Report a ``ValueError`` (or a missing file) raised inside as a
    :class:`ConfigError` of ``option``."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(option, str(error)) from None


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything that defines a training run (each field is also a
    command-line option)."""

    model: str = _option(
        "feedback",
        "which model: feedback, twin (parallel twin) or parallel "
        "(nn.TransformerEncoder)",
    )
    d_model: int = _option(256, "width of the model")
    heads: int = _option(4, "attention heads")
    n_layers: int = _option(4, "layers")
    d_ff: int = _option(1024, "width of the feed-forward hidden layer")
    dropout: float = _option(
        0.0,
        "dropout (above 0 the feedback model runs its readable loop, "
        "slower: 2.3x in chapter 12's run)",
    )
    mem_len: int | None = _option(
        None,
        "feedback/twin: attend to at most this many past steps, up to "
        f"{MAX_POSITIONS} (default: all)",
    )
    seq_len: int = _option(
        128,
        "training sequence length (ignored when a curriculum is given); "
        f"at most {MAX_POSITIONS} for the twin and for the feedback model "
        "without mem_len",
    )
    curriculum: str | None = _option(
        None,
        "sequence lengths by share of the steps, e.g. "
        "32:0.25,64:0.25,128:0.5",
    )
    batch_tokens: int = _option(
        2048,
        "tokens per step over all processes (rows = batch_tokens // "
        "seq_len)",
    )
    steps: int = _option(1000, "optimizer steps")
    lr: float = _option(1e-3, "peak learning rate of AdamW")
    min_lr_ratio: float = _option(
        0.1, "final learning rate as a fraction of the peak (cosine decay)"
    )
    warmup_steps: int = _option(100, "steps of linear learning-rate warmup")
    weight_decay: float = _option(
        0.1,
        "AdamW weight decay of the matrices (not of biases, norms, "
        "mixture)",
    )
    grad_clip: float = _option(
        1.0, "clip the gradient norm to this value (0: no clipping)"
    )
    eval_every: int = _option(
        200, "validate every this many steps (and at the start and the end)"
    )
    eval_windows: int = _option(
        64, "validation windows, each of the longest training length"
    )
    val_fraction: float = _option(
        0.1, "share of the text (its end) held out for validation"
    )
    seed: int = _option(
        0,
        f"seed of the weights, the batches and dropout (0 to {MAX_SEED})",
    )
    device: str = _option(
        "auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
    )
    precision: str = _option(
        "auto",
        "auto (bf16 or fp16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16",
    )
    data: str | None = _option(
        None,
        "path of Tiny Shakespeare (default: $FEEDBACK_LIB_SHAKESPEARE or "
        "download)",
    )
    init_from: str | None = _option(
        None,
        "start from this checkpoint's weights (a twin's: the warm start)",
    )
    checkpoint: str | None = _option(
        None,
        "write checkpoints to this path (a regular file or absent; missing "
        "directories are created), also when the run is interrupted",
    )
    checkpoint_every: int = _option(
        0, "also checkpoint every this many steps (0: only at the end)"
    )
    resume: bool = _option(False, "continue from --checkpoint if it exists")
    progress: bool = _option(True, "show a progress bar")
    log: bool = _option(False, "print one line per validation")

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ConfigError(
                "model",
                f"model must be one of {MODEL_KINDS}, got {self.model!r}",
            )
        for name in (
            "d_model",
            "heads",
            "n_layers",
            "d_ff",
            "seq_len",
            "batch_tokens",
            "steps",
            "eval_every",
            "eval_windows",
        ):
            with _setting(name):
                check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            with _setting(name):
                check_nonnegative_int(name, getattr(self, name))
        if self.seed > MAX_SEED:
            raise ConfigError(
                "seed",
                f"seed must be at most {MAX_SEED} (2**64 - 1), got "
                f"{self.seed}",
            )
        with _setting("heads"):
            check_heads(self.heads, self.d_model)
        for name, low, high in (
            ("lr", 0, math.inf),
            ("grad_clip", 0, math.inf),
            ("weight_decay", 0, math.inf),
            ("min_lr_ratio", 0, 1),
            ("val_fraction", 0, 1),
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not low <= value <= high
                or not math.isfinite(value)
                or (name in ("lr", "val_fraction") and value == 0)
                or (name == "val_fraction" and value == 1)
            ):
                bounds = {
                    "lr": "> 0",
                    "val_fraction": "in (0, 1)",
                    "min_lr_ratio": "in [0, 1]",
                }.get(name, ">= 0")
                raise ConfigError(
                    name,
                    f"{name} must be a finite number {bounds}, got "
                    f"{value!r}",
                )
        with _setting("dropout"):
            check_probability("dropout", self.dropout)
        if self.mem_len is not None:
            with _setting("mem_len"):
                check_positive_int("mem_len", self.mem_len)
            if self.model == "parallel":
                raise ConfigError(
                    "mem_len",
                    "mem_len applies to the feedback and twin models; the "
                    "parallel model attends to its whole context (leave "
                    "mem_len unset)",
                )
            if self.mem_len > MAX_POSITIONS:
                raise ConfigError(
                    "mem_len",
                    f"mem_len must be at most {MAX_POSITIONS}, the number "
                    "of relative positions of the feedback and twin "
                    f"models, got {self.mem_len}",
                )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                "precision",
                f"precision must be one of {PRECISIONS}, got "
                f"{self.precision!r}",
            )
        if self.resume and not self.checkpoint:
            raise ConfigError(
                "resume",
                "resume=True needs a checkpoint path to resume from",
            )
        length = "curriculum" if self.curriculum else "seq_len"
        with _setting(length):
            curriculum = self.schedule()
        if curriculum.longest > MAX_POSITIONS and (
            self.model == "twin"
            or (self.model == "feedback" and self.mem_len is None)
        ):
            shorter = f"use sequences of at most {MAX_POSITIONS}"
            if self.model == "feedback":
                shorter += (
                    f" or limit its memory (mem_len <= {MAX_POSITIONS})"
                )
            raise ConfigError(
                length,
                f"sequences of {curriculum.longest} tokens are longer than "
                f"the {MAX_POSITIONS} relative positions the {self.model} "
                f"model attends over; {shorter}",
            )
        if self.batch_tokens < curriculum.longest:
            raise ConfigError(
                "batch_tokens",
                f"batch_tokens={self.batch_tokens} is less than one "
                f"sequence of {curriculum.longest} tokens; every step "
                "needs at least one row",
            )

    def schedule(self) -> Curriculum:
        """The sequence-length schedule: the curriculum, or ``seq_len``
        throughout."""
        return (
            Curriculum.parse(self.curriculum)
            if self.curriculum
            else Curriculum(((self.seq_len, 1.0),))
        )

    def model_config(self, n_vocab: int) -> dict:
        """The keyword arguments of the model class."""
        shape = dict(
            n_vocab=n_vocab,
            d_model=self.d_model,
            heads=self.heads,
            n_layers=self.n_layers,
            d_ff=self.d_ff,
            dropout=self.dropout,
        )
        if self.model == "parallel":
            return dict(shape, max_len=self.schedule().longest)
        return dict(shape, mem_len=self.mem_len)


@dataclass
class History:
    """What a run measured, step by step: the chapter plots these lists.

    ``seconds`` counts training time only (not validation or checkpoints);
    ``tokens`` are all processes' tokens; losses are in nats per character.
    """

    step: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seq_len: list[int] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_tokens: list[int] = field(default_factory=list)
    val_seconds: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)

    def then(self, later: History) -> History:
        """One history of two consecutive runs (a warm start's two stages):
        ``later``'s steps, tokens and seconds (also those of its
        validations) continue from the end of this one."""
        offsets = dict(
            step=self.step[-1] if self.step else 0,
            tokens=self.tokens[-1] if self.tokens else 0,
            seconds=self.seconds[-1] if self.seconds else 0.0,
        )
        joined = {}
        for f in dataclasses.fields(self):
            # 0 for losses, lr and seq_len
            offset = offsets.get(f.name.removeprefix("val_"), 0)
            joined[f.name] = getattr(self, f.name) + [
                v + offset for v in getattr(later, f.name)
            ]
        return History(**joined)

    def tokens_per_second(self, last: int = 50) -> float:
        """Training throughput over the last ``last`` steps."""
        if len(self.step) < 2:
            return float("nan")
        i = max(0, len(self.step) - 1 - last)
        return (self.tokens[-1] - self.tokens[i]) / max(
            1e-9, self.seconds[-1] - self.seconds[i]
        )


@dataclass
class TrainResult:
    """A run: the model (on its device, in eval mode), its tokenizer,
    history and config; ``stopped`` when a stop request ended it before
    ``config.steps`` (the history says how far it got)."""

    model: nn.Module
    tokenizer: CharTokenizer
    history: History
    config: TrainConfig
    stopped: bool = False

    @property
    def steps_done(self) -> int:
        return self.history.step[-1] if self.history.step else 0

    @property
    def val_loss(self) -> float:
        return self.history.val_loss[-1]

    def sample(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int = 0,
    ) -> str:
        """Text continuing ``prompt`` (sampled with ``temperature`` and
        ``top_k``, reproducible from ``seed``)."""
        device = next(self.model.parameters()).device
        ids = self.tokenizer.encode(prompt)[None].to(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        out = self.model.generate(
            ids, max_new_tokens, temperature, top_k, generator=generator
        )
        return self.tokenizer.decode(out[0].cpu())

    def save_model(self, path: str | os.PathLike) -> Path:
        """Keep the trained model in ``path``, with its SHA-256 in
        ``<path>.sha256`` (chapter 8 stores the model chapter 9 generates
        with). It leaves out the optimizer's state and, for a feedback
        model with a ``mem_len``, the rows of the position tables that its
        memory never reaches (distances beyond ``mem_len``): chapter 8's
        model keeps 3 of its 11 megabytes."""
        part = model_part(
            self.config, self.tokenizer, self.model, self.history
        )
        if self.config.model == "feedback" and self.config.mem_len:
            keep = self.config.mem_len
            # copies: torch.save would write a view's whole storage
            part["model"] = {
                k: v[-keep:].clone() if k.endswith(POSITION_TABLES) else v
                for k, v in part["model"].items()
            }
        return save_model(path, part)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainResult:
        """The run :meth:`save_model` kept in ``path``, on the CPU in eval
        mode, once the file matches its SHA-256. Position-table rows left
        out (distances beyond ``mem_len``) are zeros: the model never
        reads them."""
        state = load_model_file(path)
        model = build_model(state["model_kind"], state["model_config"])
        full = model.state_dict()
        weights = {
            k: torch.cat([torch.zeros_like(full[k][len(v) :]), v])
            if k.endswith(POSITION_TABLES) and len(v) < len(full[k])
            else v
            for k, v in state["model"].items()
        }
        model.load_state_dict(weights)
        return cls(
            model.eval(),
            CharTokenizer(state["tokenizer"]),
            History(**state["history"]),
            TrainConfig(**state["config"]),
        )


def model_part(
    config: TrainConfig,
    tokenizer: CharTokenizer,
    model: nn.Module,
    history: History,
) -> dict:
    """What a checkpoint and a trained model's file both hold
    (:data:`~feedback_lib.training.checkpoint.MODEL_KEYS`): the settings,
    the model's kind, configuration and weights, the tokenizer's
    characters and the history."""
    return dict(
        format=FORMAT,
        config=dataclasses.asdict(config),
        model_kind=config.model,
        model_config=config.model_config(tokenizer.n_vocab),
        tokenizer=tokenizer.chars,
        model=model.state_dict(),
        history=dataclasses.asdict(history),
    )


def build_model(kind: str, model_config: dict) -> nn.Module:
    """A fresh model of ``kind`` (see :data:`MODEL_KINDS`)."""
    if kind == "feedback":
        return FeedbackLM(**model_config, shared_kv=True)
    if kind == "twin":
        return ParallelTwinLM(**model_config)
    return ParallelLM(**model_config)


def _device_and_precision(
    config: TrainConfig,
) -> tuple[torch.device, Precision]:
    with _setting("device"):
        device = pick_device(config.device)
    with _setting("precision"):
        return device, pick_precision(device, config.precision)


def _read_checkpoints(
    config: TrainConfig,
) -> tuple[dict | None, dict | None]:
    """Check that the run can write ``config.checkpoint``; read and check
    the checkpoint it resumes from or the one whose weights it starts
    from: ``(resumed, initial)``, None where there is none."""
    if config.checkpoint:
        with _setting("checkpoint"):
            check_checkpoint_path(config.checkpoint)
        if not config.resume and os.path.exists(config.checkpoint):
            raise ConfigError(
                "checkpoint",
                f"{config.checkpoint!r} exists (an earlier run's "
                "checkpoint?) and a new run would replace it: pass resume "
                "(--resume) to continue that run, or choose another path",
            )
    if config.resume and os.path.isfile(config.checkpoint):
        with _setting("checkpoint"):
            state = load_checkpoint(config.checkpoint)
        _check_resumable(state, config)
        return state, None
    if config.init_from:
        with _setting("init_from"):
            state = load_checkpoint(config.init_from)
        source = state["model_kind"]
        # the same kind, or a twin's weights for a feedback model
        sources = {config.model} | (
            {"twin"} if config.model == "feedback" else set()
        )
        if source not in sources:
            raise ConfigError(
                "init_from",
                f"a {config.model} model cannot start from a {source} "
                "checkpoint (only the same kind, or a twin's weights for a "
                "feedback model)",
            )
        return None, state
    return None, None


def _check_resumable(state: dict, config: TrainConfig) -> None:
    saved, ours = state["config"], dataclasses.asdict(config)
    changed = [
        k
        for k in ours
        if k not in RUNTIME_FIELDS and saved.get(k) != ours[k]
    ]
    if changed:
        detail = ", ".join(
            f"{k}: {saved.get(k)!r} -> {ours[k]!r}" for k in changed
        )
        raise ConfigError(
            "resume",
            "cannot resume: the checkpoint was written by a run with "
            f"other settings ({detail}); resume with the same settings or "
            "start a new checkpoint",
        )
    fields = {f.name for f in dataclasses.fields(History)}
    if set(state["history"]) != fields:
        raise ConfigError(
            "checkpoint",
            f"{config.checkpoint!r} holds a history with the lists "
            f"{sorted(state['history'])}, expected {sorted(fields)}",
        )
    if state["step"] >= config.steps:
        raise ConfigError(
            "steps",
            f"{config.checkpoint!r} is already at step {state['step']}, "
            f"not before steps={config.steps}: the run has ended and "
            "nothing is left to train; to train its model further, start "
            f"a new run from its weights (init_from={config.checkpoint!r} "
            "and another checkpoint path)",
        )


def _check_tokenizer(
    state: dict, tokenizer: CharTokenizer, option: str, path: str
) -> None:
    if state["tokenizer"] != tokenizer.chars:
        raise ConfigError(
            option,
            f"{path!r} was trained on a text with the characters "
            f"{state['tokenizer']!r}, this text has {tokenizer.chars!r}; "
            "token ids would mean other characters",
        )


def _check_lengths(config: TrainConfig, n_text: int, n_train: int) -> None:
    """Raise unless the text of ``n_text`` characters, ``n_train`` of them
    for training, holds a training sequence and a validation window of
    the longest length, each with its next character."""
    length = "curriculum" if config.curriculum else "seq_len"
    longest = config.schedule().longest
    need, fraction = longest + 1, config.val_fraction
    n_val = n_text - n_train
    if 2 * need > n_text:
        raise ConfigError(
            length,
            f"sequences of {longest} tokens need {need} characters for "
            f"training and {need} for validation; the text has {n_text:,}",
        )
    if n_train < need:
        most = math.floor((1 - need / n_text) * 1e4) / 1e4
        raise ConfigError(
            "val_fraction",
            f"val_fraction={fraction} leaves {n_train:,} of the "
            f"{n_text:,} characters for training, fewer than the {need} "
            f"of one sequence of {longest} tokens and its next character; "
            f"use val_fraction <= {most:g}",
        )
    if n_val < need:
        least = math.ceil(need / n_text * 1e4) / 1e4
        raise ConfigError(
            "val_fraction",
            f"val_fraction={fraction} holds out {n_val:,} of the "
            f"{n_text:,} characters, fewer than the {need} of one "
            f"validation window of {longest} tokens and its next "
            f"character; use val_fraction >= {least:g}",
        )


def _guards(
    config: TrainConfig, precision: Precision, scaler: torch.amp.GradScaler
) -> str:
    """The run's guards against overflow, and the precision to try."""
    clip = (
        f"gradient norms clipped to {config.grad_clip:g}"
        if config.grad_clip
        else "no gradient clipping"
    )
    arithmetic, other = {
        "fp32": ("float32", None),
        "bf16": ("bfloat16 autocast", "'fp32'"),
        # The scaler skips the steps whose gradients overflow; the
        # forward pass may still overflow float16.
        "fp16": (
            "float16 autocast with loss scaling (scale "
            f"{scaler.get_scale():g})",
            "'bf16' or 'fp32'",
        ),
    }[precision.name]
    guards = (
        f"in effect: {clip} (grad_clip={config.grad_clip:g}), "
        f"{arithmetic} (precision={precision.name!r})"
    )
    return f"{guards}; also try precision={other}" if other else guards


class _Stop(Exception):
    """Raised by ``train``'s batches once a stop was requested."""


@dataclass
class Run:
    """What a training run carries from step to step (chapter 8): the
    model, its optimizer, schedule and scaler, where it runs, its data and
    its history. :func:`train` builds it and hands :func:`fit` its
    ``batch_at`` and ``after_step``; its other methods resume, validate
    and checkpoint."""

    config: TrainConfig
    tokenizer: CharTokenizer
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: Precision
    place: distributed.Distributed
    device: torch.device
    sampler: BatchSampler
    curriculum: Curriculum
    # the validation windows and their targets, [eval_windows, longest]
    windows: tuple[torch.Tensor, torch.Tensor]
    stop: threading.Event | None = None
    history: History = field(default_factory=History)
    start: int = 0  # the steps done before this call of train
    saved: int | None = None  # the step of the checkpoint on disk
    bar: object = None  # the progress bar, once training runs

    def restore(self, state: dict) -> None:
        """Continue from the checkpoint ``state`` (``resume``): the
        weights, the optimizer's moments, the schedule, the scaler, the
        history, the step and the random state."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # a float16 run resumed in float16
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.history = History(**state["history"])
        self.start = self.saved = state["step"]
        rng, device = state["rng"], self.device
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        if device.type == "mps" and rng.get("mps") is not None:
            torch.mps.set_rng_state(rng["mps"])

    def state(self, step: int) -> dict:
        """Everything :meth:`restore` needs to continue after ``step``,
        as plain containers and tensors (``weights_only`` loads it)."""
        device = self.device
        return dict(
            **model_part(
                self.config, self.tokenizer, self.model, self.history
            ),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            step=step,
            rng=dict(
                cpu=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device)
                if device.type == "cuda"
                else None,
                mps=torch.mps.get_rng_state()
                if device.type == "mps"
                else None,
            ),
        )

    def save(self, step: int) -> None:
        """Write the checkpoint of ``step`` (the main process only), if
        the run has a checkpoint path."""
        if not self.config.checkpoint:
            return
        if self.place.is_main:
            remove_stale_temporaries(self.config.checkpoint)
            save_checkpoint(self.config.checkpoint, self.state(step))
        self.saved = step

    def validate(self, step: int) -> None:
        """The validation loss after ``step``, appended to the history."""
        history, config, place = self.history, self.config, self.place
        val = evaluate(
            self.model, self.windows, self.precision, place, self.device
        )
        if not math.isfinite(val):  # advice as fit's on the training loss
            advice = f"lower the learning rate (its peak is {config.lr:g})"
            if not config.grad_clip:
                advice += " or clip the gradients (grad_clip)"
            raise FloatingPointError(
                f"the validation loss became {val} at step {step}; {advice}"
            )
        history.val_step.append(step)
        history.val_tokens.append(
            history.tokens[-1] if history.tokens else 0
        )
        history.val_seconds.append(
            history.seconds[-1] if history.seconds else 0.0
        )
        history.val_loss.append(val)
        if config.log and place.is_main:
            print(_log_line(history, step), flush=True)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the global batch of ``step``, at the
        curriculum's length, on the device: ``x, y [rows, seq_len]``."""
        # every process stops before the same step
        if self.stop is not None and self.place.any(
            self.stop.is_set(), self.device
        ):
            raise _Stop
        config = self.config
        seq_len = self.curriculum.seq_len(step, config.steps)
        rows = config.batch_tokens // seq_len  # of the global batch
        mine = self.place.rows(rows)
        x, y = self.sampler.batch(step, rows, seq_len, mine)
        return to_device(x, self.device), to_device(y, self.device)

    def after_step(self, report: StepReport) -> None:
        """Record the step in the history; validate every ``eval_every``
        steps and checkpoint every ``checkpoint_every``, both at the end."""
        history, config = self.history, self.config
        seq_len = report.batch[0].shape[1]
        seconds = history.seconds[-1] if history.seconds else 0.0
        tokens = history.tokens[-1] if history.tokens else 0
        for name, value in (
            ("step", report.step),
            # all processes' tokens
            ("tokens", tokens + config.batch_tokens // seq_len * seq_len),
            ("seconds", seconds + report.seconds),
            ("loss", report.loss),
            ("lr", report.lr),
            ("seq_len", seq_len),
        ):
            getattr(history, name).append(value)
        last = report.step == config.steps
        postfix = dict(
            loss=f"{report.loss:.3f}",
            tok_s=f"{history.tokens_per_second():,.0f}",
        )
        self.bar.update(1)
        self.bar.set_postfix(postfix, refresh=False)
        if report.step % config.eval_every == 0 or last:
            self.validate(report.step)
            val = f"{history.val_loss[-1]:.3f}"
            self.bar.set_postfix(val=val, **postfix)
        every = config.checkpoint_every
        if last or (every and report.step % every == 0):
            self.save(report.step)


def prepare_run(
    config: TrainConfig, text: str | None, stop: threading.Event | None
) -> tuple[Run, dict | None, dict | None]:
    """Check the settings, read the data and build the run (the first
    part of :func:`train`); returns the run with the checkpoints to resume
    from and to start from (None where there is none)."""
    device, precision = _device_and_precision(config)
    resumed, initial = _read_checkpoints(config)
    with _setting("device"):
        place, device = distributed.start(device)
    if config.eval_windows % place.world_size:
        raise ConfigError(
            "eval_windows",
            f"eval_windows={config.eval_windows} does not split evenly "
            f"over {place.world_size} processes",
        )
    curriculum = config.schedule()
    for seq_len, _ in curriculum.stages:
        # every stage's global batch must split evenly
        with _setting("batch_tokens"):
            place.rows(config.batch_tokens // seq_len)
    configure_backends(device)

    if text is None:
        with _setting("data"):
            data = shakespeare_path(
                config.data, progress=config.progress and place.is_main
            )
        text = data.read_text(encoding="utf-8")
    with _setting("data"):
        tokenizer = CharTokenizer.fit(text)
    for option, state in (("checkpoint", resumed), ("init_from", initial)):
        if state is not None:
            path = getattr(config, option)
            _check_tokenizer(state, tokenizer, option, path)
    ids = tokenizer.encode(text)
    train_ids, val_ids = split_ids(ids, config.val_fraction)
    _check_lengths(config, len(ids), len(train_ids))
    model_config = config.model_config(tokenizer.n_vocab)
    if initial is not None and initial["model_config"] != model_config:
        raise ConfigError(
            "init_from",
            "the checkpoint holds a model of another shape: "
            f"{initial['model_config']}, this run builds {model_config}",
        )

    torch.manual_seed(config.seed)
    model = build_model(config.model, model_config).to(device)
    optimizer, scheduler = optimizer_and_schedule(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        steps=config.steps,
        min_lr_ratio=config.min_lr_ratio,
        fused=device.type in ("cpu", "cuda"),
    )
    run = Run(
        config=config,
        tokenizer=tokenizer,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=precision.scaler(),
        precision=precision,
        place=place,
        device=device,
        sampler=BatchSampler(train_ids, config.seed),
        curriculum=curriculum,
        windows=BatchSampler(val_ids).windows(
            curriculum.longest, config.eval_windows
        ),
        stop=stop,
    )
    return run, resumed, initial


def train(
    config: TrainConfig,
    *,
    text: str | None = None,
    stop: threading.Event | None = None,
) -> TrainResult:
    """Train the model ``config`` describes; returns it with its tokenizer
    and history (the command line of chapter 8 calls it).

    ``text`` overrides the training text (tests use a small one); by default
    Tiny Shakespeare is read from ``config.data`` (see
    :func:`~feedback_lib.training.data.shakespeare_path`).

    Every setting that cannot work raises :class:`ConfigError` before the
    work it would spoil: the device, the checkpoint path and the
    checkpoints to read are checked before the text is read, the lengths
    against the text before the model is built.

    ``stop`` (set by a signal handler, as in :func:`main`, or by another
    thread) ends the run before its next step: it writes a checkpoint of
    the steps done when ``config.checkpoint`` is set (so that ``resume``
    continues exactly) and returns with ``stopped=True``. A non-finite
    training or validation loss raises ``FloatingPointError`` before it is
    checkpointed, saying which checkpoint is kept.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(
            f"config must be a TrainConfig, got {type(config).__name__}"
        )
    run, resumed, initial = prepare_run(config, text, stop)
    if resumed is not None:
        run.restore(resumed)
    elif initial is not None:
        if initial["model_kind"] == config.model:
            run.model.load_state_dict(initial["model"])
        else:  # the warm start: a twin's weights
            load_twin_weights(run.model, initial["model"])
    from tqdm import tqdm

    run.bar = tqdm(
        total=config.steps,
        initial=run.start,
        disable=not (config.progress and run.place.is_main),
        desc=config.model,
        unit="step",
        mininterval=1.0,
    )
    stopped = False
    try:
        if run.start == 0:
            run.validate(0)
        fit(
            run.place.wrap(run.model, run.device),
            run.batch_at,
            steps=config.steps,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            precision=run.precision,
            scaler=run.scaler,
            grad_clip=config.grad_clip,
            start=run.start,
            place=run.place,
            after_step=run.after_step,
        )
    except _Stop:
        stopped = True
        done = run.history.step[-1] if run.history.step else 0
        if done > run.start and run.saved != done:
            run.save(done)
    except FloatingPointError as error:
        kept = (
            f"the checkpoint {config.checkpoint!r} keeps step {run.saved}"
            if run.saved is not None
            else "no checkpoint was written"
        )
        guards = _guards(config, run.precision, run.scaler)
        raise FloatingPointError(f"{error}; {guards}; {kept}") from None
    finally:
        run.bar.close()
    run.model.eval()
    return TrainResult(
        run.model, run.tokenizer, run.history, config, stopped
    )


def _log_line(history: History, step: int) -> str:
    val = history.val_loss[-1]
    train_loss = f"{history.loss[-1]:.3f}" if history.loss else "  -  "
    tok_s = history.tokens_per_second()
    speed = (
        f"{tok_s:7,.0f} tok/s" if math.isfinite(tok_s) else "      - tok/s"
    )
    minutes = history.seconds[-1] / 60 if history.seconds else 0
    return (
        f"step {step:>5} | train {train_loss} | val {val:.3f} nats = "
        f"{val / math.log(2):.3f} bits/char | {speed} | {minutes:5.1f} min"
    )


def parser() -> argparse.ArgumentParser:
    """The command line: one option per :class:`TrainConfig` field."""
    p = argparse.ArgumentParser(
        prog="python -m feedback_lib.training",
        description="Train a feedback transformer (or its parallel twin, "
        "or a standard transformer) on Tiny Shakespeare, as in chapter 8 "
        "of the book. Ctrl-C (or SIGTERM) stops after the step in "
        "progress, writes --checkpoint and prints how to continue.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=f.metadata["help"],
            )
            continue
        kind = {
            "int": int,
            "float": float,
            "str": str,
            "int | None": int,
            "str | None": str,
        }[f.type]
        choices = {"model": MODEL_KINDS, "precision": PRECISIONS}.get(
            f.name
        )
        p.add_argument(
            flag,
            type=kind,
            default=f.default,
            choices=choices,
            help=f.metadata["help"],
        )
    p.add_argument(
        "--sample",
        type=int,
        default=200,
        help="characters to generate after training (0: none; at most "
        f"{MAX_SAMPLE})",
    )
    return p


def _check_sample(chars: int) -> None:
    if not 0 <= chars <= MAX_SAMPLE:
        raise ConfigError(
            "sample",
            f"sample must be from 0 to {MAX_SAMPLE} characters (the "
            f"feedback model decodes with at most {MAX_POSITIONS} steps "
            f"of memory), got {chars}",
        )


def _continue_with(argv: list[str]) -> str:
    """The command that resumes the run of ``argv``."""
    launcher = (
        "torchrun [the same options] -m feedback_lib.training"
        if distributed.launched().enabled
        else parser().prog
    )
    resume = [] if "--resume" in argv else ["--resume"]
    return f"{launcher} {shlex.join(argv + resume)}"


def _stopped(
    config: TrainConfig, result: TrainResult | None, argv: list[str]
) -> str:
    """What an interrupted run kept, and how to continue it; ``result``
    is None when it stopped at once, inside :func:`train`."""
    path, kept = config.checkpoint, None
    if result is None:
        head = "stopped at once; the step in progress is lost"
        if path and os.path.isfile(path):
            kept = f"{path} keeps its last checkpoint"
    else:
        done = result.steps_done
        head = f"interrupted at step {done} of {config.steps}"
        if path and done > 0:  # train wrote (or resumed from) it
            kept = f"checkpoint at step {done}: {path}"
        if done == config.steps:
            return f"{head}; the run is complete" + (
                f"; {kept}" if kept else ""
            )
    if not path:
        return (
            f"{head}; nothing was saved: pass --checkpoint PATH (and "
            "--checkpoint-every N to also save during the run) to keep "
            "the work of an interrupted run"
        )
    if not kept:
        return f"{head}; no checkpoint was written yet"
    return f"{head}; {kept}; continue with: {_continue_with(argv)}"


def main(argv: list[str] | None = None) -> TrainResult:
    """Parse the command line, train, print the final validation loss and
    a sample (chapter 8).

    A setting that cannot work is a usage error (status 2) before any
    work. SIGINT (Ctrl-C) or SIGTERM stops after the step in progress,
    writes the checkpoint when ``--checkpoint`` is given, prints how to
    continue and exits with 128 + the signal's number (130 for Ctrl-C); a
    second signal stops at once. A non-finite loss stops the run with
    status 1 and keeps the last checkpoint.
    """
    p = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = vars(p.parse_args(argv))
    sample_chars = args.pop("sample")
    stop = threading.Event()
    is_main = distributed.launched().is_main
    result: TrainResult | None = None
    try:
        _check_sample(sample_chars)
        config = TrainConfig(**args)
        with stop_on_signals(stop) as received:
            try:
                result = train(config, stop=stop)
                stop.set()  # from here on a signal stops at once
                if is_main and not result.stopped:
                    val = result.val_loss
                    history = result.history
                    tokens = history.tokens[-1] if history.tokens else 0
                    print(
                        f"validation loss {val:.4f} nats/char = "
                        f"{val / math.log(2):.4f} bits/char after "
                        f"{tokens:,} tokens, "
                        f"{history.tokens_per_second():,.0f} tokens/s"
                    )
                    if sample_chars and not received:
                        print(result.sample("\n", sample_chars))
            except KeyboardInterrupt:  # a second signal: stopped at once
                pass
            if received:
                message = _stopped(config, result, argv)
                p.exit(
                    128 + received[-1], f"{message}\n" if is_main else ""
                )
        return result
    except ConfigError as error:
        p.error(f"argument {error.flag}: {error}")
    except FloatingPointError as error:
        p.exit(1, f"{p.prog}: error: {error}\n")
    finally:
        distributed.stop()
