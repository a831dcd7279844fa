"""Tiny Shakespeare for the training chapter: the file, a character
tokenizer, a split and batches.

:func:`shakespeare_path` finds the text: a path you give (argument or the
``FEEDBACK_LIB_SHAKESPEARE`` environment variable) is checked and used as it
is; otherwise the file is downloaded once from karpathy/char-rnn into a
cache directory (``FEEDBACK_LIB_CACHE``, default ``~/.cache/feedback_lib``)
with a progress bar. Every path is checked against the file's sha256 before
it is read, so a partial or corrupt download is never trained on: a bad
cached copy is downloaded again, a bad local file is an error.

Batches are batch-major token ids ``[batch, seq]`` (what
:class:`~feedback_lib.FeedbackLM` takes).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from feedback_lib.checks import (
    check_nonnegative_int,
    check_positive_int,
    is_integer,
    is_integer_dtype,
)

#: The canonical public copy of Tiny Shakespeare (Karpathy's char-rnn
# repository).
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = (
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
)
SHAKESPEARE_BYTES = 1_115_394
#: A local copy of the text to use instead of downloading it.
PATH_ENV = "FEEDBACK_LIB_SHAKESPEARE"
#: Where downloads are cached (default ``~/.cache/feedback_lib``).
CACHE_ENV = "FEEDBACK_LIB_CACHE"


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """``$FEEDBACK_LIB_CACHE``, else ``~/.cache/feedback_lib``."""
    return Path(
        os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "feedback_lib"
    )


def download(
    url: str, dest: str | os.PathLike, sha256: str, *, progress: bool = True
) -> Path:
    """Download ``url`` to ``dest`` with a progress bar, keeping it only if
    its sha256 matches.

    The bytes go to a temporary file next to ``dest``, which is renamed to
    ``dest`` after the checksum passed: an interrupted or corrupt download
    never sits at ``dest``.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=dest.parent, prefix=dest.name + ".", suffix=".part"
    )
    try:
        try:
            response = urllib.request.urlopen(url, timeout=60)
        except OSError as error:  # URLError, timeouts, refused connections
            raise OSError(
                f"could not download {url} ({error}); without a network, "
                f"give a local copy with a path or ${PATH_ENV}"
            ) from None
        with os.fdopen(fd, "wb") as out, response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not progress,
            ) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))
        got = sha256_of(tmp)
        if got != sha256:
            raise OSError(
                f"the file downloaded from {url} has sha256 {got}, "
                f"expected {sha256}; the download was corrupt or the file "
                "changed upstream (nothing was saved)"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def shakespeare_path(
    path: str | os.PathLike | None = None,
    *,
    download_missing: bool = True,
    progress: bool = True,
) -> Path:
    """The path of a verified copy of Tiny Shakespeare.

    Looks, in order, at ``path``, at ``$FEEDBACK_LIB_SHAKESPEARE`` and at
    the cache directory (downloading into it when the file is missing or
    corrupt and ``download_missing`` is True). A given path whose checksum
    does not match raises ``ValueError``.
    """
    given = path if path is not None else os.environ.get(PATH_ENV) or None
    if given is not None:
        given = Path(given).expanduser()
        if not given.is_file():
            source = "path" if path is not None else f"${PATH_ENV}"
            raise FileNotFoundError(
                f"{source} points to {str(given)!r}, which is not a file; "
                "give the path of Tiny Shakespeare's input.txt "
                f"({SHAKESPEARE_BYTES:,} bytes)"
            )
        got = sha256_of(given)
        if got != SHAKESPEARE_SHA256:
            raise ValueError(
                f"{str(given)!r} is not Tiny Shakespeare: its sha256 is "
                f"{got}, expected {SHAKESPEARE_SHA256} "
                f"({SHAKESPEARE_BYTES:,} bytes, {given.stat().st_size:,} "
                "found); it may be truncated or edited"
            )
        return given
    cached = cache_dir() / "tinyshakespeare.txt"
    if cached.is_file() and sha256_of(cached) == SHAKESPEARE_SHA256:
        return cached
    if not download_missing:
        raise FileNotFoundError(
            f"no verified copy of Tiny Shakespeare at {str(cached)!r} and "
            f"download_missing=False; pass a path or set ${PATH_ENV}"
        )
    return download(
        SHAKESPEARE_URL, cached, SHAKESPEARE_SHA256, progress=progress
    )


def load_shakespeare(
    path: str | os.PathLike | None = None, **kwargs
) -> str:
    """The text of Tiny Shakespeare (see :func:`shakespeare_path` for where
    it comes from)."""
    return shakespeare_path(path, **kwargs).read_text(encoding="utf-8")


class CharTokenizer:
    """One token per distinct character of a text, ids in sorted character
    order.

    ``decode(encode(s)) == s`` for every string made of the vocabulary's
    characters; any other character is an error naming it.
    """

    def __init__(self, chars: str):
        if not isinstance(chars, str):
            raise TypeError(
                f"chars must be a str, got {type(chars).__name__} (or use "
                "CharTokenizer.fit(text))"
            )
        if not chars:
            raise ValueError(
                "chars must be a non-empty string of characters (or use "
                "CharTokenizer.fit(text))"
            )
        if len(set(chars)) != len(chars):
            raise ValueError(
                f"chars must be distinct characters, got {chars!r}"
            )
        self.chars = chars
        self.ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is the characters of ``text``."""
        if not isinstance(text, str) or not text:
            raise ValueError("CharTokenizer.fit needs a non-empty text")
        return cls("".join(sorted(set(text))))

    @property
    def n_vocab(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids ``[len(text)]`` (int64)."""
        if not isinstance(text, str):
            raise TypeError(
                f"text must be a str, got {type(text).__name__} (decode "
                "bytes first, e.g. data.decode('utf-8'))"
            )
        try:
            return torch.tensor(
                [self.ids[c] for c in text], dtype=torch.long
            )
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in the tokenizer's "
                f"vocabulary of {self.n_vocab} characters"
            ) from None

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """The text of a 1-D sequence of integer ids (a tensor or a
        list)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or not is_integer_dtype(ids.dtype):
                raise TypeError(
                    "ids must be a 1-D tensor of integer token ids, got "
                    f"{ids.dtype} of shape {list(ids.shape)}"
                )
            ids = ids.tolist()
        ids = list(ids)
        if not all(is_integer(i) for i in ids):
            bad = next(i for i in ids if not is_integer(i))
            raise TypeError(
                f"ids must be integer token ids, got {bad!r} of type "
                f"{type(bad).__name__}"
            )
        if any(not 0 <= i < self.n_vocab for i in ids):
            raise ValueError(
                f"token ids must be in [0, {self.n_vocab}), got "
                f"{min(ids)}..{max(ids)}"
            )
        return "".join(self.chars[i] for i in ids)


def split_ids(
    ids: torch.Tensor, val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``1 - val_fraction`` of ``ids [n]`` for training, the rest
    for validation (a split in text order, so no validation window overlaps
    the training text)."""
    if not 0 < val_fraction < 1:
        raise ValueError(
            f"val_fraction must be in (0, 1), got {val_fraction!r}"
        )
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


