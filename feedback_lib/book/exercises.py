"""Checks for the build-it-yourself exercises (chapters 2 to 7 and 9).

Each chapter ends with an exercise in which the reader writes one piece of
the model from a skeleton (its signature and shapes): the four score terms
(chapter 2), one attention step with explicit loops (chapter 3), the
attention forward pass in PyTorch (chapter 4), the token loop with a
memory window (chapter 5), ``StackFunction`` (chapter 6), one step of the
shared key/value model (chapter 7) and a decoder that caches the memory
(chapter 9). The ``check_*`` function below it calls the reader's code on
a few random inputs of different sizes, compares every output with what
``feedback_lib`` computes on the same inputs, and returns a
:class:`Verdict`: correct, or the first problem found, naming the output,
the case, the expected shape and how far off it is.

``tests/test_exercises.py`` runs every check on the chapters' worked
solutions (they must pass) and on wrong answers (they must fail with the
right message).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from feedback_lib.book.randomize import randomize_parameters_
from feedback_lib.decoding import Decoder
from feedback_lib.model.attention import FeedbackAttention
from feedback_lib.model.feedback import (
    FeedbackTransformer,
    FeedbackTransformerKV,
)
from feedback_lib.model.layer import make_layer
from feedback_lib.model.lm import FeedbackLM
from feedback_lib.model.stack import Stack
from feedback_lib.reference.numpy_attention import (
    attention_weights_numpy,
    score_terms_numpy,
)

#: Largest difference accepted from feedback_lib in float64 (the checks
#: compute in float64, where a correct answer differs by rounding only).
TOLERANCE = 1e-8
#: The same in float32 (the decoder exercise uses a float32 model).
TOLERANCE_FLOAT32 = 1e-4


@dataclass
class Verdict:
    """What a check found: ``bool(verdict)`` is True when the code is
    correct; printing it (or leaving it as a cell's last value) explains.
    """

    name: str  # the function or class checked
    compared: str  # what was compared, e.g. "the terms A, B, C and D"
    cases: int  # random cases run
    problem: str | None = None  # the first problem found, with its case

    def __bool__(self) -> bool:
        return self.problem is None

    def __str__(self) -> str:
        if self.problem is None:
            return (
                f"✓ {self.name} is correct: {self.compared} agree with "
                f"feedback_lib on {self.cases} random cases."
            )
        return f"✗ {self.name} is not right yet:\n  {self.problem}"

    __repr__ = __str__


class Mismatch(Exception):
    """What :func:`compare` (or a check) found wrong in one case; it ends
    the check and becomes the verdict's problem."""


def _as_array(label: str, got: object, shape: tuple) -> np.ndarray:
    """``got`` as a float64 array, or a problem naming ``label``."""
    if isinstance(got, torch.Tensor):
        return got.detach().cpu().double().numpy()
    if isinstance(got, np.ndarray) and np.issubdtype(got.dtype, np.number):
        return got.astype(np.float64)
    raise Mismatch(
        f"{label} is {'None' if got is None else type(got).__name__}; "
        f"expected an array of shape {list(shape)}"
    )


def compare(
    label: str,
    got: object,
    expected: np.ndarray | torch.Tensor,
    *,
    tolerance: float = TOLERANCE,
    steps: bool = False,
) -> None:
    """Raise :class:`Mismatch` unless ``got`` has ``expected``'s shape and
    values. With ``steps``, axis 0 is time and the problem names the
    first step that is off."""
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().cpu().double().numpy()
    got = _as_array(label, got, expected.shape)
    if got.shape != expected.shape:
        raise Mismatch(
            f"{label} has shape {list(got.shape)}, expected "
            f"{list(expected.shape)}"
        )
    if not np.isfinite(got).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(got))[0])
        raise Mismatch(f"{label} has a NaN or infinite entry at {where}")
    error = np.abs(got - expected)
    if error.size == 0 or error.max() <= tolerance:
        return
    if steps:
        first = int(
            np.argmax(error.reshape(len(error), -1).max(1) > tolerance)
        )
        label = f"{label} at step {first}"
        got, expected, error = got[first], expected[first], error[first]
    where = np.unravel_index(np.argmax(error), error.shape)
    raise Mismatch(
        f"{label} is off by up to {error[where]:.3g} at index "
        f"{tuple(int(i) for i in where)} (got {got[where]:.6g}, expected "
        f"{expected[where]:.6g}; tolerance {tolerance:g})"
    )


