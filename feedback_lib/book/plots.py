"""Figures of the book, drawn with matplotlib (chapters 1 to 11).

Every function draws with pyplot and returns the figure, so a notebook shows
it once, inline. Importing this module applies the book's style
(:mod:`feedback_lib.book.style`): every figure is at most
``style.MAX_WIDTH_IN`` wide, with no text below ``style.MIN_FONT_PT``, so it
reads on a phone; panels are stacked rather than put side by side.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullFormatter

from feedback_lib.book import style
from feedback_lib.book.information_flow import KINDS, ancestors, flow_edges
from feedback_lib.checks import check_positive_int, is_integer

style.use()
WIDTH = style.MAX_WIDTH_IN

#: Colours of the four score terms and their sum (chapter 2).
TERM_COLORS = {
    "A": "tab:blue",
    "B": "tab:orange",
    "C": "tab:green",
    "D": "tab:red",
    "sum": "black",
}
TERM_LABELS = {
    "A": r"A: $Q^\top K_j$",
    "B": r"B: $Q^\top U^K_j$",
    "C": r"C: ${U^Q}^\top K_j$",
    "D": r"D: $S_j$",
    "sum": "A + B + C + D",
}
#: Line styles of the batch elements overlaid by :func:`plot_score_terms`
# (at most four).
_BATCH_STYLES = [
    dict(lw=3.2, ls="-", alpha=0.45),
    dict(lw=1.6, ls="--", marker="o", ms=3),
    dict(lw=1.2, ls=":", marker="x", ms=4),
    dict(lw=1.0, ls="-.", marker="^", ms=3),
]


def draw_information_flow(
    kind: str,
    n_layers: int,
    n_steps: int,
    target: tuple[int, int] | None = None,
    ax: plt.Axes | None = None,
) -> Figure:
    """Draw the computation graph of ``kind`` ("transformer" or "feedback"),
    chapter 1.

    Nodes are steps (x) by rows (y: the embedding, the layers and, for the
    feedback graph, the memory). The ``target`` node (default: layer 1 at
    the last step) is outlined, the edges into it are drawn, and every node
    that can influence it is filled.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_positive_int("n_layers", n_layers)
    check_positive_int("n_steps", n_steps)
    target = (1, n_steps - 1) if target is None else tuple(target)
    if not (1 <= target[0] <= n_layers and 0 <= target[1] < n_steps):
        raise ValueError(
            f"target must be a layer node (row in 1..{n_layers}, step in "
            f"0..{n_steps - 1}), got {target}"
        )
    if ax is None:
        _, ax = plt.subplots(figsize=(WIDTH, 0.5 * (n_layers + 2) + 1.2))
    edges = flow_edges(kind, n_layers, n_steps)
    seen = ancestors(kind, n_layers, n_steps, target)
    rows = n_layers + (2 if kind == "feedback" else 1)
    memory_row = n_layers + 1
    for source, dest in edges:
        if dest == target:
            ax.annotate(
                "",
                xy=(dest[1], dest[0]),
                xytext=(source[1], source[0]),
                arrowprops=dict(
                    arrowstyle="->",
                    color="tab:red",
                    lw=1.4,
                    shrinkA=9,
                    shrinkB=9,
                    connectionstyle="arc3,rad=0.15"
                    if source[1] != dest[1]
                    else "arc3",
                ),
            )
        else:
            ax.plot(
                [source[1], dest[1]],
                [source[0], dest[0]],
                color="0.85",
                lw=0.6,
                zorder=0,
            )
    for row in range(rows):
        for step in range(n_steps):
            node = (row, step)
            filled = node in seen
            marker = (
                "s" if row == memory_row and kind == "feedback" else "o"
            )
            ax.scatter(
                step,
                row,
                s=260,
                marker=marker,
                zorder=2,
                color="tab:blue" if filled else "white",
                edgecolors="tab:red" if node == target else "0.3",
                linewidths=2.5 if node == target else 1.0,
            )
    labels = ["embedding"] + [
        f"layer {layer}" for layer in range(1, n_layers + 1)
    ]
    if kind == "feedback":
        labels.append("memory $m_t$")
    ax.set_yticks(range(rows), labels)
    ax.set_xticks(range(n_steps), [f"t={step}" for step in range(n_steps)])
    ax.set_xlim(-0.6, n_steps - 0.4)
    ax.set_ylim(-0.6, rows - 0.4)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    name = (
        "Transformer" if kind == "transformer" else "Feedback Transformer"
    )
    ax.set_title(
        f"{name}:\n"
        f"what can reach layer {target[0]} at t={target[1]} (filled)"
    )
    return ax.figure


