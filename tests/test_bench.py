"""The benchmark module runs, reports every implementation, and measures memory (tiny sizes)."""

import json
import os
import re
import sys

import pytest
from feedback_lib import bench

TINY = bench.BenchConfig(
    d_model=16,
    heads=4,
    n_layers=2,
    d_ff=32,
    n_vocab=11,
    seq_len=6,
    batch=2,
    gen_tokens=3,
    repeats=1,
)


def test_run_reports_feedback_lib_and_the_parallel_baseline():
    results = bench.run(TINY, only=["feedback_lib", "parallel"])
    names = [r.name for r in results]
    assert names == [
        "feedback_lib",
        "feedback_lib KV",
        "feedback_lib KV, Python step loops",
        "feedback_lib KV, readable loop",
        "parallel (nn.TransformerEncoder)",
    ]
    for r in results:
        assert (
            r.train_tokens_per_s > 0 and r.generate_tokens_per_s > 0 and len(r.train_seconds) == 1
        )
    table = bench.format_table(results)
    assert table.count("\n") == len(results) + 1 and "| feedback_lib KV | " in table


def test_reference_implementations_when_installed():
    found = bench.labml_contenders(TINY) + bench.ftp_contenders(TINY)
    if os.environ.get("FEEDBACK_LIB_REQUIRE_LABML") == "1":  # make test installs them
        assert [c.name for c in found] == [
            "labml_nn FeedbackTransformer",
            "labml_nn FeedbackTransformerKV",
            "feedback-transformer-pytorch",
        ]
    if not found:
        pytest.skip("neither labml_nn nor feedback-transformer-pytorch is installed")
    results = bench.run(TINY, only=[c.name for c in found])
    assert all(r.train_tokens_per_s > 0 and r.generate_tokens_per_s > 0 for r in results)


def test_latency_by_position_times_every_position_of_every_implementation():
    import feedback_lib as fl
    import torch

    torch.manual_seed(0)
    lm = fl.FeedbackLM(11, d_model=16, heads=4, n_layers=2, d_ff=32).eval()
    parallel = fl.ParallelLM(11, d_model=16, heads=4, n_layers=2, d_ff=32, max_len=5).eval()
    calls = []

    def counting_decoder():
        decoder = lm.decoder(1, 5)
        read = decoder.read
        decoder.read = lambda ids: calls.append(ids.shape) or read(ids)
        return decoder

    latency = bench.latency_by_position(
        {"feedback": counting_decoder, "kv": lambda: parallel.decoder(1, 5, kv_cache=True)},
        torch.randint(0, 11, (1, 5)),
        repeats=2,
    )
    assert list(latency) == ["feedback", "kv"] and all(
        len(v) == 5 and min(v) > 0 for v in latency.values()
    )
    assert calls == [(1, 1)] * 10  # one token per call, a fresh decoder per repeat
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        bench.latency_by_position({}, torch.zeros((1, 2), dtype=torch.long), repeats=0)


@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="CPU peak memory is read from /proc"
)
def test_memory_measurement_in_a_fresh_process():
    config = bench.BenchConfig(**{**TINY.__dict__, "seq_len": 48})
    scaling = bench.memory_scaling([48], config)
    assert list(scaling) == list(bench.MEMORY_VARIANTS)
    assert all(len(peaks) == 1 and peaks[0] >= 0 for peaks in scaling.values())


def test_time_scaling():
    seconds = bench.time_scaling([4, 8], TINY, repeats=1)
    assert list(seconds) == list(bench.MEMORY_VARIANTS)
    assert all(len(s) == 2 and min(s) > 0 for s in seconds.values())