def _call(name: str, function: Callable, *args):
    """``function(*args)``; an exception becomes a problem naming it."""
    try:
        return function(*args)
    except NotImplementedError:
        raise Mismatch(
            f"{name} is not written yet: replace `raise "
            "NotImplementedError` with your code"
        ) from None
    except Mismatch:
        raise
    except Exception as error:  # the reader's code: report anything
        raise Mismatch(
            f"{name} raised {type(error).__name__}: {error}"
        ) from None


def _run(
    name: str,
    compared: str,
    cases: list[dict],
    run_case: Callable[[dict], None],
) -> Verdict:
    """Run ``run_case`` on every case; the first problem ends the check
    and is reported with the case's sizes."""
    verdict = Verdict(name, compared, len(cases))
    for case in cases:
        try:
            run_case(case)
        except Mismatch as problem:
            sizes = ", ".join(
                f"{key} {value}"
                for key, value in case.items()
                if key != "seed"
            )
            verdict.problem = f"{problem} (case: {sizes})"
            break
    return verdict


def _name(code: object, default: str) -> str:
    """The reader's name for ``code`` (a function or class)."""
    return getattr(code, "__name__", default)


def _output_pair(name: str, result: object, what: str) -> tuple:
    """``result`` as a pair, or a problem saying what was expected."""
    if not isinstance(result, tuple) or len(result) != 2:
        raise Mismatch(f"{name} must return a pair {what}")
    return result


# Chapter 2: the four score terms.


def check_score_terms(score_terms: Callable) -> Verdict:
    """Check ``score_terms(q, k, u_q, u_k_table, s_table)`` (chapter 2).

    Inputs: ``q [batch, heads, d_k]``, ``k [seq_len, batch, heads, d_k]``,
    ``u_q [heads, d_k]`` and the whole tables ``u_k_table [P, heads,
    d_k]``, ``s_table [P, heads]`` (row ``P - d`` is distance ``d``). It
    must return a dict of the terms ``"A"``, ``"B"``, ``"C"``, ``"D"``,
    each ``[seq_len, batch, heads]``, as
    :func:`~feedback_lib.score_terms_numpy` computes them from the tables
    cut to the memory.
    """
    name = _name(score_terms, "score_terms")
    cases = [
        dict(batch=2, heads=3, d_k=4, seq_len=5, P=8, seed=0),
        dict(batch=1, heads=2, d_k=3, seq_len=1, P=4, seed=1),
        dict(batch=3, heads=4, d_k=2, seq_len=7, P=7, seed=2),
    ]

    def run_case(c: dict) -> None:
        rng = np.random.default_rng(c["seed"])
        b, h, d, n, p = (
            c[k] for k in ("batch", "heads", "d_k", "seq_len", "P")
        )
        q, k = rng.normal(size=(b, h, d)), rng.normal(size=(n, b, h, d))
        u_q, u_k = rng.normal(size=(h, d)), rng.normal(size=(p, h, d))
        s = rng.normal(size=(p, h))
        expected = score_terms_numpy(q, k, u_q, u_k[-n:], s[-n:])
        got = _call(name, score_terms, q, k, u_q, u_k, s)
        if not isinstance(got, Mapping):
            raise Mismatch(
                f"{name} must return a dict with keys 'A', 'B', 'C' "
                f"and 'D', got {type(got).__name__}"
            )
        for term in "ABCD":
            if term not in got:
                raise Mismatch(f"the result has no term {term!r}")
            compare(f"term {term}", got[term], expected[term])

    return _run(name, "the terms A, B, C and D", cases, run_case)


