"""Chapter 10's tasks: the authors' programs, the recall task, and the resumable multi-seed runs."""

import dataclasses
import json
import random
import threading
from pathlib import Path

import pytest
import torch
from feedback_lib.tasks import experiments, programs, recall

ROOT = Path(__file__).resolve().parent.parent


def test_generator_follows_the_authors_semantics():
    rng = random.Random(0)
    kinds = dict.fromkeys(("=", "++", "--", "if", "print"), 0)
    two_variable_conditions = conditions = 0
    for _ in range(300):
        tokens, labels = programs.program(rng, 40)
        assert tokens[-1] == "END" and len(tokens) == len(labels)
        # An independent interpreter prints the same values at the same places.
        assert programs.run(tokens) == labels
        statements = " ".join(tokens[:-1]).split(" ; ")
        assigned = set()
        for words in (s.split() for s in statements):
            kinds["if" if words[0] == "if" else words[0] if words[0] == "print" else words[1]] += 1
            if words[0] == "if":
                conditions += 1
                two_variable_conditions += words[3] in programs.VARIABLES
                assert words[5] not in ("if", "print")  # no print or if inside an if
            elif words[1] == "=":
                assert words[0] not in assigned  # a variable is never reassigned
                assigned.add(words[0])
        values = [int(t) for t in tokens if t.isdigit()]
        assert all(1 <= v <= 10 for v in values)
        assert set(tokens) <= set(programs.VOCAB)
        assert {t for t in tokens if t in programs.VARIABLES} <= {"x", "y", "z"}
    assert all(n > 0 for n in kinds.values())
    assert 0.35 < two_variable_conditions / conditions < 0.6  # about half


def test_printed_values_are_labels_not_input():
    x, y = programs.batch("t", 4, 10)
    scored = (y != programs.IGNORE).nonzero()
    assert len(scored) > 0
    for row, col in scored.tolist():
        assert programs.VOCAB[x[row, col]] == ";"  # the label sits at the print's ;
        assert programs.VOCAB[x[row, col - 2]] == "print"
        assert programs.VOCAB[y[row, col]] in programs.VALUES
    torch.testing.assert_close(programs.batch("t", 4, 10)[0], x)  # the same seed, the same programs
    with pytest.raises(ValueError, match="n_variables must be 3 or 5"):
        programs.program(random.Random(0), 3, n_variables=4)


def test_segments_carry_the_memory():
    from feedback_lib import FeedbackLM

    torch.manual_seed(0)
    model = FeedbackLM(len(programs.VOCAB), d_model=16, heads=2, n_layers=2, d_ff=32, mem_len=8)
    x, y = programs.batch("s", 2, 6)
    whole = model(x)
    torch.testing.assert_close(programs.segment_logits(model, x, 5), whole)
    assert 0 <= programs.accuracy(model, x, y, 5) <= 1
    with pytest.raises(ValueError, match="no printed value"):
        programs.accuracy(model, x, torch.full_like(y, programs.IGNORE), 5)
    silent = programs.printed_loss(5)(model, x, torch.full_like(y, programs.IGNORE))
    assert silent.item() == 0  # a batch without prints adds nothing
    loss = programs.printed_loss(5)(model, x, y)
    loss.backward()  # gradients flow within each segment
    assert model.embed.weight.grad.abs().sum() > 0


def test_recall_batches_and_accuracy():
    x, y = recall.batch(0, 8, 10)
    assert (x[:, 0] < recall.N_KEYS).all() and (x[:, 1:] >= recall.N_KEYS).all()
    assert (y == x[:, :1]).all()
    torch.testing.assert_close(recall.batch(0, 8, 10)[0], x)

    class Oracle(torch.nn.Module):  # knows the key for 3 positions
        def forward(self, x):
            logits = torch.zeros(*x.shape, recall.N_VOCAB)
            logits[:, :3].scatter_(-1, x[:, :1, None].expand(-1, 3, 1), 1.0)
            return logits

    by_distance = recall.accuracy_by_distance(Oracle(), x, y)
    assert by_distance[:3].tolist() == [1.0, 1.0, 1.0]


def tiny(task):
    return dataclasses.replace(
        experiments.SETUPS[task],
        d_model=8,
        heads=2,
        d_ff=8,
        steps=4,
        eval_every=2,
        test_rows=4,
        batch=2,
        n_statements=8,
        length=6,
        segment=8,
        warmup=1,
    )