def plot_score_terms(
    terms: dict[str, np.ndarray],
    *,
    batch: int | Sequence[int] = 0,
    head: int = 0,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Plot the score terms A, B, C, D and their sum across the memory for
    one head (chapters 2 and 3).

    ``terms`` is what :func:`~feedback_lib.score_terms_numpy` returns (each
    ``[seq_len, batch, heads]``). The x axis is how many steps back the
    memory entry is (1 = the step just before the query), with the oldest
    entry on the left. ``batch`` is one batch index or a sequence of them:
    each is drawn as its own line style in every panel, so one sees which
    terms coincide for which batch elements (for instance two elements that
    share a memory have the same C). ``labels`` name the batch elements in
    the legend (default ``"batch b"``). Each panel has its own y scale.
    """
    missing = {"A", "B", "C", "D"} - set(terms)
    if missing:
        raise ValueError(
            "terms must have the keys A, B, C and D (from "
            f"score_terms_numpy), missing {sorted(missing)}"
        )
    shapes = {name: np.shape(terms[name]) for name in "ABCD"}
    if len(set(shapes.values())) > 1 or len(shapes["A"]) != 3:
        raise ValueError(
            "every term must be [seq_len, batch, heads] with the same "
            f"shape, got {shapes}"
        )
    seq_len, n_batch, heads = shapes["A"]
    batches = (
        [batch]
        if isinstance(batch, (int, np.integer))
        and not isinstance(batch, bool)
        else list(batch)
    )
    if not batches or len(batches) > len(_BATCH_STYLES):
        raise ValueError(
            "batch must be an index or a sequence of 1 to "
            f"{len(_BATCH_STYLES)} indices, got {batch!r}"
        )
    if not (
        all(
            isinstance(b, (int, np.integer))
            and not isinstance(b, bool)
            and 0 <= b < n_batch
            for b in batches
        )
        and 0 <= head < heads
    ):
        raise ValueError(
            f"batch must be in 0..{n_batch - 1} and head in "
            f"0..{heads - 1}, got batch={batch}, head={head}"
        )
    labels = (
        [f"batch {b}" for b in batches] if labels is None else list(labels)
    )
    if len(labels) != len(batches):
        raise ValueError(
            f"labels must name each of the {len(batches)} batch elements, "
            f"got {len(labels)} labels"
        )
    back = np.arange(seq_len, 0, -1)  # entry j is seq_len - j steps back
    fig, grid = plt.subplots(3, 2, figsize=(WIDTH, 6.6), sharex=True)
    axes = grid.ravel()
    for ax, name in zip(axes, ["A", "B", "C", "D", "sum"]):
        for b, label, line_style in zip(batches, labels, _BATCH_STYLES):
            series = {
                n: np.asarray(terms[n], dtype=np.float64)[:, b, head]
                for n in "ABCD"
            }
            values = sum(series.values()) if name == "sum" else series[name]
            ax.plot(
                back,
                values,
                color=TERM_COLORS[name],
                label=label,
                **line_style,
            )
        ax.axhline(0, color="0.8", lw=0.8, zorder=0)
        ax.set_title(TERM_LABELS[name])
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    # shared x axis: oldest entry left, newest right
    ax.set_xlim(seq_len + 0.5, 0.5)
    for ax in grid[-1]:
        ax.set_xlabel("steps back")
        ax.tick_params(labelbottom=True)
    for ax in grid[:, 0]:
        ax.set_ylabel(f"score (head {head})")
    legend_ax = axes[5]
    legend_ax.axis("off")
    if len(batches) > 1:
        handles = [
            Line2D([], [], color="0.3", label=label, **style)
            for label, style in zip(labels, _BATCH_STYLES)
        ]
        legend_ax.legend(handles=handles, loc="center", frameon=False)
    fig.tight_layout()
    return fig


def _as_float64(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """A tensor or array as a float64 numpy array (detached, on the CPU)."""
    return np.asarray(
        values.detach().cpu()
        if isinstance(values, torch.Tensor)
        else values,
        dtype=np.float64,
    )


def check_maps(
    maps: torch.Tensor | np.ndarray, step: int, head: int, batch: int
) -> np.ndarray:
    """``maps`` as float64 numpy after checking it is ``[batch, heads,
    steps, steps]`` and that ``step``, ``head`` and ``batch`` index into it;
    raises a clear error otherwise."""
    maps = _as_float64(maps)
    if maps.ndim != 4 or maps.shape[2] != maps.shape[3]:
        raise ValueError(
            "maps must be [batch, heads, steps, steps] (from "
            f"feedback_lib.attention_maps), got shape {tuple(maps.shape)}"
        )
    n_batch, heads, steps, _ = maps.shape
    if not (
        1 <= step < steps and 0 <= head < heads and 0 <= batch < n_batch
    ):
        raise ValueError(
            f"need step in 1..{steps - 1}, head in 0..{heads - 1}, batch "
            f"in 0..{n_batch - 1}; got step={step}, head={head}, "
            f"batch={batch}"
        )
    return maps


def step_ticks(
    labels: Sequence[str] | None, steps: int
) -> list[str] | None:
    """The tick labels ``"i label"`` of ``steps`` steps named by
    ``labels`` (None without labels); raises a clear error unless
    ``labels`` is None or one string per step."""
    if labels is None:
        return None
    if isinstance(labels, str) or len(labels) != steps:
        raise ValueError(
            f"labels must be a sequence of {steps} strings (one per step), "
            f"got {labels!r}"
        )
    return [f"{i} {label}" for i, label in enumerate(labels)]


def plot_attention_step(
    maps: torch.Tensor | np.ndarray,
    step: int,
    head: int,
    *,
    batch: int = 0,
    labels: Sequence[str] | None = None,
) -> Figure:
    """The attention of one head as a heatmap, with one query step picked
    out (chapter 4).

    ``maps [batch, heads, steps, steps]`` from
    :func:`~feedback_lib.attention_maps`: row ``t`` holds the weights of
    query ``t`` over the memory entries ``0..t-1`` (NaN elsewhere, drawn
    grey). Top: the whole map of ``head`` with row ``step`` outlined.
    Below: that row as bars, one per memory entry. ``labels`` (one string
    per step, e.g. the tokens) are added to the step numbers on the axes.
    """
    maps = check_maps(maps, step, head, batch)
    steps = maps.shape[2]
    ticks = step_ticks(labels, steps)
    grid = np.ma.masked_invalid(maps[batch, head])
    fig, (left, right) = plt.subplots(
        2, 1, figsize=(WIDTH, 8), gridspec_kw={"height_ratios": [1.4, 1]}
    )
    left.set_facecolor("0.88")  # no memory entry there (j >= t)
    image = left.imshow(grid, cmap="viridis", vmin=0, vmax=1)
    left.add_patch(
        plt.Rectangle(
            (-0.5, step - 0.5),
            steps,
            1,
            fill=False,
            edgecolor="tab:red",
            lw=2,
        )
    )
    left.set_xlabel("memory entry j (a past step)")
    left.set_ylabel("query step t")
    left.set_title(f"head {head}: attention of every step")
    fig.colorbar(image, ax=left, fraction=0.046, label="weight")
    row = maps[batch, head, step, :step]
    right.bar(np.arange(step), row, color="tab:blue")
    right.set_xlim(-0.5, step - 0.5)  # only the entries in the memory
    right.set_ylim(0, 1)
    right.set_xlabel("memory entry j")
    right.set_ylabel("attention weight")
    right.set_title(
        f"head {head}, step t={step}: weights over "
        f"$m_0 \\ldots m_{{{step - 1}}}$\n(sum {row.sum():.3f})"
    )
    if ticks is None:
        for axis in (left.xaxis, left.yaxis, right.xaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
    else:
        left.set_xticks(range(steps), ticks, rotation=90)
        left.set_yticks(range(steps), ticks)
        right.set_xticks(range(step), ticks[:step], rotation=90)
    fig.tight_layout()
    return fig


def plot_attention_heads(
    maps: torch.Tensor | np.ndarray,
    *,
    batch: int = 0,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Every head's attention map side by side, two to a row
    (chapter 4).

    ``maps [batch, heads, steps, steps]`` from
    :func:`~feedback_lib.attention_maps`, drawn as in
    :func:`plot_attention_step` (row ``t`` is query step ``t``, grey where
    no memory entry exists yet), for sequence ``batch``; ``labels`` (one
    string per step) are added to the step numbers on the axes.
    """
    maps = check_maps(maps, 1, 0, batch)
    heads, steps = maps.shape[1], maps.shape[2]
    ticks = step_ticks(labels, steps) or [str(i) for i in range(steps)]
    rows = (heads + 1) // 2
    fig, axes = plt.subplots(
        rows,
        2,
        figsize=(WIDTH, 2.9 * rows),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    for head, ax in enumerate(axes.flat):
        if head >= heads:
            ax.set_visible(False)
            continue
        ax.set_facecolor("0.88")  # no memory entry there (j >= t)
        image = ax.imshow(
            np.ma.masked_invalid(maps[batch, head]),
            cmap="viridis",
            vmin=0,
            vmax=1,
        )
        ax.set_title(f"head {head}")
        ax.set_xticks(range(steps), ticks, rotation=90)
        ax.set_yticks(range(steps), ticks)
        if head % 2 == 0:
            ax.set_ylabel("query step t")
        if head >= heads - 2:
            ax.set_xlabel("memory entry j")
    fig.colorbar(image, ax=axes, fraction=0.03, label="attention weight")
    return fig


def plot_layer_weights(
    weights: torch.Tensor | np.ndarray,
    *,
    labels: tuple[str, str] = ("initial", "trained"),
    others: torch.Tensor | np.ndarray | None = None,
) -> Figure:
    """Bar chart of ``softmax(weights)``: how much each row contributes to
    the memory (chapter 5).

    ``weights [n_layers + 1]`` are the logits
    (``FeedbackTransformer.weights``); ``others``, if given, is a second set
    of logits of the same size drawn beside the first, and ``labels`` name
    the two. Each bar is labelled with its share; a dashed line marks the
    uniform share ``1 / (n_layers + 1)`` that the initial logits (all ones)
    give.
    """
    if (
        isinstance(labels, str)
        or len(labels) != 2
        or not all(isinstance(label, str) for label in labels)
    ):
        raise ValueError(
            "labels must be two strings (for weights and others), got "
            f"{labels!r}"
        )
    sets = [weights] if others is None else [weights, others]
    probs = []
    for logits in sets:
        logits = torch.from_numpy(_as_float64(logits))
        if logits.ndim != 1 or logits.numel() < 2:
            raise ValueError(
                "weights must be a 1-d tensor [n_layers + 1], got shape "
                f"{tuple(logits.shape)}"
            )
        probs.append(torch.softmax(logits, 0).numpy())
    if len({p.size for p in probs}) > 1:
        raise ValueError(
            "weights and others must have the same size, got "
            f"{probs[0].size} and {probs[1].size}"
        )
    n = probs[0].size
    names = ["embedding"] + [f"layer {layer}" for layer in range(1, n)]
    fig, ax = plt.subplots(figsize=(WIDTH, 3.4))
    width = 0.8 / len(probs)
    handles = []
    for i, p in enumerate(probs):
        bars = ax.bar(
            np.arange(n) + (i - (len(probs) - 1) / 2) * width,
            p,
            width,
            label=labels[i] if len(probs) > 1 else None,
        )
        ax.bar_label(bars, fmt="%.3f")
        handles += [bars] if len(probs) > 1 else []
    handles.append(
        ax.axhline(1 / n, color="0.4", ls="--", lw=1, label="uniform")
    )
    # room for the bar labels and the legend
    ax.set_ylim(0, max(p.max() for p in probs) * 1.4)
    ax.set_xticks(range(n), names)
    ax.set_ylabel("share of the memory vector")
    ax.set_title(r"memory weights $\mathrm{softmax}(w)_l$")
    ax.legend(handles=handles, loc="upper center", ncol=3)
    fig.tight_layout()
    return fig


def plot_scaling(
    seq_lens: Sequence[int],
    seconds: dict[str, Sequence[float]],
    peak_bytes: dict[str, Sequence[int]],
) -> Figure:
    """Time and peak memory of a training pass against the sequence length
    (chapter 6).

    ``seconds`` and ``peak_bytes`` map a variant's name to one value per
    entry of ``seq_lens``, as :func:`feedback_lib.bench.time_scaling` and
    :func:`~feedback_lib.bench.memory_scaling` return them. Both axes are
    logarithmic, so costs that grow like ``T`` and like ``T^2`` have slopes
    1 and 2.
    """
    for name, measured in (
        ("seconds", seconds),
        ("peak_bytes", peak_bytes),
    ):
        if not measured or any(
            len(v) != len(seq_lens) for v in measured.values()
        ):
            raise ValueError(
                f"{name} must map each variant to {len(seq_lens)} values, "
                "one per sequence length"
            )
    fig, (ax_time, ax_mem) = plt.subplots(
        2, 1, figsize=(WIDTH, 6.4), sharex=True
    )
    for name, values in seconds.items():
        ax_time.plot(seq_lens, values, marker="o", label=name)
    for name, values in peak_bytes.items():
        ax_mem.plot(
            seq_lens, [p / 2**20 for p in values], marker="o", label=name
        )
    for ax, ylabel in (
        (ax_time, "seconds\n(forward + backward)"),
        (ax_mem, "peak memory (MiB)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_xticks(list(seq_lens), [str(n) for n in seq_lens])
        ax.grid(alpha=0.3, which="both")
    ax_mem.set_xlabel("sequence length T")
    ax_mem.legend()
    fig.tight_layout()
    return fig


def plot_throughput(
    results: Sequence, *, reference: str | None = None
) -> Figure:
    """Training and generation tokens/s of each implementation as a pair of
    horizontal bars on one logarithmic axis, the implementation named above
    its bars (chapter 12).

    ``results`` are :class:`feedback_lib.bench.Result` objects;
    ``reference`` (a result's name) is named in bold. A generation bar is
    left out where it was not measured.
    """
    if not results:
        raise ValueError(
            "results is empty: pass the list that feedback_lib.bench.run "
            "returns"
        )
    fig, ax = plt.subplots(figsize=(WIDTH, 0.65 * len(results) + 1.1))
    rows = np.arange(len(results))
    largest = 1.0
    for offset, field, color, label in (
        (0.03, "train_tokens_per_s", "tab:blue", "training"),
        (0.29, "generate_tokens_per_s", "orange", "generation, batch 1"),
    ):
        values = [getattr(r, field) or 0.0 for r in results]
        largest = max(largest, *values)
        ax.barh(rows + offset, values, 0.24, color=color, label=label)
        for y, v in zip(rows + offset, values):
            if v:
                ax.text(
                    v,
                    y,
                    f" {v:.0f}" if v >= 10 else f" {v:.1f}",
                    va="center",
                )
    for y, r in zip(rows, results):
        ax.text(
            1.1,
            y - 0.12,
            r.name,
            va="bottom",
            weight="bold" if r.name == reference else "normal",
        )
    ax.set_xscale("log")
    # from 1 token/s to room for the largest value's label
    ax.set_xlim(1, largest * 12)
    ax.set_ylim(len(results) - 0.5, -0.6)  # the first result on top
    ax.set_yticks([])
    # label the powers of ten only
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("tokens per second")
    ax.grid(alpha=0.3, axis="x", which="both")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1), ncol=2)
    fig.tight_layout()
    return fig


def plot_training(
    runs: dict, *, target: float | None = None, x: str = "minutes"
) -> Figure:
    """Validation loss of several training runs (chapter 8): ``runs`` maps a
    label to a :class:`~feedback_lib.training.cli.History`. Top: validation
    loss (nats per character) against training time (``x="minutes"``) or
    tokens (``x="tokens"``); below: the training loss per step (a running
    mean over 20 steps) against tokens. ``target``: a dashed line at that
    loss, labelled "target"."""
    if x not in ("minutes", "tokens"):
        raise ValueError(f"x must be 'minutes' or 'tokens', got {x!r}")
    if not runs:
        raise ValueError("runs must map at least one label to a History")
    fig, (ax_val, ax_train) = plt.subplots(2, 1, figsize=(WIDTH, 7))
    for label, h in runs.items():
        along = (
            np.array(h.val_seconds) / 60
            if x == "minutes"
            else np.array(h.val_tokens) / 1e6
        )
        (line,) = ax_val.plot(
            along, h.val_loss, marker="o", ms=3, label=label
        )
        if h.loss:
            window = min(20, len(h.loss))
            smooth = np.convolve(
                h.loss, np.ones(window) / window, mode="valid"
            )
            ax_train.plot(
                np.array(h.tokens[window - 1 :]) / 1e6,
                smooth,
                color=line.get_color(),
                label=label,
            )
    for ax in (ax_val, ax_train):
        if target is not None:
            ax.axhline(target, color="gray", ls="--", lw=1)
            ax.annotate(
                f"target {target:.2f}",
                (0, target),
                xycoords=("axes fraction", "data"),
                xytext=(4, -3),
                textcoords="offset points",
                va="top",
                color="0.3",
            )
        ax.set_ylabel("loss (nats per char.)")
        ax.grid(alpha=0.3)
    ax_val.set_xlabel(
        "training time (minutes)" if x == "minutes" else "tokens (millions)"
    )
    ax_val.set_title("validation loss")
    ax_train.set_xlabel("tokens (millions)")
    ax_train.set_title("training loss (running mean of 20 steps)")
    ax_val.legend()
    lows = [min(h.val_loss) for h in runs.values()]
    ax_val.set_ylim(
        min(lows + ([target] if target else [])) - 0.1, max(lows) + 1.2
    )
    train_lows = [
        min(line.get_ydata()) for line in ax_train.get_lines()
    ] or lows
    ax_train.set_ylim(min(train_lows) - 0.1, ax_val.get_ylim()[1])
    fig.tight_layout()
    return fig


def plot_latency(
    latency: dict[str, Sequence[float]], *, smooth: int = 16
) -> Figure:
    """Milliseconds per generated token against its position (chapter 9).

    ``latency`` maps an implementation to one time in seconds per position,
    as :func:`feedback_lib.bench.latency_by_position` returns it. Each line
    is the running median over ``smooth`` positions (single timings of a
    millisecond are noisy); the y axis is logarithmic.
    """
    check_positive_int("smooth", smooth)
    if not latency or len({len(v) for v in latency.values()}) != 1:
        raise ValueError(
            "latency must map each implementation to the same number of "
            "per-position times"
        )
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6))
    for name, seconds in latency.items():
        ms = np.asarray(seconds, dtype=float) * 1e3
        window = min(smooth, len(ms))
        medians = np.array(
            [
                np.median(ms[max(0, t - window + 1) : t + 1])
                for t in range(len(ms))
            ]
        )
        ax.plot(np.arange(len(ms)), medians, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("position of the new token\n(tokens already read)")
    ax.set_ylabel("milliseconds per token")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_cross_attention(
    maps: torch.Tensor | np.ndarray,
    source_labels: Sequence[str],
    target_labels: Sequence[str],
    *,
    batch: int = 0,
) -> Figure:
    """Cross-attention of every layer and head as heatmaps, two heads to a
    row, layer after layer (chapter 11).

    ``maps [n_layers, batch, heads, seq, context_len]`` from
    :func:`~feedback_lib.cross_attention_maps`: row ``t`` of a panel is how
    step ``t`` of the decoder spreads its attention over the context
    positions (each row sums to 1). ``source_labels`` name the
    ``context_len`` context positions (x axis), ``target_labels`` the
    ``seq`` decoder steps (y axis; e.g. the token each step reads).
    """
    maps = _as_float64(maps)
    if maps.ndim != 5:
        raise ValueError(
            "maps must be [n_layers, batch, heads, seq, context_len] "
            "(from feedback_lib.cross_attention_maps), got shape "
            f"{tuple(maps.shape)}"
        )
    n_layers, n_batch, heads, seq, context_len = maps.shape
    if not is_integer(batch) or not 0 <= batch < n_batch:
        raise ValueError(
            f"batch must be an index in 0..{n_batch - 1}, got {batch!r}"
        )
    for name, labels, size, what in (
        ("source_labels", source_labels, context_len, "context position"),
        ("target_labels", target_labels, seq, "decoder step"),
    ):
        if isinstance(labels, str) or len(labels) != size:
            raise ValueError(
                f"{name} must be a sequence of {size} strings (one per "
                f"{what}), got {labels!r}"
            )
    columns = min(heads, 2)
    rows = n_layers * -(-heads // columns)
    # inches per panel, less the labels and the colour bar
    panel = (WIDTH - 1.6) / columns
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(WIDTH, rows * (panel * seq / context_len + 0.3) + 0.9),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    for index, ax in enumerate(axes.flat):
        layer, head = divmod(index, -(-heads // columns) * columns)
        if head >= heads:
            ax.set_visible(False)
            continue
        image = ax.imshow(
            maps[layer, batch, head], cmap="viridis", vmin=0, vmax=1
        )
        ax.set_title(f"layer {layer + 1}, head {head}")
        ax.set_xticks(range(context_len), source_labels, rotation=90)
        ax.set_yticks(range(seq), target_labels)
    for ax in axes[:, 0]:
        ax.set_ylabel("decoder reads")
    for ax in axes[-1]:
        ax.set_xlabel("source position")
    fig.colorbar(image, ax=axes, fraction=0.04, label="attention weight")
    return fig


def plot_accuracy(
    results: dict[str, dict[int, float | list[float]]],
    *,
    xlabel: str,
    ylabel: str = "printed values predicted (%)",
    chance: float | None = None,
    marks: dict[str, float] | None = None,
) -> Figure:
    """Accuracy (0 to 1) of several models against an integer ``x`` (chapter
    10): training steps or the distance to what must be recalled.

    ``results`` maps a model's name to ``{x: accuracy}``, or to ``{x:
    [accuracy of each seed]}``: then the line is the mean over the seeds
    and a band spans the lowest to the highest. ``chance`` draws the
    accuracy of guessing as a dashed grey line; ``marks`` draws a dotted
    vertical line at each ``x`` it maps a label to.
    """
    if not results or any(not points for points in results.values()):
        raise ValueError(
            "results must map each model's name to a non-empty {x: "
            "accuracy} dict"
        )
    seeds = {
        name: {
            x: a if isinstance(a, (list, tuple)) else [a]
            for x, a in points.items()
        }
        for name, points in results.items()
    }
    for name, points in seeds.items():
        bad = {x: a for x, a in points.items() if not a}
        bad.update(
            {
                x: a
                for x, a in points.items()
                if any(not 0 <= v <= 1 for v in a)
            }
        )
        if bad:
            raise ValueError(
                f"accuracies of {name!r} must lie in [0, 1], got {bad}"
            )
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6))
    for name, points in seeds.items():
        xs = sorted(points)
        mean = [100 * sum(points[x]) / len(points[x]) for x in xs]
        (line,) = ax.plot(xs, mean, marker="o", ms=3, label=name)
        if any(len(points[x]) > 1 for x in xs):
            low = [100 * min(points[x]) for x in xs]
            high = [100 * max(points[x]) for x in xs]
            ax.fill_between(
                xs, low, high, color=line.get_color(), alpha=0.2
            )
    if chance is not None:
        ax.axhline(100 * chance, ls="--", color="grey", label="guessing")
    for label, x in (marks or {}).items():
        ax.axvline(x, ls=":", color="black")
        ax.annotate(
            label,
            (x, 50),
            xytext=(4, 0),
            textcoords="offset points",
            rotation=90,
            va="center",
        )
    xs = sorted({x for points in seeds.values() for x in points})
    if len(xs) <= 8:
        ax.set_xticks(xs)  # a tick at every measured x
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 102)  # room for the markers at 100 %
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    # between the usual lines (near 100 % and near chance), clear of both
    ax.legend(loc="center right")
    fig.tight_layout()
    return fig