# Chapter 3: one attention step, every index explicit.


#: The case sizes of the checks of chapters 3 and 4 (one with a single
#: memory entry).
ATTENTION_CASES = [
    dict(batch=2, d_model=8, heads=2, seq_len=3, seed=0),
    dict(batch=1, d_model=12, heads=3, seq_len=1, seed=1),
    dict(batch=3, d_model=16, heads=4, seq_len=6, seed=2),
]


def _attention_module(
    heads: int, d_model: int, seed: int
) -> FeedbackAttention:
    """A float64 FeedbackAttention with random parameters, no dropout."""
    module = FeedbackAttention(heads, d_model, 0.0)
    return randomize_parameters_(module, seed=seed).double().eval()


def check_attention_step(attention_step: Callable) -> Verdict:
    """Check ``attention_step(w, x, mem) -> (out, a)`` (chapter 3).

    ``w`` from :func:`~feedback_lib.attention_weights_numpy`, ``x [batch,
    d_model]``, ``mem [seq_len, batch, d_model]`` (numpy, float64). It
    must return the output ``[batch, d_model]`` and the attention weights
    ``[seq_len, batch, heads]`` of :class:`~feedback_lib.FeedbackAttention`.
    """
    name = _name(attention_step, "attention_step")
    cases = ATTENTION_CASES

    def run_case(c: dict) -> None:
        module = _attention_module(c["heads"], c["d_model"], c["seed"])
        rng = np.random.default_rng(c["seed"])
        x = rng.normal(size=(c["batch"], c["d_model"]))
        mem = rng.normal(size=(c["seq_len"], c["batch"], c["d_model"]))
        with torch.no_grad():
            m = torch.from_numpy(mem)
            out, a = module(torch.from_numpy(x), m, m, need_weights=True)
        w = attention_weights_numpy(module)
        got = _call(name, attention_step, w, x, mem)
        got_out, got_a = _output_pair(name, got, "(out, a)")
        compare("the weights a", got_a, a)
        compare("the output out", got_out, out)

    return _run(name, "the output and the weights", cases, run_case)


# Chapter 4: the forward pass in PyTorch.


def check_attention_forward(forward: Callable) -> Verdict:
    """Check ``forward(attn, query, key, value) -> [batch, d_model]``
    (chapter 4), written with torch operations on ``attn``'s parameters.

    The output must equal ``attn(query, key, value)``, and so must the
    gradients it gives the inputs and every parameter.
    """
    name = _name(forward, "forward")
    cases = ATTENTION_CASES

    def gradients(module, inputs, output, weight) -> dict:
        names = ["query", "key", "value"] + [
            name for name, _ in module.named_parameters()
        ]
        tensors = list(inputs) + list(module.parameters())
        grads = torch.autograd.grad(
            (output * weight).sum(), tensors, allow_unused=True
        )
        return dict(zip(names, grads))

    def run_case(c: dict) -> None:
        module = _attention_module(c["heads"], c["d_model"], c["seed"])
        gen = torch.Generator().manual_seed(c["seed"])

        def inputs():
            shapes = [(c["batch"], c["d_model"])] + [
                (c["seq_len"], c["batch"], c["d_model"])
            ] * 2
            return [
                torch.randn(
                    s, generator=gen, dtype=torch.float64
                ).requires_grad_()
                for s in shapes
            ]

        ours = inputs()
        theirs = [t.detach().clone().requires_grad_() for t in ours]
        expected = module(*ours)
        weight = torch.randn(
            expected.shape, generator=gen, dtype=torch.float64
        )
        want = gradients(module, ours, expected, weight)
        got = _call(name, forward, module, *theirs)
        compare("the output", got, expected)
        if not got.requires_grad:
            raise Mismatch(
                "the output does not require grad: compute it with torch "
                "operations on the module's parameters (no .detach(), "
                ".numpy() or torch.no_grad())"
            )
        have = gradients(module, theirs, got, weight)
        for part, grad in want.items():
            if have[part] is None:
                raise Mismatch(f"{part} gets no gradient from the output")
            compare(f"the gradient of {part}", have[part], grad)

    return _run(
        name,
        "the output and the gradients of the inputs and parameters",
        cases,
        run_case,
    )