@pytest.mark.parametrize("task", ["recall", "programs"])
def test_a_stopped_run_resumes_to_the_same_result(task, tmp_path):
    setup = tiny(task)
    straight = experiments.run(setup, "feedback", 0, tmp_path / "a", log=lambda m: None)
    stop = threading.Event()

    def log(message):
        stop.set()  # a signal arrives during the first evaluation (step 2)

    with pytest.raises(experiments.Stopped, match="stopped at step 2"):
        experiments.run(setup, "feedback", 0, tmp_path / "b", stop, log)
    assert (tmp_path / "b" / f"{task}-feedback-seed0.pt").is_file()
    resumed = experiments.run(setup, "feedback", 0, tmp_path / "b", log=lambda m: None)
    assert resumed["accuracy"] == pytest.approx(straight["accuracy"])
    assert resumed["curve"] == straight["curve"]
    # A finished run is read back, not trained again.
    again = experiments.run(setup, "feedback", 0, tmp_path / "b", log=print)
    assert again == json.loads((tmp_path / "b" / f"{task}-feedback-seed0.json").read_text())


def test_every_arm_builds_and_results_are_collected(tmp_path):
    setup = tiny("recall")
    for arm in experiments.ARMS:
        experiments.run(setup, arm, 1, tmp_path, log=lambda m: None)
    depth = {arm: len(getattr(setup.build(arm), "layers", [])) for arm in experiments.ARMS}
    assert depth["transformer-2x"] == 2 * depth["transformer"] == 2 * setup.n_layers
    report = experiments.collect(tmp_path, tmp_path / "out" / "results.json")
    assert sorted(r["arm"] for r in report["runs"]) == sorted(experiments.ARMS)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == report
    assert "cores" in report["machine"]


def test_a_checkpoint_of_another_setup_is_refused(tmp_path):
    setup = tiny("recall")
    stop = threading.Event()
    stop.set()
    with pytest.raises(experiments.Stopped):
        experiments.run(setup, "transformer", 0, tmp_path, stop, log=lambda m: None)
    other = dataclasses.replace(setup, lr=1e-4)
    with pytest.raises(ValueError, match="belongs to another setup"):
        experiments.run(other, "transformer", 0, tmp_path, log=lambda m: None)
    (tmp_path / "recall-transformer-seed0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        experiments.run(setup, "transformer", 0, tmp_path, log=lambda m: None)


def test_command_line_rejects_bad_values_before_work(capsys):
    for argv in (["--seeds", "0"], ["--tasks", "sorting"], ["--arms", "rnn"]):
        with pytest.raises(SystemExit) as exit:
            experiments.main(argv)
        assert exit.value.code == 2
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_stored_results_come_from_the_books_folder_and_repository(tmp_path, monkeypatch):
    import yaml
    from feedback_lib.book import stored

    config = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    assert (stored.REPOSITORY, stored.BRANCH) == (config["url"].rstrip("/"), config["branch"])
    assert stored.raw_url("book/results/x.json").startswith(
        "https://raw.githubusercontent.com/feedback-transformer-book/"
    )
    (tmp_path / "r.json").write_text('{"runs": []}')
    assert stored.stored_results("r.json", tmp_path) == {"runs": []}
    assert stored.stored_file("r.json", tmp_path) == tmp_path / "r.json"
    # A translated chapter runs one folder down (book/zh_CN/) and finds book/results/.
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "s.json").write_text("{}")
    (tmp_path / "zh_CN").mkdir()
    monkeypatch.chdir(tmp_path / "zh_CN")
    assert stored.stored_file("s.json") == Path("..") / "results" / "s.json"
    # The book's own file holds five seeds of every arm of both experiments.
    results = stored.stored_results("state_tracking.json", ROOT / "book" / "results")
    for task in experiments.SETUPS:
        for arm in experiments.ARMS:
            seeds = sorted(
                r["seed"] for r in results["runs"] if (r["task"], r["arm"]) == (task, arm)
            )
            assert seeds == [0, 1, 2, 3, 4], (task, arm)
    setups = {r["task"]: r["setup"] for r in results["runs"]}
    assert setups == {t: dataclasses.asdict(s) for t, s in experiments.SETUPS.items()}


def test_a_setup_or_arm_that_cannot_work_is_refused_before_work():
    setup = experiments.SETUPS["recall"]
    for change, message in (
        (dict(task="sorting"), "task must be"),
        (dict(span=0), "span must be a positive integer"),
        (dict(steps=2.5), "steps must be a positive integer"),
        (dict(lr=-1.0), "lr must be a float > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(setup, **change)
    with pytest.raises(ValueError, match="arm must be one of"):
        setup.build("rnn")