@dataclass(frozen=True, eq=False)
class BatchSampler:
    """Random windows of a token sequence, the same for a given ``(seed,
    step)`` wherever drawn.

    ``batch(step, batch, seq_len)`` returns inputs and targets ``[batch,
    seq_len]`` (the targets are the inputs shifted by one token). Because a
    batch depends only on the seed and the step, a resumed run reads exactly
    the batches an uninterrupted run reads, and the processes of a
    distributed run each take their rows of the same global batch.
    """

    ids: torch.Tensor
    seed: int = 0

    def __post_init__(self):
        if (
            not isinstance(self.ids, torch.Tensor)
            or self.ids.dim() != 1
            or not is_integer_dtype(self.ids.dtype)
        ):
            got = (
                f"{self.ids.dtype} of shape {list(self.ids.shape)}"
                if isinstance(self.ids, torch.Tensor)
                else type(self.ids).__name__
            )
            raise TypeError(
                f"ids must be a 1-D tensor of integer token ids [n], got "
                f"{got}"
            )
        # A Python int: NumPy's would overflow in the seed arithmetic.
        object.__setattr__(
            self, "seed", check_nonnegative_int("seed", self.seed)
        )

    def batch(
        self, step: int, batch: int, seq_len: int, rows: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = check_nonnegative_int("step", step)
        check_positive_int("batch", batch)
        check_positive_int("seq_len", seq_len)
        if len(self.ids) < seq_len + 1:
            raise ValueError(
                f"seq_len={seq_len} needs at least {seq_len + 1} tokens, "
                f"the data has {len(self.ids)}"
            )
        # Any seed and step give a valid torch seed (< 2**64).
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + step) % 2**64
        )
        starts = torch.randint(
            len(self.ids) - seq_len, (batch,), generator=generator
        )[rows]
        windows = torch.stack(
            [self.ids[s : s + seq_len + 1] for s in starts.tolist()]
        )  # [rows, seq_len + 1]
        return windows[:, :-1], windows[:, 1:]

    def windows(
        self, seq_len: int, count: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` evenly spaced windows ``[count, seq_len]`` (the fixed
        validation set)."""
        check_positive_int("seq_len", seq_len)
        check_positive_int("count", count)
        last = len(self.ids) - seq_len - 1
        if last < 0:
            raise ValueError(
                f"seq_len={seq_len} needs at least {seq_len + 1} tokens, "
                f"the data has {len(self.ids)}"
            )
        starts = torch.linspace(0, last, count).long().tolist()
        windows = torch.stack(
            [self.ids[s : s + seq_len + 1] for s in starts]
        )
        return windows[:, :-1], windows[:, 1:]
