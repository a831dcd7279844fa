"""Benchmarks you can rerun: training and generation speed, and peak
training memory.

``python -m feedback_lib.bench`` times, in one process and side by side, a
training step (forward, cross-entropy, backward and a step of PyTorch's
fused Adam, the same for all) and greedy generation for:

* feedback_lib's :class:`~feedback_lib.FeedbackTransformer` and shared
  key/value model (the fused loop with its C++ step loops, the same with its
  Python step loops, and the readable loop of chapter 5, for comparison);
* a parallel causal Transformer of the same width and depth
  (:class:`~feedback_lib.ParallelLM`);
* when installed, labml.ai's implementation (``pip install labml && pip
  install --no-deps labml-nn``) and the ``feedback-transformer-pytorch``
  package (``pip install --no-deps feedback-transformer-pytorch einops``),
  run with ``seq_len=1``, its exact feedback setting.

Timings are interleaved (every implementation runs once per round) and the
best round is kept, so that a busy machine slows every implementation alike.
``--memory`` adds the peak training memory of the naive stack, the Stack and
the fused loop. Chapter 12 of the book shows a stored run and chapter 6 the
memory and time against the sequence length; ``--help`` lists the options.
A bad option (a size below 1, an unknown device, a ``--json`` path that
cannot be written, ...) is a usage error before any timing; the JSON
report is written when the benchmark has finished, in one piece.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from feedback_lib.baselines.parallel import ParallelLM
from feedback_lib.checks import (
    check_heads,
    check_positive_int,
    positive_int_argument,
)
from feedback_lib.decoding import Decoder, RereadingDecoder, generate_from
from feedback_lib.fast import native
from feedback_lib.model.lm import FeedbackLM
from feedback_lib.training.checkpoint import atomic_write
from feedback_lib.training.devices import cpu_name

#: The implementation the ratios are relative to.
REFERENCE = "feedback_lib KV"


@dataclass(frozen=True)
class BenchConfig:
    """Model and workload sizes (the defaults are the issue's reference
    setting)."""

    d_model: int = 256
    heads: int = 4
    n_layers: int = 4
    d_ff: int = 1024
    n_vocab: int = 65
    seq_len: int = 64
    batch: int = 16
    gen_tokens: int = 128
    repeats: int = 3
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name != "device":
                check_positive_int(name, value)
        check_heads(self.heads, self.d_model)


@dataclass
class Contender:
    """One implementation under test, wrapped to take token ids ``[batch,
    seq]``."""

    name: str
    model: nn.Module
    # [batch, seq] -> [batch, seq, n_vocab]
    logits: Callable[[torch.Tensor], torch.Tensor]
    # (prompt [1, k], n) -> [1, k + n], greedy
    generate: Callable[[torch.Tensor, int], torch.Tensor]
    generation: str  # how it generates
    # entered around every timed call, backward pass included (e.g.
    # native.python_loops)
    context: Callable[[], contextlib.AbstractContextManager] = (
        contextlib.nullcontext
    )

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@dataclass
class Result:
    name: str
    parameters: int
    train_tokens_per_s: float
    generate_tokens_per_s: float | None
    generation: str
    train_seconds: list[float] = field(default_factory=list)


def feedback_lib_contenders(config: BenchConfig) -> list[Contender]:
    """feedback_lib's models and the parallel baseline."""
    sizes = dict(
        d_model=config.d_model,
        heads=config.heads,
        n_layers=config.n_layers,
        d_ff=config.d_ff,
    )
    out = []
    variants = (
        ("feedback_lib", False, False, contextlib.nullcontext),
        ("feedback_lib KV", True, True, contextlib.nullcontext),
        (
            "feedback_lib KV, Python step loops",
            True,
            True,
            native.python_loops,
        ),
        (
            "feedback_lib KV, readable loop",
            True,
            False,
            contextlib.nullcontext,
        ),
    )
    for name, shared_kv, fused, context in variants:
        torch.manual_seed(0)
        model = FeedbackLM(config.n_vocab, shared_kv=shared_kv, **sizes)
        if shared_kv:
            model.transformer.fused = fused
        out.append(
            Contender(
                name, model, model, _greedy(model), "cached memory", context
            )
        )
    torch.manual_seed(0)
    parallel = ParallelLM(
        config.n_vocab,
        max_len=max(config.seq_len, config.gen_tokens + 1),
        **sizes,
    )
    out.append(
        Contender(
            "parallel (nn.TransformerEncoder)",
            parallel,
            parallel,
            _greedy(parallel),
            "re-reads the context",
        )
    )
    return out


