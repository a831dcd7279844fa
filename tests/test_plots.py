"""The book's figures and widgets: they draw without errors, follow the book's style (legible on a
phone) and refuse bad input clearly."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import feedback_lib as fl  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from feedback_lib.book import plots, style  # noqa: E402


@pytest.fixture(autouse=True)
def figures_follow_the_book_style():
    """Every figure a test draws, stored as the notebooks store it, is at most 5 % wider than
    style.MAX_WIDTH_IN (the tight crop may add a little) and has no text below
    style.MIN_FONT_PT: together these keep its text at 9 CSS px or more on a phone
    (tests/browser measures the website)."""
    yield
    try:
        for number in plt.get_fignums():
            info = style.png_info(style.png(plt.figure(number)))
            assert info["dpi"] == style.DPI and info["font"] >= style.MIN_FONT_PT, info
            assert info["width"] <= 1.05 * style.MAX_WIDTH_IN * style.DPI, info
    finally:
        plt.close("all")


def test_png_records_its_resolution_and_smallest_font():
    fig, ax = plt.subplots()
    ax.set_title("big", fontsize=14)
    ax.text(0.5, 0.5, "small", fontsize=7)
    ax.text(0.5, 0.2, "  ", fontsize=3)  # blank text is not counted
    assert style.png_info(style.png(fig))["font"] == 7
    ax.texts[0].set_visible(False)  # hidden text is not counted either; the defaults are the book's
    info = style.png_info(style.png(fig))
    assert (info["dpi"], info["font"]) == (style.DPI, style.MIN_FONT_PT)
    assert info["width"] <= style.MAX_WIDTH_IN * style.DPI
    plt.close(fig)
    with pytest.raises(ValueError, match="not a PNG"):
        style.png_info(b"GIF89a")


@pytest.mark.parametrize("kind", fl.book.information_flow.KINDS)
def test_information_flow_figure(kind):
    fig = plots.draw_information_flow(kind, 3, 4)
    assert fig.axes[0].get_title().endswith("(filled)")


def test_information_flow_bad_input():
    with pytest.raises(ValueError, match="kind must be one of"):
        plots.draw_information_flow("rnn", 2, 3)
    with pytest.raises(ValueError, match="target must be a layer node"):
        plots.draw_information_flow("feedback", 2, 3, target=(0, 1))


def test_score_terms_figure():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 2, 3, 4))
    terms = fl.score_terms_numpy(
        q, k, rng.normal(size=(3, 4)), rng.normal(size=(5, 3, 4)), rng.normal(size=(5, 3))
    )
    fig = plots.plot_score_terms(terms, batch=1, head=2)
    assert len(fig.axes) == 6  # A, B, C, D, the sum, and the legend slot
    a_line = fig.axes[0].lines[0]
    # Oldest entry (5 steps back) on the left, the newest (1 step back) on the right.
    assert list(a_line.get_xdata()) == [5, 4, 3, 2, 1] and fig.axes[0].get_xlim() == (5.5, 0.5)
    np.testing.assert_allclose(a_line.get_ydata(), terms["A"][:, 1, 2])
    total = sum(terms[n][:, 1, 2] for n in "ABCD")
    np.testing.assert_allclose(fig.axes[4].lines[0].get_ydata(), total)
    # Several batch elements: one line each per panel, named in the legend.
    fig = plots.plot_score_terms(terms, batch=[0, 1], labels=["first", "second"])
    assert [len(ax.lines) for ax in fig.axes[:5]] == [3, 3, 3, 3, 3]  # two series + the zero line
    assert [t.get_text() for t in fig.axes[5].get_legend().get_texts()] == ["first", "second"]
    with pytest.raises(ValueError, match="missing"):
        plots.plot_score_terms({"A": terms["A"]})
    with pytest.raises(ValueError, match="head in 0..2"):
        plots.plot_score_terms(terms, head=3)
    with pytest.raises(ValueError, match="batch must be in 0..1"):
        plots.plot_score_terms(terms, batch=[0, 2])
    with pytest.raises(ValueError, match="labels must name each"):
        plots.plot_score_terms(terms, batch=[0, 1], labels=["one"])
    with pytest.raises(ValueError, match="same shape"):
        plots.plot_score_terms({**terms, "D": terms["D"][:, :1]})


def test_attention_maps_and_figure():
    attn = fl.randomize_parameters_(fl.FeedbackAttention(2, 8, 0.0)).eval()
    x_seq = torch.randn(6, 3, 8)
    maps = fl.attention_maps(attn, x_seq)
    assert maps.shape == (3, 2, 6, 6)
    rows = maps[:, :, 1:].nansum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert torch.isnan(maps[:, :, 0]).all() and torch.isnan(maps.triu()).sum() > 0
    # Row t equals the module's own weights for query t over the first t steps.
    _, weights = attn(x_seq[4], x_seq[:4], x_seq[:4], need_weights=True)
    torch.testing.assert_close(maps[:, :, 4, :4], weights.permute(1, 2, 0))
    fig = plots.plot_attention_step(maps, step=4, head=1, batch=2)
    assert len(fig.axes) == 3  # heatmap, colorbar, bars
    with pytest.raises(ValueError, match="step in 1..5"):
        plots.plot_attention_step(maps, step=0, head=0)
    with pytest.raises(ValueError, match=r"maps must be \[batch, heads, steps, steps\]"):
        plots.plot_attention_step(maps[0], step=1, head=0)
    # Token labels go on the axes next to the step numbers; a wrong count is refused.
    fig = plots.plot_attention_step(maps, step=2, head=0, labels=list("ABCABC"))
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][:3] == ["0 A", "1 B", "2 C"]
    with pytest.raises(ValueError, match="sequence of 6 strings"):
        plots.plot_attention_step(maps, step=2, head=0, labels=list("ABC"))


def test_attention_maps_bad_input():
    with pytest.raises(TypeError, match="own key/value projections"):
        fl.attention_maps(fl.FeedbackAttention(2, 8, is_kv_precomputed=True), torch.randn(3, 1, 8))
    with pytest.raises(ValueError, match="at least 2 steps"):
        fl.attention_maps(fl.FeedbackAttention(2, 8), torch.randn(1, 1, 8))
    with pytest.raises(ValueError, match="x_seq"):
        fl.attention_maps(fl.FeedbackAttention(2, 8), torch.randn(3, 8))


def test_attention_heads_figure():
    maps = fl.attention_maps(fl.FeedbackAttention(3, 9, 0.0).eval(), torch.randn(5, 2, 9))
    fig = plots.plot_attention_heads(maps, batch=1, labels=list("abcde"))
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in shown] == ["head 0", "head 1", "head 2"]
    assert [t.get_text() for t in shown[0].get_yticklabels()][:2] == ["0 a", "1 b"]
    with pytest.raises(ValueError, match="sequence of 5 strings"):
        plots.plot_attention_heads(maps, labels="abcde")
    with pytest.raises(ValueError, match="batch in 0..1"):
        plots.plot_attention_heads(maps, batch=2)


def test_edited_head_changes_one_head_of_a_copy():
    widgets = pytest.importorskip("feedback_lib.book.widgets")
    attn = fl.randomize_parameters_(fl.FeedbackAttention(2, 8, 0.0)).double().eval()
    before = {name: p.clone() for name, p in attn.state_dict().items()}
    x, m = torch.randn(3, 8, dtype=torch.float64), torch.randn(6, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        scores = attn.get_scores(attn.query(x), attn.key(m))  # [6, 3, 2]
        edited = widgets.edited_head(
            attn, 1, content=0.0, recency=0.5, look_back=2, look_back_bias=3.0
        )
        edited_scores = edited.get_scores(edited.query(x), edited.key(m))
    for name, p in attn.state_dict().items():  # the module itself is unchanged
        torch.testing.assert_close(p, before[name])
    torch.testing.assert_close(edited_scores[..., 0], scores[..., 0])
    # head 1: content terms gone (K = 0), so B + D with S shifted by -0.5 k, +3 at k = 2
    tables = attn.position_tables(6)
    b_plus_d = torch.einsum("bd,dj->jb", attn.query(x)[:, 1], tables.key_pos_emb[1])
    k = torch.arange(6, 0, -1, dtype=torch.float64)
    expected = b_plus_d + (tables.key_pos_bias[1, 0] - 0.5 * k + 3.0 * (k == 2))[:, None]
    torch.testing.assert_close(edited_scores[..., 1], expected)
    with pytest.raises(ValueError, match="head must be in 0..1"):
        widgets.edited_head(attn, 2)
    with pytest.raises(ValueError, match="look_back must be a distance in 1..4096"):
        widgets.edited_head(attn, 0, look_back=0)


def test_attention_explorer():
    widgets = pytest.importorskip("feedback_lib.book.widgets")
    attn = fl.FeedbackAttention(2, 8, 0.0).eval()
    x_seq = torch.randn(5, 1, 8)
    box = widgets.attention_explorer(attn, x_seq, step=2, head=1)
    step_slider, head_slider = box.children[0].children
    assert (step_slider.min, step_slider.max, head_slider.max) == (1, 4, 1)
    step_slider.value = 4  # redraws without error
    content, recency = box.children[1].children
    look_back, by = box.children[2].children
    assert (content.value, recency.value, look_back.max, by.value) == (1.0, 0.0, 4, 0.0)
    recency.value = 1.0  # recomputes the maps from the edited parameters
    by.value = 5.0
    box = widgets.attention_explorer(attn, x_seq, step=1, head=0, labels=list("abcde"))
    box.children[0].children[1].value = 1
    with pytest.raises(ValueError, match="sequence of 5 strings"):
        widgets.attention_explorer(attn, x_seq, labels="abcde")
    with pytest.raises(ValueError, match="step in 1..4"):
        widgets.attention_explorer(attn, x_seq, step=5)


def test_layer_weights_figure():
    fig = plots.plot_layer_weights(torch.zeros(3), others=torch.tensor([0.0, 1.0, 2.0]))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["embedding", "layer 1", "layer 2"]
    # Each bar is labelled with its softmax share; the legend names both sets and the uniform line.
    shares = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0)
    texts = {t.get_text() for t in ax.texts}
    assert {"0.333"} | {f"{p:.3f}" for p in shares.tolist()} <= texts
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["initial", "trained", "uniform"]
    single = plots.plot_layer_weights(np.ones(4)).axes[0]
    assert len(single.patches) == 4 and [t.get_text() for t in single.get_legend().get_texts()] == [
        "uniform"
    ]
    with pytest.raises(ValueError, match="labels must be two strings"):
        plots.plot_layer_weights(torch.zeros(3), labels=("only one",))
    with pytest.raises(ValueError, match="same size"):
        plots.plot_layer_weights(torch.zeros(3), others=torch.zeros(4))
    with pytest.raises(ValueError, match=r"1-d tensor \[n_layers \+ 1\]"):
        plots.plot_layer_weights(torch.zeros(2, 2))


def test_scaling_and_throughput_figures():
    fig = plots.plot_scaling(
        [8, 16],
        {"naive stack": [0.1, 0.3], "Stack": [0.1, 0.2]},
        {"naive stack": [2**20, 4 * 2**20], "Stack": [2**19, 2**20]},
    )
    # time above memory, on one shared axis of sequence lengths
    assert [ax.get_xlabel() for ax in fig.axes] == ["", "sequence length T"]
    assert fig.axes[0].get_shared_x_axes().joined(*fig.axes)
    with pytest.raises(ValueError, match="peak_bytes must map each variant to 2 values"):
        plots.plot_scaling([8, 16], {"Stack": [0.1, 0.2]}, {"Stack": [1]})
    from feedback_lib.bench import Result

    results = [Result("a", 10, 100.0, 5.0, "cached memory"), Result("b", 10, 50.0, None, "-")]
    fig = plots.plot_throughput(results, reference="a")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "training",
        "generation, batch 1",
    ]
    # each name above its bars, the reference in bold; no generation bar where it is not measured
    names = {t.get_text(): t.get_weight() for t in ax.texts if t.get_text() in "ab"}
    assert names == {"a": "bold", "b": "normal"}
    assert [round(p.get_width(), 1) for p in ax.patches] == [100.0, 50.0, 5.0, 0.0]
    with pytest.raises(ValueError, match="results is empty"):
        plots.plot_throughput([])


def test_latency_figure():
    fig = plots.plot_latency({"a": [0.002, 0.001, 0.003], "b": [0.001] * 3}, smooth=2)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["a", "b"]
    np.testing.assert_allclose(lines[0].get_ydata(), [2.0, 1.5, 2.0])  # running medians, in ms
    with pytest.raises(ValueError, match="the same number of per-position times"):
        plots.plot_latency({"a": [0.1], "b": [0.1, 0.2]})


def test_accuracy_figure():
    fig = plots.plot_accuracy(
        {"feedback": {5: 0.9, 2: 1.0}, "parallel": {2: 0.8, 5: 0.5}},
        xlabel="statements",
        chance=0.1,
    )
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["feedback", "parallel", "guessing"]
    np.testing.assert_allclose(lines[0].get_xdata(), [2, 5])  # sorted by x
    np.testing.assert_allclose(lines[0].get_ydata(), [100, 90])  # in percent
    np.testing.assert_allclose(fig.axes[0].get_xticks(), [2, 5])  # a tick at each measured x
    assert not fig.axes[0].collections  # one value per x: no band
    with pytest.raises(ValueError, match="must lie in"):
        plots.plot_accuracy({"a": {1: 50}}, xlabel="step")
    with pytest.raises(ValueError, match="must lie in"):
        plots.plot_accuracy({"a": {1: []}}, xlabel="step")
    with pytest.raises(ValueError, match="non-empty"):
        plots.plot_accuracy({"a": {}}, xlabel="step")


def test_accuracy_figure_of_seeds_draws_mean_band_and_marks():
    fig = plots.plot_accuracy(
        {"feedback": {1: [1.0, 0.8], 2: [0.6, 0.4]}},
        xlabel="distance",
        marks={"2 layers x span": 1.5},
    )
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [90, 50])  # the mean
    (band,) = ax.collections  # lowest to highest seed
    assert band.get_paths()[0].vertices[:, 1].min() == pytest.approx(40)
    assert band.get_paths()[0].vertices[:, 1].max() == pytest.approx(100)
    assert np.allclose(ax.get_lines()[1].get_xdata(), [1.5, 1.5])  # the mark
    assert [t.get_text() for t in ax.texts] == ["2 layers x span"]
