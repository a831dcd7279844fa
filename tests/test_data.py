"""The data module: the verified Tiny Shakespeare file, the tokenizer, the split and the batches."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from feedback_lib.training import data

SHARED = Path(
    os.environ.get(data.PATH_ENV)
    or Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
)


@pytest.fixture
def shakespeare() -> Path:
    if not SHARED.is_file():
        pytest.fail(
            f"Tiny Shakespeare is expected at {SHARED} (../shared/data next to the project) "
            f"or at ${data.PATH_ENV}; the tests never download it"
        )
    return SHARED


def test_the_shared_copy_is_the_canonical_file(shakespeare):
    assert shakespeare.stat().st_size == data.SHAKESPEARE_BYTES
    assert data.sha256_of(shakespeare) == data.SHAKESPEARE_SHA256
    assert data.shakespeare_path(shakespeare) == shakespeare


def test_environment_variable_gives_the_local_path(shakespeare, monkeypatch):
    monkeypatch.setenv(data.PATH_ENV, str(shakespeare))
    assert data.shakespeare_path() == shakespeare
    assert data.load_shakespeare().startswith("First Citizen:")


def test_a_corrupt_local_file_is_an_error(tmp_path, shakespeare):
    bad = tmp_path / "input.txt"
    bad.write_bytes(shakespeare.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match="is not Tiny Shakespeare.*sha256"):
        data.shakespeare_path(bad)
    with pytest.raises(FileNotFoundError, match="not a file"):
        data.shakespeare_path(tmp_path / "missing.txt")


def fake_download(monkeypatch, payload: bytes) -> list[str]:
    """Serve ``payload`` for every URL (no network); returns the list of URLs asked for."""
    asked = []

    class Response:
        def __init__(self):
            self.left = payload
            self.headers = {"Content-Length": str(len(payload))}

        def read(self, n):
            block, self.left = self.left[:n], self.left[n:]
            return block

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(url, timeout):
        asked.append(url)
        return Response()

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    return asked


def test_download_into_the_cache_verifies_and_is_reused(tmp_path, monkeypatch, shakespeare):
    monkeypatch.delenv(data.PATH_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path))
    asked = fake_download(monkeypatch, shakespeare.read_bytes())
    path = data.shakespeare_path(progress=False)
    assert path == tmp_path / "tinyshakespeare.txt" and asked == [data.SHAKESPEARE_URL]
    assert (
        data.shakespeare_path(progress=False) == path and len(asked) == 1
    )  # cached: no second download
    path.write_bytes(b"partial")  # a corrupt cached copy
    assert data.shakespeare_path(progress=False) == path and len(asked) == 2  # is downloaded again
    assert data.sha256_of(path) == data.SHAKESPEARE_SHA256


def test_a_bad_download_is_never_kept(tmp_path, monkeypatch):
    monkeypatch.delenv(data.PATH_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path))
    fake_download(monkeypatch, b"<html>rate limited</html>")
    with pytest.raises(OSError, match="corrupt"):
        data.shakespeare_path(progress=False)
    assert list(tmp_path.iterdir()) == []  # no partial file left
    with pytest.raises(FileNotFoundError, match="download_missing=False"):
        data.shakespeare_path(download_missing=False)


def test_no_network_is_a_clear_error(tmp_path, monkeypatch):
    def urlopen(url, timeout):
        raise data.urllib.error.URLError("no route to host")

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    with pytest.raises(OSError, match="could not download .*FEEDBACK_LIB_SHAKESPEARE"):
        data.download("http://example.invalid/x", tmp_path / "x.txt", "0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_download_checks_the_sha256_it_is_given(tmp_path, monkeypatch):
    payload = b"hello"
    fake_download(monkeypatch, payload)
    dest = data.download(
        "http://example.invalid/x",
        tmp_path / "x.txt",
        hashlib.sha256(payload).hexdigest(),
        progress=False,
    )
    assert dest.read_bytes() == payload


def test_tokenizer_round_trips_the_whole_text(shakespeare):
    text = shakespeare.read_text()
    tok = data.CharTokenizer.fit(text)
    assert tok.n_vocab == 65
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert data.CharTokenizer(tok.chars).encode("To be").tolist() == tok.encode("To be").tolist()


def test_tokenizer_errors_name_the_problem():
    tok = data.CharTokenizer.fit("abc")
    with pytest.raises(ValueError, match="'z' is not in the tokenizer's vocabulary of 3"):
        tok.encode("abz")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 3\)"):
        tok.decode([0, 5])
    with pytest.raises(ValueError, match="distinct"):
        data.CharTokenizer("aa")
    with pytest.raises(ValueError, match="needs a non-empty text"):
        data.CharTokenizer.fit("")
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tok.encode(b"abc")
    for ids in (torch.tensor([True, False]), torch.tensor([1.0, 2.0]), torch.zeros(2, 2).long()):
        with pytest.raises(TypeError, match="ids must be a 1-D tensor of integer token ids"):
            tok.decode(ids)
    with pytest.raises(TypeError, match="ids must be integer token ids, got 1.0 of type float"):
        tok.decode([0, 1.0])
    assert (
        tok.decode(torch.tensor([2, 0], dtype=torch.uint8)) == tok.decode([np.int64(2), 0]) == "ca"
    )


@pytest.mark.parametrize(
    "ids",
    [
        torch.zeros(4, 100, dtype=torch.long),
        torch.zeros(100),
        torch.zeros(100, dtype=torch.bool),
        [1, 2, 3],
    ],
)
def test_batch_sampler_takes_1d_integer_ids_only(ids):
    with pytest.raises(TypeError, match=r"ids must be a 1-D tensor of integer token ids \[n\]"):
        data.BatchSampler(ids)


def test_batch_sampler_seed():
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        data.BatchSampler(torch.arange(100), seed=-1)
    ids = torch.arange(100)
    x, _ = data.BatchSampler(ids, seed=2**64 - 1).batch(10**6, 2, 8)  # any seed and step draw
    assert x.shape == (2, 8)
    small = data.BatchSampler(ids, seed=3).batch(
        5, 2, 8
    )  # the draws of small seeds stay as they were
    generator = torch.Generator().manual_seed(3 * 1_000_003 + 5)
    start = torch.randint(100 - 8, (2,), generator=generator)[0].item()
    assert small[0][0].tolist() == list(range(start, start + 8))


def test_split_is_in_text_order():
    ids = torch.arange(100)
    train, val = data.split_ids(ids, 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_ids(ids, 1.0)


def test_batches_are_shifted_windows_fixed_by_seed_and_step():
    sampler = data.BatchSampler(torch.arange(1000), seed=3)
    x, y = sampler.batch(7, 4, 16)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)  # targets: the next token
    assert torch.equal(sampler.batch(7, 4, 16)[0], x)  # same step: same batch
    assert not torch.equal(sampler.batch(8, 4, 16)[0], x)
    halves = [sampler.batch(7, 4, 16, rows)[0] for rows in (slice(0, 2), slice(2, 4))]
    assert torch.equal(torch.cat(halves), x)  # processes take rows of one global batch
    with pytest.raises(ValueError, match="needs at least 1001 tokens"):
        sampler.batch(0, 1, 1000)
    wx, wy = sampler.windows(10, 5)
    assert wx.shape == (5, 10) and wx[0, 0] == 0 and wy[-1, -1] == 999
