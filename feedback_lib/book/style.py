"""The book's figure style: sizes that stay legible on a phone (every
chapter with a figure).

The website shows a figure at most about 340 CSS pixels wide on a phone
(375 px screen) and at its own pixel size on a laptop. A figure at most
``MAX_WIDTH_IN`` inches wide, drawn at ``DPI`` with no text smaller than
``MIN_FONT_PT`` points, therefore shows its smallest text at 9 CSS pixels or
more on both. :func:`use` (called when :mod:`feedback_lib.book.plots` is
imported) sets matplotlib's defaults to this style and has the notebook
store each figure as a PNG that records its resolution and its smallest
font, so the website's browser test can measure the text a reader sees.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import matplotlib as mpl
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.text import Text

#: The smallest font a figure of the book uses, in points.
MIN_FONT_PT = 10.0
#: The widest figure of the book, in inches (before the tight crop).
MAX_WIDTH_IN = 5.0
#: Pixels per inch of the stored figures.
DPI = 100
#: The key of the PNG text record that holds the smallest font in points.
FONT_KEY = "smallest_font_pt"
#: matplotlib's defaults in the book: every text at least MIN_FONT_PT.
RC = {
    "figure.figsize": (MAX_WIDTH_IN, 3.4),
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.size": MIN_FONT_PT,
    "axes.titlesize": MIN_FONT_PT + 1,
    "axes.labelsize": MIN_FONT_PT,
    "xtick.labelsize": MIN_FONT_PT,
    "ytick.labelsize": MIN_FONT_PT,
    "legend.fontsize": MIN_FONT_PT,
    "legend.title_fontsize": MIN_FONT_PT,
    "figure.titlesize": MIN_FONT_PT + 2,
}


def smallest_font(fig: Figure) -> float:
    """The smallest font size (points) of any visible, non-empty text of
    ``fig``, once it is laid out (tick labels included)."""
    fig.draw_without_rendering()
    sizes = [
        text.get_fontsize()
        for text in fig.findobj(Text)
        if text.get_visible()
        and text.get_text().strip()
        and (text.axes is None or text.axes.get_visible())
    ]
    return min(sizes, default=MIN_FONT_PT)


def png(fig: Figure) -> bytes:
    """``fig`` as PNG bytes at ``DPI``, trimmed to its content, with its
    smallest font recorded under ``FONT_KEY`` (the resolution is in the
    PNG's pHYs chunk)."""
    metadata = {FONT_KEY: f"{smallest_font(fig):g}"}
    buffer = io.BytesIO()
    fig.savefig(
        buffer,
        format="png",
        dpi=DPI,
        bbox_inches="tight",
        metadata=metadata,
    )
    return buffer.getvalue()


def png_info(data: bytes) -> dict[str, float | None]:
    """What a PNG records about its legibility: ``width`` (pixels),
    ``dpi`` (from the pHYs chunk, None without one) and ``font`` (the
    smallest font in points recorded by :func:`png`, None without it)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("data is not a PNG image (wrong signature)")
    info: dict[str, float | None] = dict.fromkeys(("width", "dpi", "font"))
    offset = 8
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            info["width"] = struct.unpack(">I", body[:4])[0]
        elif kind == b"pHYs" and body[8] == 1:  # unit: pixels per metre
            info["dpi"] = round(struct.unpack(">I", body[:4])[0] * 0.0254)
        elif kind in (b"tEXt", b"zTXt"):
            key, _, value = body.partition(b"\0")
            if kind == b"zTXt":
                value = zlib.decompress(value[1:])
            if key.decode("latin-1") == FONT_KEY:
                info["font"] = float(value)
        offset += 12 + length
    return info


def use() -> None:
    """Set matplotlib's defaults to the book's style and, in a notebook,
    store every figure through :func:`png`."""
    mpl.rcParams.update(RC)
    try:
        from IPython import get_ipython
    except ImportError:  # matplotlib outside IPython: nothing to register
        return
    shell = get_ipython()
    if shell is None:
        return
    # Creating a figure loads the notebook's backend, which registers its
    # own PNG formatter; ours replaces it.
    plt.close(plt.figure())
    formatter = shell.display_formatter.formatters["image/png"]
    formatter.for_type(Figure, _png_base64)


def _png_base64(fig: Figure) -> str:
    """:func:`png` as base64 text, the form a notebook stores."""
    return base64.b64encode(png(fig)).decode("ascii")