# Chapter 5: the token loop with a memory window.


def _transformer(c: dict, shared_kv: bool) -> FeedbackTransformer:
    """A float64 feedback transformer with random parameters."""
    layer = make_layer(
        c["d_model"],
        c["heads"],
        2 * c["d_model"],
        0.0,
        is_kv_precomputed=shared_kv,
    )
    if shared_kv:
        model = FeedbackTransformerKV(
            layer, c["n_layers"], c["d_model"], c["heads"]
        )
    else:
        model = FeedbackTransformer(layer, c["n_layers"])
    return randomize_parameters_(model, seed=c["seed"]).double().eval()


def _sequence(c: dict) -> torch.Tensor:
    """A random input ``[seq_len, batch, d_model]`` (float64)."""
    gen = torch.Generator().manual_seed(100 + c["seed"])
    shape = (c["seq_len"], c["batch"], c["d_model"])
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def check_token_loop(token_loop: Callable) -> Verdict:
    """Check ``token_loop(model, x_seq, mem_len) -> (out, memory)``
    (chapter 5).

    ``model``: a :class:`~feedback_lib.FeedbackTransformer` built without
    a window; ``x_seq [seq_len, batch, d_model]``; each step must attend
    to at most the last ``mem_len`` memory vectors (None: all). Returns
    the normalised outputs and every memory vector, both ``[seq_len,
    batch, d_model]``, as the model built with ``mem_len`` computes them.
    """
    name = _name(token_loop, "token_loop")
    cases = [
        dict(
            seq_len=6,
            batch=2,
            d_model=8,
            heads=2,
            n_layers=2,
            mem_len=3,
            seed=0,
        ),
        dict(
            seq_len=5,
            batch=1,
            d_model=12,
            heads=3,
            n_layers=3,
            mem_len=None,
            seed=1,
        ),
        dict(
            seq_len=7,
            batch=3,
            d_model=8,
            heads=2,
            n_layers=1,
            mem_len=1,
            seed=2,
        ),
    ]

    def run_case(c: dict) -> None:
        model, x_seq = _transformer(c, shared_kv=False), _sequence(c)
        windowed = FeedbackTransformer(
            model.layers[0], c["n_layers"], mem_len=c["mem_len"]
        ).double()
        windowed.load_state_dict(model.state_dict())
        with torch.no_grad():
            expected, memory = windowed.eval()(x_seq, return_memory=True)
            got = _call(name, token_loop, model, x_seq, c["mem_len"])
        got_out, got_memory = _output_pair(name, got, "(out, memory)")
        compare("out", got_out, expected, steps=True)
        kept = memory.tensors[0]  # the last mem_len steps
        got_memory = _as_array("memory", got_memory, x_seq.shape)
        if got_memory.shape != tuple(x_seq.shape):
            raise Mismatch(
                f"memory has shape {list(got_memory.shape)}, expected "
                f"{list(x_seq.shape)} (one vector per step)"
            )
        compare(
            "the kept memory", got_memory[-len(kept) :], kept, steps=True
        )

    return _run(name, "the outputs and the memory", cases, run_case)


# Chapter 6: the autograd function of a read.


