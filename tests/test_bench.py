"""The benchmark module runs, reports every implementation, and measures memory (tiny sizes)."""

import json
import os
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
