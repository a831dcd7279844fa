"""The training loop of the training chapter, and its command line: ``python -m feedback_lib.train --help``.

One function, :func:`train`, trains any of the three language models of the book on Tiny Shakespeare:

* ``feedback``: :class:`~feedback_lib.FeedbackLM` (shared keys and values), token by token;
* ``twin``: :class:`~feedback_lib.warm_start.ParallelTwinLM`, the same layers run in parallel (the
  first stage of a warm start; ``init_from`` its checkpoint to continue as a feedback model);
* ``parallel``: :class:`~feedback_lib.ParallelLM`, a standard ``nn.TransformerEncoder`` model.

It uses AdamW with linear warmup and cosine decay, gradient clipping, periodic validation, an
optional sequence-length curriculum, mixed precision and TF32 on CUDA, data parallelism under
``torchrun``, and atomic checkpoints from which a run resumes with the losses it would have had.

Examples::

    python -m feedback_lib.train --steps 2000 --checkpoint runs/feedback.pt
    python -m feedback_lib.train --model twin --steps 3000 --checkpoint runs/twin.pt
    python -m feedback_lib.train --init-from runs/twin.pt --steps 500 --checkpoint runs/warm.pt
    torchrun --nproc_per_node=2 -m feedback_lib.train --steps 100
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from feedback_lib import distributed
from feedback_lib.checks import check_positive_int, check_probability
from feedback_lib.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from feedback_lib.data import BatchSampler, CharTokenizer, load_shakespeare, split_ids
from feedback_lib.devices import PRECISIONS, Precision, configure_backends, pick_device, pick_precision
from feedback_lib.lm import FeedbackLM
from feedback_lib.parallel import ParallelLM
from feedback_lib.schedule import Curriculum, WarmupCosine
from feedback_lib.warm_start import ParallelTwinLM, load_twin_weights

MODEL_KINDS = ("feedback", "twin", "parallel")
#: Fields of a TrainConfig that may change when a run resumes (they do not change what is computed).
RUNTIME_FIELDS = ("device", "data", "checkpoint", "checkpoint_every", "resume", "progress", "log")


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything that defines a training run (each field is also a command-line option)."""

    model: str = _option("feedback", "which model: feedback, twin (parallel twin) or parallel (nn.TransformerEncoder)")
    d_model: int = _option(256, "width of the model")
    heads: int = _option(4, "attention heads")
    n_layers: int = _option(4, "layers")
    d_ff: int = _option(1024, "width of the feed-forward hidden layer")
    dropout: float = _option(0.0, "dropout (above 0 the feedback model runs its reference loop, about 3x slower)")
    mem_len: int | None = _option(None, "feedback/twin: attend to at most this many past steps (default: all)")
    seq_len: int = _option(128, "training sequence length (ignored when a curriculum is given)")
    curriculum: str | None = _option(None, "sequence lengths by share of the steps, e.g. 32:0.25,64:0.25,128:0.5")
    batch_tokens: int = _option(2048, "tokens per step over all processes (rows = batch_tokens // seq_len)")
    steps: int = _option(1000, "optimizer steps")
    lr: float = _option(1e-3, "peak learning rate of AdamW")
    min_lr_ratio: float = _option(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup_steps: int = _option(100, "steps of linear learning-rate warmup")
    weight_decay: float = _option(0.1, "AdamW weight decay of the matrices (not of biases, norms, mixture)")
    grad_clip: float = _option(1.0, "clip the gradient norm to this value (0: no clipping)")
    eval_every: int = _option(200, "validate every this many steps (and at the start and the end)")
    eval_windows: int = _option(64, "validation windows, each of the longest training length")
    val_fraction: float = _option(0.1, "share of the text (its end) held out for validation")
    seed: int = _option(0, "seed of the weights, the batches and dropout")
    device: str = _option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    precision: str = _option("auto", "auto (bf16 or fp16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16")
    data: str | None = _option(None, "path of Tiny Shakespeare (default: $FEEDBACK_LIB_SHAKESPEARE or download)")
    init_from: str | None = _option(None, "start from this checkpoint's weights (a twin's: the warm start)")
    checkpoint: str | None = _option(None, "write checkpoints to this path")
    checkpoint_every: int = _option(0, "also checkpoint every this many steps (0: only at the end)")
    resume: bool = _option(False, "continue from --checkpoint if it exists")
    progress: bool = _option(True, "show a progress bar")
    log: bool = _option(False, "print one line per validation")

    def __post_init__(self):
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model must be one of {MODEL_KINDS}, got {self.model!r}")
        for name in ("d_model", "heads", "n_layers", "d_ff", "seq_len", "batch_tokens", "steps", "eval_every",
                     "eval_windows"):
            check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name, low, high in (("lr", 0, math.inf), ("grad_clip", 0, math.inf), ("weight_decay", 0, math.inf),
                                ("min_lr_ratio", 0, 1), ("val_fraction", 0, 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                    or not math.isfinite(value) or (name in ("lr", "val_fraction") and value == 0) \
                    or (name == "val_fraction" and value == 1):
                bounds = {"lr": "> 0", "val_fraction": "in (0, 1)", "min_lr_ratio": "in [0, 1]"}.get(name, ">= 0")
                raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}")
        check_probability("dropout", self.dropout)
        if self.mem_len is not None:
            check_positive_int("mem_len", self.mem_len)
            if self.model == "parallel":
                raise ValueError("mem_len applies to the feedback and twin models; the parallel model attends "
                                 "to its whole context (leave mem_len unset)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume=True needs a checkpoint path to resume from")
        curriculum = self.schedule()
        if self.batch_tokens < curriculum.longest:
            raise ValueError(f"batch_tokens={self.batch_tokens} is less than one sequence of {curriculum.longest} "
                             f"tokens; every step needs at least one row")

    def schedule(self) -> Curriculum:
        """The sequence-length schedule: the curriculum, or ``seq_len`` throughout."""
        return Curriculum.parse(self.curriculum) if self.curriculum else Curriculum(((self.seq_len, 1.0),))

    def model_config(self, n_vocab: int) -> dict:
        """The keyword arguments of the model class."""
        shape = dict(n_vocab=n_vocab, d_model=self.d_model, heads=self.heads, n_layers=self.n_layers,
                     d_ff=self.d_ff, dropout=self.dropout)
        if self.model == "parallel":
            return dict(shape, max_len=self.schedule().longest)
        return dict(shape, mem_len=self.mem_len)


@dataclass
class History:
    """What a run measured, step by step: the chapter plots these lists.

    ``seconds`` counts training time only (not validation or checkpoints); ``tokens`` are all
    processes' tokens; losses are in nats per character.
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

    def then(self, later: "History") -> "History":
        """One history of two consecutive runs (a warm start's two stages): ``later``'s steps,
        tokens and seconds (also those of its validations) continue from the end of this one."""
        offsets = dict(step=self.step[-1] if self.step else 0, tokens=self.tokens[-1] if self.tokens else 0,
                       seconds=self.seconds[-1] if self.seconds else 0.0)
        joined = {}
        for f in dataclasses.fields(self):
            offset = offsets.get(f.name.removeprefix("val_"), 0)    # 0 for losses, lr and seq_len
            joined[f.name] = getattr(self, f.name) + [v + offset for v in getattr(later, f.name)]
        return History(**joined)

    def tokens_per_second(self, last: int = 50) -> float:
        """Training throughput over the last ``last`` steps."""
        if len(self.step) < 2:
            return float("nan")
        i = max(0, len(self.step) - 1 - last)
        return (self.tokens[-1] - self.tokens[i]) / max(1e-9, self.seconds[-1] - self.seconds[i])


@dataclass
class TrainResult:
    """A finished run: the model (on its device, in eval mode), its tokenizer, history and config."""

    model: nn.Module
    tokenizer: CharTokenizer
    history: History
    config: TrainConfig

    @property
    def val_loss(self) -> float:
        return self.history.val_loss[-1]

    def sample(self, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = None,
               seed: int = 0) -> str:
        """Text continuing ``prompt`` (sampled with ``temperature`` and ``top_k``, reproducible from ``seed``)."""
        device = next(self.model.parameters()).device
        ids = self.tokenizer.encode(prompt)[None].to(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        out = self.model.generate(ids, max_new_tokens, temperature, top_k, generator=generator)
        return self.tokenizer.decode(out[0].cpu())


def build_model(kind: str, model_config: dict) -> nn.Module:
    """A fresh model of ``kind`` (see :data:`MODEL_KINDS`)."""
    if kind == "feedback":
        return FeedbackLM(**model_config, shared_kv=True)
    if kind == "twin":
        return ParallelTwinLM(**model_config)
    return ParallelLM(**model_config)


def load_weights(model: nn.Module, kind: str, model_config: dict, state: dict) -> None:
    """Start ``model`` (of ``kind``, built from ``model_config``) from the weights of the checkpoint
    ``state``: the same kind loads one to one; a twin's weights start a feedback model of the same
    shape (:func:`~feedback_lib.warm_start.load_twin_weights`)."""
    source = state["model_kind"]
    if source != kind and (source, kind) != ("twin", "feedback"):
        raise ValueError(f"a {kind} model cannot start from a {source} checkpoint (only the same kind, "
                         f"or a twin's weights for a feedback model)")
    if state["model_config"] != model_config:
        raise ValueError(f"the checkpoint holds a model of another shape: {state['model_config']}, "
                         f"this run builds {model_config}")
    if source == kind:
        model.load_state_dict(state["model"])
    else:
        load_twin_weights(model, state["model"])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices (linear maps, embeddings, the key position embeddings ``U^K``);
    none on biases (also ``U^Q``, ``query_pos_bias``, and ``S``, ``key_pos_bias``), LayerNorm gains
    and the memory's layer mixture."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.endswith("bias") else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned host memory and a non-blocking copy on CUDA; a plain move elsewhere."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Mean cross-entropy (nats per character) of the model's predictions of ``y [batch, seq]``."""
    with precision.autocast():
        logits = model(x)                                                # [batch, seq, n_vocab]
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               scaler: torch.amp.GradScaler, precision: Precision, grad_clip: float,
               x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on the batch ``x``, ``y [batch, seq]``; returns the loss (detached).

    With float16 the scaler multiplies the loss before the backward pass (so small gradients do
    not underflow) and divides the gradients again before clipping and the step, which it skips
    if they overflowed; otherwise the scaler is disabled and each of its calls does nothing.
    """
    loss = loss_of(model, x, y, precision)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)                           # clip the true gradients, not scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach()


def optimizer_and_schedule(model: nn.Module, *, lr: float, weight_decay: float, warmup_steps: int, steps: int,
                           min_lr_ratio: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), fused: bool = False
                           ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its learning-rate schedule: linear warmup over
    ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``steps``
    (:class:`~feedback_lib.schedule.WarmupCosine`). Shared by :func:`train` and the task helpers
    of chapters 10 and 11."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, steps, min_lr_ratio))
    return optimizer, scheduler


@torch.no_grad()
def evaluate(model: nn.Module, windows: tuple[torch.Tensor, torch.Tensor], precision: Precision,
             place: distributed.Distributed, device: torch.device, rows: int = 16) -> float:
    """Mean validation loss over ``windows`` (inputs and targets ``[count, seq]``), each process taking
    every ``world_size``-th window; in eval mode (no dropout), restoring the previous mode."""
    was_training = model.training
    model.eval()
    x_all, y_all = (w[place.rank::place.world_size] for w in windows)
    total = 0.0
    for i in range(0, len(x_all), rows):
        x, y = _to_device(x_all[i:i + rows], device), _to_device(y_all[i:i + rows], device)
        total += loss_of(model, x, y, precision).item() * len(x)
    model.train(was_training)
    # NCCL reduces CUDA tensors, gloo CPU ones.
    mean = torch.tensor(total / len(x_all), dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    return place.mean(mean).item()


def _check_resumable(saved: dict, config: TrainConfig) -> None:
    ours = dataclasses.asdict(config)
    changed = [k for k in ours if k not in RUNTIME_FIELDS and saved.get(k) != ours[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {ours[k]!r}" for k in changed)
        raise ValueError(f"cannot resume: the checkpoint was written by a run with other settings ({detail}); "
                         f"resume with the same settings or start a new checkpoint")


def _check_tokenizer(state: dict, tokenizer: CharTokenizer, path: str) -> None:
    if state["tokenizer"] != tokenizer.chars:
        raise ValueError(f"{path!r} was trained on a text with the characters {state['tokenizer']!r}, this text has "
                         f"{tokenizer.chars!r}; token ids would mean other characters")


def train(config: TrainConfig, *, text: str | None = None) -> TrainResult:
    """Train the model ``config`` describes; returns it with its tokenizer and history.

    ``text`` overrides the training text (tests use a small one); by default Tiny Shakespeare is
    read from ``config.data`` (see :func:`~feedback_lib.data.shakespeare_path`).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    device = pick_device(config.device)
    place, device = distributed.start(device)
    precision = pick_precision(device, config.precision)
    configure_backends(device)
    curriculum = config.schedule()

    text = load_shakespeare(config.data, progress=config.progress and place.is_main) if text is None else text
    tokenizer = CharTokenizer.fit(text)
    train_ids, val_ids = split_ids(tokenizer.encode(text), config.val_fraction)
    sampler = BatchSampler(train_ids, config.seed)
    windows = BatchSampler(val_ids).windows(curriculum.longest, config.eval_windows)
    if config.eval_windows % place.world_size:
        raise ValueError(f"eval_windows={config.eval_windows} does not split evenly over {place.world_size} processes")
    for seq_len, _ in curriculum.stages:
        place.rows(config.batch_tokens // seq_len)          # every stage's global batch must split evenly

    torch.manual_seed(config.seed)
    model_config = config.model_config(tokenizer.n_vocab)
    model = build_model(config.model, model_config).to(device)
    optimizer, scheduler = optimizer_and_schedule(
        model, lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps, steps=config.steps,
        min_lr_ratio=config.min_lr_ratio, fused=device.type in ("cpu", "cuda"))
    scaler = precision.scaler()
    history, start = History(), 0

    if config.resume and config.checkpoint and os.path.isfile(config.checkpoint):
        state = load_checkpoint(config.checkpoint)
        _check_resumable(state["config"], config)
        _check_tokenizer(state, tokenizer, config.checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and scaler.is_enabled():              # a float16 run resumed in float16
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
        save_checkpoint(config.checkpoint, dict(
            format=FORMAT, config=dataclasses.asdict(config), model_kind=config.model, model_config=model_config,
            tokenizer=tokenizer.chars, model=model.state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), step=step,
            rng=dict(cpu=torch.get_rng_state(),
                     cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     mps=torch.mps.get_rng_state() if device.type == "mps" else None),
            history=dataclasses.asdict(history)))

    wrapped = model
    if place.enabled:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def validate(step: int) -> None:
        val = evaluate(model, windows, precision, place, device)
        history.val_step.append(step)
        history.val_tokens.append(history.tokens[-1] if history.tokens else 0)
        history.val_seconds.append(history.seconds[-1] if history.seconds else 0.0)
        history.val_loss.append(val)
        if config.log and place.is_main:
            print(_log_line(history, step), flush=True)

    from tqdm import tqdm
    bar = tqdm(total=config.steps, initial=start, disable=not (config.progress and place.is_main),
               desc=config.model, unit="step", mininterval=1.0)
    if start == 0:
        validate(0)
    seconds, tokens = (history.seconds[-1], history.tokens[-1]) if history.step else (0.0, 0)
    model.train()
    try:
        for step in range(start, config.steps):
            began = time.perf_counter()
            seq_len = curriculum.seq_len(step, config.steps)
            batch = config.batch_tokens // seq_len
            x, y = sampler.batch(step, batch, seq_len, place.rows(batch))
            lr = scheduler.get_last_lr()[0]
            loss = train_step(wrapped, optimizer, scheduler, scaler, precision, config.grad_clip,
                              _to_device(x, device), _to_device(y, device))
            loss_value = place.mean(loss).item()                 # also waits for the GPU, so the timing is honest
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the training loss became {loss_value} at step {step}; "
                                         f"lower lr (now {config.lr}) or keep grad_clip on")
            seconds += time.perf_counter() - began
            tokens += batch * seq_len
            for name, value in (("step", step + 1), ("tokens", tokens), ("seconds", seconds), ("loss", loss_value),
                                ("lr", lr), ("seq_len", seq_len)):
                getattr(history, name).append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{history.tokens_per_second():,.0f}", refresh=False)
            done = step + 1
            if done % config.eval_every == 0 or done == config.steps:
                validate(done)
                bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{history.val_loss[-1]:.3f}",
                                tok_s=f"{history.tokens_per_second():,.0f}")
            if done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0):
                save(done)
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
    speed = f"{tok_s:7,.0f} tok/s" if math.isfinite(tok_s) else "      - tok/s"
    return (f"step {step:>5} | train {train_loss} | val {val:.3f} nats = {val / math.log(2):.3f} bits/char | "
            f"{speed} | {history.seconds[-1] / 60 if history.seconds else 0:5.1f} min")


def parser() -> argparse.ArgumentParser:
    """The command line: one option per :class:`TrainConfig` field."""
    p = argparse.ArgumentParser(prog="python -m feedback_lib.train", description="Train a feedback transformer (or its parallel twin, or a standard transformer) on "
                                "Tiny Shakespeare, as in chapter 8 of the book.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}[f.type]
        choices = {"model": MODEL_KINDS, "precision": PRECISIONS}.get(f.name)
        p.add_argument(flag, type=kind, default=f.default, choices=choices, help=f.metadata["help"])
    p.add_argument("--sample", type=int, default=200, help="characters to generate after training (0: none)")
    return p


def main(argv: list[str] | None = None) -> TrainResult:
    """Parse the command line, train, print the final validation loss and a sample."""
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
            print(f"validation loss {val:.4f} nats/char = {val / math.log(2):.4f} bits/char after "
                  f"{result.history.tokens[-1] if result.history.tokens else 0:,} tokens, "
                  f"{result.history.tokens_per_second():,.0f} tokens/s")
            if sample_chars:
                print(result.sample("\n", sample_chars))
        return result
    finally:
        distributed.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