def test_command_line(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--d-model",
            "16",
            "--heads",
            "4",
            "--n-layers",
            "2",
            "--d-ff",
            "32",
            "--seq-len",
            "4",
            "--batch",
            "2",
            "--repeats",
            "1",
            "--no-generate",
            "--only",
            "feedback_lib KV,parallel",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert (
        "machine: CPU" in printed
        and "fused loop: " in printed
        and "| feedback_lib KV | " in printed
    )
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert report["config"]["d_model"] == 16
    assert names == [
        "feedback_lib KV",
        "feedback_lib KV, Python step loops",
        "feedback_lib KV, readable loop",
        "parallel (nn.TransformerEncoder)",
    ]


# Usage errors of the command line: each names its option and what it expects, before any work.


@pytest.fixture
def no_benchmark(monkeypatch):
    """Fail the test if the command line gets as far as timing anything."""
    for name in ("measure", "machine", "peak_training_memory"):
        monkeypatch.setattr(bench, name, lambda *a, **k: pytest.fail("the benchmark ran"))


def usage_error(capsys, argv):
    """The message of the usage error that ``argv`` makes (argparse exits with status 2)."""
    with pytest.raises(SystemExit) as exit:
        bench.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m feedback_lib.bench")
    return err.splitlines()[-1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats", "0"], "argument --repeats: expected a positive integer, got '0'"),
        (["--d-model", "-16"], "argument --d-model: expected a positive integer, got '-16'"),
        (["--batch", "two"], "argument --batch: expected a positive integer, got 'two'"),
        (["--gen-tokens", "0"], "argument --gen-tokens: expected a positive integer, got '0'"),
        (["--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
        (["--memory-seq-len", "0"], "argument --memory-seq-len: expected a positive integer"),
        (["--memory-batch", "1.5"], "argument --memory-batch: expected a positive integer"),
        (
            ["--device", "gpu"],
            r"argument --device: expected cpu or cuda\[:index\] \(\d+ CUDA devices here\), got 'gpu'",
        ),
        (
            ["--device", "cuda:99"],
            r"argument --device: expected cpu or cuda\[:index\].*got 'cuda:99'",
        ),
        (["--device", "meta"], r"argument --device: expected cpu or cuda\[:index\].*got 'meta'"),
        (
            ["--heads", "3"],
            "argument --heads: d_model must be divisible by heads, got d_model=256, heads=3",
        ),
        (
            ["--only", "feedback_lib,labmll"],
            "argument --only: no available implementation's name starts with 'labmll'.*the names are 'feedback_lib', ",
        ),
    ],
)
def test_a_bad_option_is_a_usage_error_before_any_work(capsys, no_benchmark, argv, message):
    assert re.search(message, usage_error(capsys, argv))


def test_the_json_path_is_checked_before_any_work(capsys, no_benchmark, tmp_path):
    assert re.search(
        r"argument --json: expected a file in a writable folder, got '.*missing/bench.json': '.*missing' is not an existing folder",
        usage_error(capsys, ["--json", str(tmp_path / "missing" / "bench.json")]),
    )
    assert re.search(
        "argument --json: expected a file in a writable folder, got .*: it is a folder",
        usage_error(capsys, ["--json", str(tmp_path)]),
    )
    assert not list(tmp_path.iterdir())


def test_an_unwritable_json_folder_is_a_usage_error(capsys, monkeypatch, no_benchmark, tmp_path):
    def refused(dir):
        raise PermissionError(13, "Permission denied", dir)

    monkeypatch.setattr(bench.tempfile, "TemporaryFile", refused)  # as in a read-only folder
    assert re.search(
        r"argument --json: .*: it cannot be written \(Permission denied\)",
        usage_error(capsys, ["--json", str(tmp_path / "bench.json")]),
    )


def test_memory_on_a_cpu_needs_linux(capsys, monkeypatch, no_benchmark):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert re.search(
        r"argument --memory: the peak memory on a CPU is read from /proc \(Linux only\); expected --device cuda",
        usage_error(capsys, ["--memory", "--device", "cpu"]),
    )


def test_the_json_report_is_written_only_when_the_benchmark_has_finished(monkeypatch, tmp_path):
    out = tmp_path / "bench.json"
    out.write_text("the previous report")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--only", "parallel", "--json", str(out)])
    assert out.read_text() == "the previous report"  # neither truncated nor half written
    bench.write_json(str(out), {"results": []})
    assert json.loads(out.read_text()) == {"results": []}
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_the_configuration_is_checked():
    with pytest.raises(ValueError, match="repeats must be a positive integer, got 0"):
        bench.BenchConfig(repeats=0)
    with pytest.raises(ValueError, match="d_model must be divisible by heads"):
        bench.BenchConfig(d_model=10, heads=4)
    with pytest.raises(ValueError, match="no available implementation's name starts with 'nope'"):
        bench.contenders(TINY, only=["feedback_lib", "nope"])
