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

Examples::

    python -m feedback_lib.training --steps 2000 --checkpoint run.pt
    python -m feedback_lib.training --model twin --checkpoint twin.pt
    python -m feedback_lib.training --init-from twin.pt --steps 500
    torchrun --nproc_per_node=2 -m feedback_lib.training --steps 100
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from feedback_lib.baselines.parallel import ParallelLM
from feedback_lib.baselines.twin import ParallelTwinLM, load_twin_weights
from feedback_lib.checks import (
    check_nonnegative_int,
    check_positive_int,
    check_probability,
)
from feedback_lib.model.lm import FeedbackLM
from feedback_lib.training import distributed
from feedback_lib.training.checkpoint import (
    FORMAT,
    load_checkpoint,
    save_checkpoint,
)
from feedback_lib.training.data import (
    BatchSampler,
    CharTokenizer,
    load_shakespeare,
    split_ids,
)
from feedback_lib.training.devices import (
    PRECISIONS,
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

MODEL_KINDS = ("feedback", "twin", "parallel")
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
        "slower: 2.4x in chapter 7's run)",
    )
    mem_len: int | None = _option(
        None,
        "feedback/twin: attend to at most this many past steps (default: "
        "all)",
    )
    seq_len: int = _option(
        128, "training sequence length (ignored when a curriculum is given)"
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
    seed: int = _option(0, "seed of the weights, the batches and dropout")
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
    checkpoint: str | None = _option(None, "write checkpoints to this path")
    checkpoint_every: int = _option(
        0, "also checkpoint every this many steps (0: only at the end)"
    )
    resume: bool = _option(False, "continue from --checkpoint if it exists")
    progress: bool = _option(True, "show a progress bar")
    log: bool = _option(False, "print one line per validation")

    def __post_init__(self):
        if self.model not in MODEL_KINDS:
            raise ValueError(
                f"model must be one of {MODEL_KINDS}, got {self.model!r}"
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
            check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            check_nonnegative_int(name, getattr(self, name))
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
                raise ValueError(
                    f"{name} must be a finite number {bounds}, got "
                    f"{value!r}"
                )
        check_probability("dropout", self.dropout)
        if self.mem_len is not None:
            check_positive_int("mem_len", self.mem_len)
            if self.model == "parallel":
                raise ValueError(
                    "mem_len applies to the feedback and twin models; the "
                    "parallel model attends to its whole context (leave "
                    "mem_len unset)"
                )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {PRECISIONS}, got "
                f"{self.precision!r}"
            )
        if self.resume and not self.checkpoint:
            raise ValueError(
                "resume=True needs a checkpoint path to resume from"
            )
        curriculum = self.schedule()
        if self.batch_tokens < curriculum.longest:
            raise ValueError(
                f"batch_tokens={self.batch_tokens} is less than one "
                f"sequence of {curriculum.longest} tokens; every step "
                "needs at least one row"
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
    """A finished run: the model (on its device, in eval mode), its
    tokenizer, history and config."""

    model: nn.Module
    tokenizer: CharTokenizer
    history: History
    config: TrainConfig

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


def build_model(kind: str, model_config: dict) -> nn.Module:
    """A fresh model of ``kind`` (see :data:`MODEL_KINDS`)."""
    if kind == "feedback":
        return FeedbackLM(**model_config, shared_kv=True)
    if kind == "twin":
        return ParallelTwinLM(**model_config)
    return ParallelLM(**model_config)


def load_weights(
    model: nn.Module, kind: str, model_config: dict, state: dict
) -> None:
    """Start ``model`` (of ``kind``, built from ``model_config``) from the
    weights of the checkpoint ``state``: the same kind loads one to one; a
    twin's weights start a feedback model of the same shape
    (:func:`~feedback_lib.baselines.twin.load_twin_weights`)."""
    source = state["model_kind"]
    if source != kind and (source, kind) != ("twin", "feedback"):
        raise ValueError(
            f"a {kind} model cannot start from a {source} checkpoint (only "
            "the same kind, or a twin's weights for a feedback model)"
        )
    if state["model_config"] != model_config:
        raise ValueError(
            "the checkpoint holds a model of another shape: "
            f"{state['model_config']}, this run builds {model_config}"
        )
    if source == kind:
        model.load_state_dict(state["model"])
    else:
        load_twin_weights(model, state["model"])


def _check_resumable(saved: dict, config: TrainConfig) -> None:
    ours = dataclasses.asdict(config)
    changed = [
        k
        for k in ours
        if k not in RUNTIME_FIELDS and saved.get(k) != ours[k]
    ]
    if changed:
        detail = ", ".join(
            f"{k}: {saved.get(k)!r} -> {ours[k]!r}" for k in changed
        )
        raise ValueError(
            "cannot resume: the checkpoint was written by a run with "
            f"other settings ({detail}); resume with the same settings or "
            "start a new checkpoint"
        )


def _check_tokenizer(
    state: dict, tokenizer: CharTokenizer, path: str
) -> None:
    if state["tokenizer"] != tokenizer.chars:
        raise ValueError(
            f"{path!r} was trained on a text with the characters "
            f"{state['tokenizer']!r}, this text has {tokenizer.chars!r}; "
            "token ids would mean other characters"
        )


def train(config: TrainConfig, *, text: str | None = None) -> TrainResult:
    """Train the model ``config`` describes; returns it with its tokenizer
    and history.

    ``text`` overrides the training text (tests use a small one); by default
    Tiny Shakespeare is read from ``config.data`` (see
    :func:`~feedback_lib.training.data.shakespeare_path`).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(
            f"config must be a TrainConfig, got {type(config).__name__}"
        )
    device = pick_device(config.device)
    place, device = distributed.start(device)
    precision = pick_precision(device, config.precision)
    configure_backends(device)
    curriculum = config.schedule()

    text = (
        load_shakespeare(
            config.data, progress=config.progress and place.is_main
        )
        if text is None
        else text
    )
    tokenizer = CharTokenizer.fit(text)
    train_ids, val_ids = split_ids(
        tokenizer.encode(text), config.val_fraction
    )
    sampler = BatchSampler(train_ids, config.seed)
    windows = BatchSampler(val_ids).windows(
        curriculum.longest, config.eval_windows
    )
    if config.eval_windows % place.world_size:
        raise ValueError(
            f"eval_windows={config.eval_windows} does not split evenly "
            f"over {place.world_size} processes"
        )
    for seq_len, _ in curriculum.stages:
        # every stage's global batch must split evenly
        place.rows(config.batch_tokens // seq_len)

    torch.manual_seed(config.seed)
    model_config = config.model_config(tokenizer.n_vocab)
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
    scaler = precision.scaler()
    history, start = History(), 0

    if (
        config.resume
        and config.checkpoint
        and os.path.isfile(config.checkpoint)
    ):
        state = load_checkpoint(config.checkpoint)
        _check_resumable(state["config"], config)
        _check_tokenizer(state, tokenizer, config.checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # a float16 run resumed in float16
        if state["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        history, start = History(**state["history"]), state["step"]
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        if device.type == "mps" and state["rng"].get("mps") is not None:
            torch.mps.set_rng_state(state["rng"]["mps"])
    elif config.init_from:
        state = load_checkpoint(config.init_from)
        _check_tokenizer(state, tokenizer, config.init_from)
        load_weights(model, config.model, model_config, state)

    def save(step: int) -> None:
        if not (config.checkpoint and place.is_main):
            return
        save_checkpoint(
            config.checkpoint,
            dict(
                format=FORMAT,
                config=dataclasses.asdict(config),
                model_kind=config.model,
                model_config=model_config,
                tokenizer=tokenizer.chars,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(),
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
                history=dataclasses.asdict(history),
            ),
        )

    wrapped = model
    if place.enabled:
        wrapped = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
        )

    def validate(step: int) -> None:
        val = evaluate(model, windows, precision, place, device)
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

    def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = curriculum.seq_len(step, config.steps)
        rows = config.batch_tokens // seq_len  # of the global batch
        x, y = sampler.batch(step, rows, seq_len, place.rows(rows))
        return to_device(x, device), to_device(y, device)

    seconds, tokens = (
        (history.seconds[-1], history.tokens[-1])
        if history.step
        else (0.0, 0)
    )

    def after_step(report: StepReport) -> None:
        nonlocal seconds, tokens
        seq_len = report.batch[0].shape[1]
        seconds += report.seconds
        # all processes' tokens
        tokens += config.batch_tokens // seq_len * seq_len
        for name, value in (
            ("step", report.step),
            ("tokens", tokens),
            ("seconds", seconds),
            ("loss", report.loss),
            ("lr", report.lr),
            ("seq_len", seq_len),
        ):
            getattr(history, name).append(value)
        bar.update(1)
        bar.set_postfix(
            loss=f"{report.loss:.3f}",
            tok_s=f"{history.tokens_per_second():,.0f}",
            refresh=False,
        )
        if (
            report.step % config.eval_every == 0
            or report.step == config.steps
        ):
            validate(report.step)
            bar.set_postfix(
                loss=f"{report.loss:.3f}",
                val=f"{history.val_loss[-1]:.3f}",
                tok_s=f"{history.tokens_per_second():,.0f}",
            )
        if report.step == config.steps or (
            config.checkpoint_every
            and report.step % config.checkpoint_every == 0
        ):
            save(report.step)

    from tqdm import tqdm

    bar = tqdm(
        total=config.steps,
        initial=start,
        disable=not (config.progress and place.is_main),
        desc=config.model,
        unit="step",
        mininterval=1.0,
    )
    if start == 0:
        validate(0)
    try:
        fit(
            wrapped,
            batch_at,
            steps=config.steps,
            optimizer=optimizer,
            scheduler=scheduler,
            precision=precision,
            scaler=scaler,
            grad_clip=config.grad_clip,
            start=start,
            place=place,
            after_step=after_step,
        )
    finally:
        bar.close()
    if config.steps == start and not history.val_step:
        validate(start)
    model.eval()
    return TrainResult(model, tokenizer, history, config)


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
        "of the book.",
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
        help="characters to generate after training (0: none)",
    )
    return p


def main(argv: list[str] | None = None) -> TrainResult:
    """Parse the command line, train, print the final validation loss and a
    sample."""
    args = vars(parser().parse_args(argv))
    sample_chars = args.pop("sample")
    try:
        config = TrainConfig(**args)
    except ValueError as e:
        parser().error(str(e))
    try:
        result = train(config)
        if int(os.environ.get("RANK", "0")) == 0:
            val = result.val_loss
            history = result.history
            tokens = history.tokens[-1] if history.tokens else 0
            print(
                f"validation loss {val:.4f} nats/char = "
                f"{val / math.log(2):.4f} bits/char after {tokens:,} "
                f"tokens, {history.tokens_per_second():,.0f} tokens/s"
            )
            if sample_chars:
                print(result.sample("\n", sample_chars))
        return result
    finally:
        distributed.stop()