def _greedy(
    model: nn.Module,
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    return lambda prompt, n: model.generate(prompt, n, temperature=0)


def labml_contenders(config: BenchConfig) -> list[Contender]:
    """labml.ai's two feedback transformers, if ``labml_nn`` is installed
    (else an empty list)."""
    try:
        from labml_nn.transformers import feed_forward as labml_ff
        from labml_nn.transformers import feedback as labml
    except ImportError:
        return []
    out = []
    for name, shared_kv in (
        ("labml_nn FeedbackTransformer", False),
        ("labml_nn FeedbackTransformerKV", True),
    ):
        torch.manual_seed(0)
        layer = labml.FeedbackTransformerLayer(
            d_model=config.d_model,
            attn=labml.FeedbackAttention(
                config.heads,
                config.d_model,
                0.0,
                is_kv_precomputed=shared_kv,
            ),
            feed_forward=labml_ff.FeedForward(
                config.d_model, config.d_ff, 0.0
            ),
            dropout_prob=0.0,
        )
        transformer = (
            labml.FeedbackTransformerKV(
                layer, config.n_layers, config.d_model, config.heads
            )
            if shared_kv
            else labml.FeedbackTransformer(layer, config.n_layers)
        )
        model = nn.ModuleDict(
            dict(
                embed=nn.Embedding(config.n_vocab, config.d_model),
                transformer=transformer,
                head=nn.Linear(config.d_model, config.n_vocab),
            )
        )

        def logits(tokens, model=model):  # labml's modules are time-major
            return model["head"](
                model["transformer"](model["embed"](tokens.t()))
            ).transpose(0, 1)

        out.append(
            Contender(
                name,
                model,
                logits,
                _rerun_prefix(logits, config.n_vocab),
                "re-runs the prefix",
            )
        )
    return out


def _rerun_prefix(
    logits: Callable[[torch.Tensor], torch.Tensor], n_vocab: int
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    @torch.no_grad()
    def generate(prompt: torch.Tensor, n: int) -> torch.Tensor:
        capacity = prompt.shape[1] + n - 1
        decoder = RereadingDecoder(
            logits,
            capacity,
            batch=prompt.shape[0],
            capacity=capacity,
            n_vocab=n_vocab,
            device=prompt.device,
        )
        return generate_from(decoder, prompt, n, temperature=0)

    return generate


def ftp_contenders(config: BenchConfig) -> list[Contender]:
    """The ``feedback-transformer-pytorch`` package with ``seq_len=1``, if
    installed."""
    try:
        from feedback_transformer_pytorch import FeedbackTransformer
    except ImportError:
        return []
    torch.manual_seed(0)
    model = FeedbackTransformer(
        num_tokens=config.n_vocab,
        dim=config.d_model,
        depth=config.n_layers,
        mem_len=max(config.seq_len, config.gen_tokens + 1),
        seq_len=1,
        heads=config.heads,
        dim_head=config.d_model // config.heads,
    )

    @torch.no_grad()
    def generate(prompt: torch.Tensor, n: int) -> torch.Tensor:
        logits, memory = model(prompt, return_memory=True)
        tokens = [prompt]
        for _ in range(n):
            tokens.append(logits[:, -1:].argmax(-1))
            logits, memory = model(
                tokens[-1], memory=memory, return_memory=True
            )
        return torch.cat(tokens, dim=1)

    return [
        Contender(
            "feedback-transformer-pytorch",
            model,
            model,
            generate,
            "cached memory",
        )
    ]


def contenders(
    config: BenchConfig, only: list[str] | None = None
) -> list[Contender]:
    """Every available implementation on ``config.device`` (those whose name
    starts with one of ``only``; each prefix must match one)."""
    found = (
        feedback_lib_contenders(config)
        + labml_contenders(config)
        + ftp_contenders(config)
    )
    if only:
        names = [c.name for c in found]
        for prefix in only:
            if not any(name.startswith(prefix) for name in names):
                raise ValueError(
                    "no available implementation's name starts with "
                    f"{prefix!r} (of only={only}); the names are "
                    + ", ".join(map(repr, names))
                )
        found = [
            c
            for c in found
            if any(c.name.startswith(prefix) for prefix in only)
        ]
    for c in found:
        c.model.to(config.device)
    return found


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def adam(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer every implementation gets: Adam, PyTorch's fused kernel
    where it has one."""
    try:
        return torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    except RuntimeError:  # no fused Adam for this device or dtype
        return torch.optim.Adam(model.parameters(), lr=1e-4)


def train_step(
    contender: Contender,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
) -> None:
    """One training step: next-token cross-entropy on ``tokens [batch, seq +
    1]``, backward, Adam."""
    with contender.context():
        logits = contender.logits(tokens[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def time_training(
    found: list[Contender], config: BenchConfig
) -> dict[str, list[float]]:
    """Seconds per training step of each contender, ``config.repeats``
    interleaved rounds after a warm-up."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0,
        config.n_vocab,
        (config.batch, config.seq_len + 1),
        generator=generator,
    )
    tokens = tokens.to(config.device)
    optimizers = {c.name: adam(c.model) for c in found}
    for c in found:
        c.model.train()
        train_step(c, optimizers[c.name], tokens)  # warm-up
    seconds: dict[str, list[float]] = {c.name: [] for c in found}
    for _ in range(config.repeats):
        for c in found:
            _sync(config.device)
            start = time.perf_counter()
            train_step(c, optimizers[c.name], tokens)
            _sync(config.device)
            seconds[c.name].append(time.perf_counter() - start)
    return seconds


def time_generation(contender: Contender, config: BenchConfig) -> float:
    """Greedy generation of ``config.gen_tokens`` tokens at batch 1 from a
    one-token prompt, in tokens/s."""
    contender.model.eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=config.device)
    with contender.context():
        contender.generate(prompt, 2)  # warm-up
        _sync(config.device)
        start = time.perf_counter()
        contender.generate(prompt, config.gen_tokens)
        _sync(config.device)
        return config.gen_tokens / (time.perf_counter() - start)


def latency_by_position(
    decoders: dict[str, Callable[[], Decoder]],
    tokens: torch.Tensor,
    repeats: int = 3,
) -> dict[str, list[float]]:
    """Seconds each decoder takes to read token ``t`` of ``tokens [batch,
    n]`` after tokens ``0..t-1``, one token per step: the per-token latency
    of generation at every position (chapter 9).

    ``decoders`` maps a name to a function that builds a fresh decoder for
    ``n`` tokens, e.g. ``lambda: model.decoder(1, n, kv_cache=True)``. The
    decoders take turns, one pass over the tokens each per repeat, and the
    fastest repeat is kept for every position, so that a busy machine slows
    all of them alike.
    """
    check_positive_int("repeats", repeats)
    n = tokens.shape[1]
    best = {name: [math.inf] * n for name in decoders}
    with torch.no_grad():
        for _ in range(repeats):
            for name, make in decoders.items():
                decoder = make()
                for t in range(n):
                    ids = tokens[:, t : t + 1]
                    start = time.perf_counter()
                    decoder.step(ids)
                    best[name][t] = min(
                        best[name][t], time.perf_counter() - start
                    )
    return best


def run(
    config: BenchConfig,
    only: list[str] | None = None,
    generate: bool = True,
) -> list[Result]:
    """Time every available implementation (see :func:`contenders`);
    returns one :class:`Result` each."""
    return measure(contenders(config, only), config, generate)


def measure(
    found: list[Contender], config: BenchConfig, generate: bool = True
) -> list[Result]:
    """Time the implementations ``found``; one :class:`Result` each."""
    seconds = time_training(found, config)
    tokens = config.batch * config.seq_len
    return [
        Result(
            c.name,
            c.parameters,
            tokens / min(seconds[c.name]),
            time_generation(c, config) if generate else None,
            c.generation,
            seconds[c.name],
        )
        for c in found
    ]


def machine() -> str:
    """The device and thread count, in words."""
    threads = torch.get_num_threads()
    cpu = cpu_name()
    text = (
        f"CPU {cpu}, {threads} torch threads, torch {torch.__version__}, "
        f"fused loop: {native.status()}"
    )
    if torch.cuda.is_available():
        text += f"; CUDA device {torch.cuda.get_device_name()}"
    return text


def format_table(results: list[Result], reference: str = REFERENCE) -> str:
    """A Markdown table of the results, with speed ratios of ``reference``
    over each implementation."""
    ref = next((r for r in results if r.name == reference), None)
    lines = [
        "| implementation | parameters | train tokens/s | generate "
        f"tokens/s | generation | {reference}: train x | generate x |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        gen = (
            "-"
            if r.generate_tokens_per_s is None
            else f"{r.generate_tokens_per_s:.1f}"
        )
        train_x = gen_x = "-"
        if ref is not None:
            train_x = f"{ref.train_tokens_per_s / r.train_tokens_per_s:.2f}"
            ours, theirs = (
                ref.generate_tokens_per_s,
                r.generate_tokens_per_s,
            )
            if ours and theirs:
                gen_x = f"{ours / theirs:.2f}"
        lines.append(
            f"| {r.name} | {r.parameters / 1e6:.2f}M | "
            f"{r.train_tokens_per_s:.0f} | {gen} | {r.generation} | "
            f"{train_x} | {gen_x} |"
        )
    return "\n".join(lines)


# --- Peak training memory
# -------------------------------------------------------------------------

#: The three ways the shared key/value model can store its memory.
MEMORY_VARIANTS = ("naive stack", "Stack", "fused loop")


def _memory_model(variant: str, config: BenchConfig) -> FeedbackLM:
    torch.manual_seed(0)
    model = FeedbackLM(
        config.n_vocab,
        d_model=config.d_model,
        heads=config.heads,
        n_layers=config.n_layers,
        d_ff=config.d_ff,
        shared_kv=True,
    )
    model.transformer.naive_stack = variant == "naive stack"
    model.transformer.fused = variant == "fused loop"
    return model.to(config.device)


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field_name + ":"))
    return int(line.split()[1]) * 1024


