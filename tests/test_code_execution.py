"""The code-execution task: programs, their interpreter, batches, accuracy and the training helper."""

import feedback_lib as fl
import pytest
import torch
from feedback_lib.tasks import code_execution as ce


def test_programs_are_deterministic_and_stay_in_range():
    assert ce.make_program(20, 7) == ce.make_program(20, 7)
    assert ce.make_program(20, 7) != ce.make_program(20, 8)
    for seed in range(200):
        program = ce.make_program(30, seed)
        numbers = [int(t) for t in program.tokens if t.isdigit()]
        assert numbers and all(1 <= v <= 10 for v in numbers)
        assert program.tokens[program.printed[-1] - 3] == "print"  # the last statement prints


def test_an_independent_interpreter_agrees_with_every_printed_value():
    for n in (1, 5, 30):
        for seed in range(300):
            program = ce.make_program(n, seed)
            assert ce.run_program(program.tokens) == [
                int(program.tokens[i]) for i in program.printed
            ]


def test_every_statement_kind_occurs():
    tokens = [t for seed in range(50) for t in ce.make_program(20, seed).tokens]
    for token in ("=", "++", "--", "if", "<", ">", ":", "print"):
        assert token in tokens


def test_text_shows_one_statement_per_line():
    program = ce.make_program(6, 3)
    lines = program.text().splitlines()
    assert lines[:3] == [" ".join(program.tokens[i : i + 4]) for i in (0, 4, 8)]
    printed = [line for line in lines if line.startswith("print")]
    assert [line.split("-> ")[1] for line in printed] == [
        program.tokens[i] for i in program.printed
    ]


def test_batches_score_only_the_printed_values():
    x, y = ce.batch(5, 12, first_seed=40)
    assert x.shape == y.shape and x.dtype == y.dtype == torch.long
    for row in range(5):
        program = ce.make_program(12, 40 + row)
        scored = (y[row] != ce.IGNORE).nonzero()[:, 0]
        assert (scored + 1).tolist() == list(program.printed)
        assert all(ce.VOCAB[y[row, i]] == program.tokens[i + 1] for i in scored.tolist())
        inputs = [ce.VOCAB[i] for i in x[row].tolist()]
        n = len(program.tokens)  # the input drops the last column of the padded batch
        assert inputs[:n] == list(program.tokens[: x.shape[1]]) and set(inputs[n:]) <= {"<pad>"}


def test_varied_lengths_are_deterministic_and_bounded():
    x, y = ce.batch(40, 9, first_seed=0, vary_length=True)
    assert torch.equal(x, ce.batch(40, 9, first_seed=0, vary_length=True)[0])
    prints = [(row == ce.TOKEN_ID["print"]).sum().item() for row in x]
    lengths = {(row != ce.PAD).sum().item() for row in x}
    assert len(lengths) > 5 and x.shape[1] < ce.batch(40, 9, first_seed=0)[0].shape[1] + 30
    assert min(prints) >= 1


def test_all_targets_score_every_next_token_but_the_padding():
    x, y = ce.batch(4, 6, 0, vary_length=True, targets="all")
    x_printed, y_printed = ce.batch(4, 6, 0, vary_length=True)
    assert torch.equal(x, x_printed)
    scored = y != ce.IGNORE
    for row in range(4):
        n = len(ce.make_program(ce.varied_length(row, 6), row).tokens)
        assert scored[row].sum() == n - 1 and not scored[row, n - 1 :].any()
        assert torch.equal(
            y[row, : n - 1],
            torch.tensor(
                [ce.TOKEN_ID[t] for t in ce.make_program(ce.varied_length(row, 6), row).tokens[1:]]
            ),
        )
    assert (y_printed[y_printed != ce.IGNORE] == y[y_printed != ce.IGNORE]).all()
    with pytest.raises(ValueError, match="targets must be one of"):
        ce.batch(2, 3, 0, targets="values")


def test_varied_lengths_are_independent_of_the_programs():
    # Regression: a length drawn from random.Random(-seed) repeated the program's own first draw,
    # so every 1-statement training program started with x = 1 or 2.
    first_x = {n: set() for n in (1, 5)}
    for seed in range(3000):
        n = ce.varied_length(seed, 5)
        if n in first_x:
            first_x[n].add(ce.make_program(n, seed).tokens[2])
    assert all(len(values) == 10 for values in first_x.values())


def test_accuracy_counts_printed_values():
    class Oracle(torch.nn.Module):
        """Puts all its logit on the true next token of the held-out programs."""

        def forward(self, x):
            _, y = ce.batch(x.shape[0], 8, self.seed)
            self.seed += x.shape[0]
            return torch.nn.functional.one_hot(y.clamp(min=0), len(ce.VOCAB)).float()

    oracle = Oracle()
    oracle.seed = ce.HELD_OUT_SEED
    assert ce.accuracy(oracle, 10, 8, chunk=4) == 1.0
    oracle.seed = ce.HELD_OUT_SEED
    by_updates = ce.accuracy_by_updates(oracle, 64, 8)
    n_prints = sum(len(ce.make_program(8, ce.HELD_OUT_SEED + s).printed) for s in range(64))
    assert sum(n for _, n in by_updates.values()) == n_prints
    assert all(acc == 1.0 for acc, _ in by_updates.values()) and list(by_updates) == sorted(
        by_updates
    )
    assert 0.05 < ce.chance_accuracy(500, 8) < 0.3


def test_updates_since_assignment_counts_what_could_change_the_value():
    tokens = (
        "x = 3 ; y = 2 ; z = 1 ; x ++ ; if x > 2 : x -- ; if y > 5 : x = 9 ; print x ; 3 "
        "print y ; 2 if z < 2 : x = 7 ; print x ; 7"
    ).split()
    assert ce.run_program(tokens) == [3, 2, 7]
    # x: ++, a conditional -- that ran and a conditional assignment that did not; y: none;
    # x again after a conditional assignment that ran.
    assert ce.updates_since_assignment(tokens) == [3, 0, 0]


def test_training_lowers_the_loss_and_reports_accuracy():
    torch.manual_seed(0)
    model = fl.FeedbackLM(len(ce.VOCAB), d_model=16, heads=2, n_layers=1, d_ff=32)
    history = ce.train(
        model,
        steps=30,
        batch_size=8,
        n_statements=3,
        lr=1e-2,
        warmup_steps=5,
        eval_every=15,
        eval_programs=16,
    )
    assert history.eval_step == [15, 30] and len(history.loss) == 30 and history.seconds > 0
    assert sum(history.loss[-5:]) < sum(history.loss[:5])
    assert all(0 <= a <= 1 for a in history.eval_accuracy)
    assert not model.training


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_statements must be a positive integer"):
        ce.make_program(0, 1)
    with pytest.raises(ValueError, match="print_prob"):
        ce.make_program(3, 1, print_prob=1.5)
    model = fl.FeedbackLM(len(ce.VOCAB), d_model=16, heads=2, n_layers=1, d_ff=32)
    with pytest.raises(ValueError, match="held-out programs"):
        ce.train(model, steps=10, batch_size=10**8, n_statements=3)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        ce.train(model, steps=0, batch_size=4, n_statements=3)