def check_stack_function(function: type) -> Verdict:
    """Check a ``torch.autograd.Function`` with ``StackFunction``'s
    interface (chapter 6): ``apply(memory, gradient, last, previous,
    start, end)`` returns rows ``[start, end)`` of ``memory`` as a view,
    and its backward gives each appended block its gradient.

    A :class:`~feedback_lib.Stack` that reads through ``function`` must
    return the values and gradients of the naive store, without copying,
    and a second backward pass over the same graph must give the same
    gradients.
    """
    if not (
        isinstance(function, type)
        and issubclass(function, torch.autograd.Function)
    ):
        return Verdict(
            "the function",
            "reads and gradients",
            0,
            "pass the class itself, a subclass of torch.autograd.Function, "
            f"got {type(function).__name__}",
        )

    class Reading(Stack):
        pass

    Reading.function = function
    name = function.__name__
    cases = [
        dict(steps=5, window=2, prefix=0, seed=0),
        dict(steps=6, window=None, prefix=3, seed=1),
        dict(steps=4, window=1, prefix=2, seed=2),
    ]

    def run(store, c: dict, inputs: list[torch.Tensor]) -> list:
        """Append the prefix, then one row per step with a read after
        each; returns the reads."""
        reads = []
        blocks = ([inputs[0]] if c["prefix"] else []) + list(
            inputs[1].split(1)
        )
        for block in blocks:
            store.append(block * 1.0)  # a block with a graph, as in a model
            start = 0
            if c["window"] is not None:
                start = max(0, len(store) - c["window"])
            reads.append(store.get(start))
        return reads

    def run_case(c: dict) -> None:
        gen = torch.Generator().manual_seed(c["seed"])
        prefix = torch.randn(
            max(c["prefix"], 1), 3, generator=gen, dtype=torch.float64
        )
        rows = torch.randn(
            c["steps"], 3, generator=gen, dtype=torch.float64
        )
        capacity = c["prefix"] + c["steps"]
        ours = [prefix.requires_grad_(), rows.requires_grad_()]
        expected = run(Stack(capacity), c, ours)
        weights = [
            torch.randn(r.shape, generator=gen, dtype=torch.float64)
            for r in expected
        ]
        loss = sum((r * w).sum() for r, w in zip(expected, weights))
        want = torch.autograd.grad(loss, ours, allow_unused=True)

        theirs = [t.detach().clone().requires_grad_() for t in ours]
        store = Reading(capacity)
        got = _call(f"{name}.forward", run, store, c, theirs)
        for i, (read, reference) in enumerate(zip(got, expected)):
            compare(f"read {i}", read, reference)
            if read.untyped_storage().data_ptr() != (
                store.memory.untyped_storage().data_ptr()
            ):
                raise Mismatch(
                    f"read {i} is a copy: return a view of the buffer "
                    "(memory[start:end]), not a new tensor"
                )
        loss = sum((r * w).sum() for r, w in zip(got, weights))
        for attempt in ("", "a second backward pass: "):
            have = _call(
                f"{name}.backward",
                lambda: torch.autograd.grad(
                    loss, theirs, retain_graph=True, allow_unused=True
                ),
            )
            for label, g, w in zip(("prefix", "rows"), have, want):
                if label == "prefix" and not c["prefix"]:
                    continue
                if g is None:
                    raise Mismatch(
                        f"{attempt}no gradient reaches the {label}: "
                        "backward must return the gradient of `last`"
                    )
                compare(f"{attempt}the gradient of the {label}", g, w)

    return _run(name, "the reads and the gradients", cases, run_case)


# Chapter 7: one step of the shared key/value model.