def _memory_pass(model: FeedbackLM, tokens: torch.Tensor) -> None:
    """One forward and backward pass (loss: mean of the logits, no
    optimizer)."""
    model(tokens).mean().backward()


def measure_step_memory(variant: str, config: BenchConfig) -> int:
    """Peak extra memory (bytes) of one forward and backward pass of the
    shared key/value model at ``config.seq_len``, stored as ``variant`` (one
    of :data:`MEMORY_VARIANTS`).

    On CUDA it is the peak of ``torch.cuda.max_memory_allocated`` above what
    was allocated before. On a CPU it is the rise of the process's peak
    resident memory (Linux ``VmHWM``) over what it held before the pass,
    which is why :func:`peak_training_memory` runs each measurement in a
    fresh process.
    """
    model = _memory_model(variant, config)
    tokens = torch.zeros(
        (config.batch, config.seq_len),
        dtype=torch.long,
        device=config.device,
    )
    _memory_pass(model, tokens[:, :2])  # warm-up: lazy initialisation
    model.zero_grad(set_to_none=False)
    if config.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _memory_pass(model, tokens)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # reset VmHWM to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_bytes("VmRSS")
    _memory_pass(model, tokens)
    return _rss_bytes("VmHWM") - before


def peak_training_memory(variant: str, config: BenchConfig) -> int:
    """:func:`measure_step_memory` in a fresh Python process (on CUDA, in
    this one)."""
    if config.device.startswith("cuda"):
        return measure_step_memory(variant, config)
    if not sys.platform.startswith("linux"):
        raise RuntimeError(
            "peak memory on a CPU is measured from /proc (Linux only); "
            "use a CUDA device"
        )
    spec = json.dumps(
        {
            "variant": variant,
            "config": asdict(config),
            "threads": torch.get_num_threads(),
        }
    )
    # glibc keeps freed memory of its heap; with a fixed mmap threshold
    # every tensor of 64 KiB or more is mapped on its own and unmapped when
    # freed, so the resident peak follows the live tensors. (This slows
    # large allocations down, so times are measured separately.)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "feedback_lib.bench",
            "--memory-worker",
            spec,
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return int(done.stdout.strip().splitlines()[-1])