def check_kv_step(kv_step: Callable) -> Verdict:
    """Check ``kv_step(model, x, keys, values) -> (top, key, value)``
    (chapter 7).

    ``model``: a :class:`~feedback_lib.FeedbackTransformerKV`; ``x [batch,
    d_model]``: the step's input; ``keys``, ``values``: the stored keys and
    values of the earlier steps, ``[t, batch, heads, d_k]`` (None at the
    first step). Returns the top layer's output ``[batch, d_model]``
    (before the final norm) and the step's key and value, ``[batch,
    heads, d_k]`` each, projected once from its memory vector.
    """
    name = _name(kv_step, "kv_step")
    cases = [
        dict(seq_len=5, batch=2, d_model=8, heads=2, n_layers=2, seed=0),
        dict(seq_len=4, batch=1, d_model=12, heads=3, n_layers=3, seed=1),
        dict(seq_len=6, batch=3, d_model=8, heads=4, n_layers=1, seed=2),
    ]

    def run_case(c: dict) -> None:
        model, x_seq = _transformer(c, shared_kv=True), _sequence(c)
        with torch.no_grad():
            expected, memory = model(x_seq, return_memory=True)
            keys = values = None
            for t, x in enumerate(x_seq):
                got = _call(name, kv_step, model, x, keys, values)
                if not isinstance(got, tuple) or len(got) != 3:
                    raise Mismatch(f"{name} must return (top, key, value)")
                top, key, value = got
                compare(f"top at step {t}", model.norm(top), expected[t])
                compare(f"key at step {t}", key, memory.tensors[0][t])
                compare(f"value at step {t}", value, memory.tensors[1][t])
                keys = (
                    key[None]
                    if keys is None
                    else torch.cat([keys, key[None]])
                )
                values = (
                    value[None]
                    if values is None
                    else torch.cat([values, value[None]])
                )

    return _run(name, "the outputs, keys and values", cases, run_case)


# Chapter 9: a decoder that caches the memory.


def check_cached_decoder(decoder_class: type) -> Verdict:
    """Check a :class:`~feedback_lib.decoding.Decoder` subclass built as
    ``decoder_class(lm, batch, capacity)`` for a
    :class:`~feedback_lib.FeedbackLM` (chapter 9).

    Its ``step`` must return the logits of the last token read, equal to
    those of the model run on the whole text so far, and each call may
    run the transformer on the new tokens only.
    """
    name = getattr(decoder_class, "__name__", type(decoder_class).__name__)
    cases = [
        dict(batch=2, prompt=4, new=5, n_layers=2, seed=0),
        dict(batch=1, prompt=1, new=6, n_layers=1, seed=1),
        dict(batch=3, prompt=7, new=3, n_layers=3, seed=2),
    ]

    def run_case(c: dict) -> None:
        torch.manual_seed(c["seed"])
        lm = FeedbackLM(
            11,
            d_model=16,
            heads=2,
            n_layers=c["n_layers"],
            d_ff=32,
            shared_kv=False,
        )
        lm = randomize_parameters_(lm, seed=c["seed"]).eval()
        gen = torch.Generator().manual_seed(c["seed"])
        text = torch.randint(
            11, (c["batch"], c["prompt"] + c["new"]), generator=gen
        )
        with torch.no_grad():
            expected = lm(text)  # [batch, seq, n_vocab]
        decoder = _call(name, decoder_class, lm, c["batch"], text.shape[1])
        if not isinstance(decoder, Decoder):
            raise Mismatch(
                f"{name} must subclass feedback_lib.decoding.Decoder"
            )
        read: list[int] = []
        hook = lm.transformer.register_forward_pre_hook(
            lambda module, args: read.append(args[0].shape[0])
        )
        try:
            end = c["prompt"]
            pieces = [text[:, :end]] + list(text[:, end:].split(1, dim=1))
            for call, tokens in enumerate(pieces):
                got = _call(f"{name}.read", decoder.step, tokens)
                end_ = sum(p.shape[1] for p in pieces[: call + 1])
                compare(
                    f"the logits after call {call} ({end_} tokens read)",
                    got,
                    expected[:, end_ - 1],
                    tolerance=TOLERANCE_FLOAT32,
                )
                if sum(read) > end_:
                    raise Mismatch(
                        f"call {call} ran the transformer on {read[-1]} "
                        f"tokens, but only {tokens.shape[1]} of them "
                        "new: keep the memory (return_memory=True) and "
                        "pass it to the next call"
                    )
        finally:
            hook.remove()

    return _run(name, "the logits of every call", cases, run_case)


__all__ = [
    "Mismatch",
    "Verdict",
    "check_attention_forward",
    "check_attention_step",
    "check_cached_decoder",
    "check_kv_step",
    "check_score_terms",
    "check_stack_function",
    "check_token_loop",
    "compare",
]