def memory_scaling(
    seq_lens: list[int],
    config: BenchConfig,
    variants: tuple[str, ...] = MEMORY_VARIANTS,
) -> dict[str, list[int]]:
    """``{variant: [peak bytes per sequence length]}`` for the shared
    key/value model (chapter 6)."""
    return {
        v: [
            peak_training_memory(
                v, BenchConfig(**{**asdict(config), "seq_len": n})
            )
            for n in seq_lens
        ]
        for v in variants
    }


def time_scaling(
    seq_lens: list[int],
    config: BenchConfig,
    variants: tuple[str, ...] = MEMORY_VARIANTS,
    repeats: int = 2,
) -> dict[str, list[float]]:
    """``{variant: [seconds per sequence length]}``: the best of ``repeats``
    forward and backward passes of the shared key/value model, the variants
    interleaved, in this process (chapter 6)."""
    models = {v: _memory_model(v, config) for v in variants}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for n in seq_lens:
        tokens = torch.zeros(
            (config.batch, n), dtype=torch.long, device=config.device
        )
        best = {v: float("inf") for v in variants}
        for _ in range(repeats):
            for v, model in models.items():
                _sync(config.device)
                start = time.perf_counter()
                _memory_pass(model, tokens)
                _sync(config.device)
                best[v] = min(best[v], time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
        for v in variants:
            seconds[v].append(best[v])
    return seconds


def _device(text: str) -> str:
    """argparse type: ``cpu``, or ``cuda``/``cuda:N`` where CUDA is."""
    cuda = torch.cuda.device_count()
    try:
        device = torch.device(text)
        known = device.type == "cpu" or (
            device.type == "cuda" and (device.index or 0) < cuda
        )
    except RuntimeError:  # not a device name
        known = False
    if not known:
        raise argparse.ArgumentTypeError(
            f"expected cpu or cuda[:index] ({cuda} CUDA devices here), "
            f"got {text!r}"
        )
    return text


def _json_path(text: str) -> str:
    """argparse type: a file that can be written (checked now, written
    after the benchmark)."""
    path = Path(text)
    problem = None
    if path.exists() and not path.is_file():
        problem = "it is a folder" if path.is_dir() else "not a file"
    elif not path.parent.is_dir():
        problem = f"{str(path.parent)!r} is not an existing folder"
    else:
        try:
            if path.exists():
                open(path, "a").close()  # neither truncated nor changed
            tempfile.TemporaryFile(dir=path.parent).close()
        except OSError as error:
            problem = f"it cannot be written ({error.strerror})"
    if problem:
        raise argparse.ArgumentTypeError(
            f"expected a file in a writable folder, got {text!r}: {problem}"
        )
    return text


def write_json(path: str, report: dict) -> None:
    """Write ``report`` to ``path`` in one piece (a reader never sees half
    of it; a failure leaves an older file as it was)."""
    atomic_write(path, lambda f: json.dump(report, f, indent=1), text=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m feedback_lib.bench",
        description=__doc__.split("\n\n")[0],
    )
    defaults = BenchConfig()
    for name in (
        "d_model",
        "heads",
        "n_layers",
        "d_ff",
        "n_vocab",
        "seq_len",
        "batch",
        "gen_tokens",
        "repeats",
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=positive_int_argument,
            default=getattr(defaults, name),
        )
    parser.add_argument(
        "--device",
        type=_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
    )
    parser.add_argument(
        "--threads",
        type=positive_int_argument,
        default=None,
        help="torch.set_num_threads (default: torch's)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated name prefixes, e.g. 'feedback_lib,labml'",
    )
    parser.add_argument(
        "--no-generate",
        action="store_true",
        help="skip the generation timings",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure the peak training memory of the naive stack, "
        "the Stack and the fused loop",
    )
    parser.add_argument(
        "--memory-seq-len", type=positive_int_argument, default=512
    )
    parser.add_argument(
        "--memory-batch", type=positive_int_argument, default=4
    )
    parser.add_argument(
        "--json",
        type=_json_path,
        default=None,
        help="also write the results to this file",
    )
    parser.add_argument(
        "--memory-worker", default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.memory_worker:  # one measurement in this fresh process
        spec = json.loads(args.memory_worker)
        torch.set_num_threads(spec["threads"])
        print(
            measure_step_memory(
                spec["variant"], BenchConfig(**spec["config"])
            )
        )
        return
    try:
        config = BenchConfig(
            **{name: getattr(args, name) for name in asdict(defaults)}
        )
    except ValueError as error:  # heads must divide d_model
        parser.error(f"argument --heads: {error}")
    if (
        args.memory
        and not config.device.startswith("cuda")
        and not sys.platform.startswith("linux")
    ):
        parser.error(
            "argument --memory: the peak memory on a CPU is read from "
            "/proc (Linux only); expected --device cuda"
        )
    only = [p for p in (args.only or "").split(",") if p] or None
    try:
        found = contenders(config, only)
    except ValueError as error:
        parser.error(f"argument --only: {error}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(
        f"model: d_model {config.d_model}, {config.heads} heads, "
        f"{config.n_layers} layers, d_ff {config.d_ff}; training: batch "
        f"{config.batch} x {config.seq_len} tokens, Adam, best of "
        f"{config.repeats}; generation: {config.gen_tokens} tokens at "
        "batch 1, greedy"
    )
    results = measure(found, config, generate=not args.no_generate)
    print(format_table(results))
    report = {
        "machine": machine(),
        "config": asdict(config),
        "results": [asdict(r) for r in results],
    }
    if args.memory:
        mem_config = BenchConfig(
            **{
                **asdict(config),
                "seq_len": args.memory_seq_len,
                "batch": args.memory_batch,
            }
        )
        print(
            "\npeak training memory, forward + backward at seq_len "
            f"{mem_config.seq_len}, batch {mem_config.batch}:"
        )
        memory = {
            v: peak_training_memory(v, mem_config) for v in MEMORY_VARIANTS
        }
        for v, peak in memory.items():
            share = peak / memory["naive stack"]
            print(
                f"  {v:12s} {peak / 2**20:8.1f} MiB  ({share:.2f} of the "
                "naive stack)"
            )
        report["memory"] = {
            "seq_len": mem_config.seq_len,
            "batch": mem_config.batch,
            "peak_bytes": memory,
        }
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
