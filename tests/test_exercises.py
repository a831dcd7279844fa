"""The build-it-yourself exercises (feedback_lib/book/exercises.py) on the chapters' own cells.

Each chapter from 2 to 7 and 9 ends with a skeleton cell, a worked solution (a cell tagged
``solution``) and a check cell that calls ``fl.book.exercises.check_*``. Here every check must
pass on the worked solution, fail on the untouched skeleton with "not written yet", and fail on
wrong answers (the worked solution with one mistake put in) with a message that names what is off.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import feedback_lib as fl
import numpy as np
import pytest
import torch
from feedback_lib.book import exercises

ROOT = Path(__file__).resolve().parents[1]
CHECK = re.compile(r"^fl\.book\.exercises\.(check_\w+)\((\w+)\)$")

#: Per chapter: mistakes put into the worked solution (a text replaced by another) and what the
#: verdict must then say.
MISTAKES = {
    "02_score_decomposition": [
        ("u_k_table[-seq_len:]", "u_k_table[:seq_len]", "term B is off by up to"),
        ('"hd,jbhd->jbh", u_q, k', '"bhd,jbhd->jbh", q, k', "term C is off by up to"),
    ],
    "03_attention_numpy": [
        ("/ np.sqrt(d_k)", "/ d_k", "the weights a is off by up to"),
        ("a[j, b, h] = e[j] / sum(e)", "a[j, b, h] = e[j]", "the weights a is off by up to"),
    ],
    "04_attention_pytorch": [
        ("softmax(scores, dim=0)", "softmax(scores, dim=-1)", "the output is off by up to"),
        (
            "(query @ attn.query.linear.weight.T)",
            "(query @ attn.query.linear.weight.T.detach())",
            "query.linear.weight gets no gradient from the output",
        ),
    ],
    "05_feedback_transformer": [
        ("start = 0 if mem_len is None else", "start = 0 if True else", "out at step 4 is off"),
        ("s * row for", "row / len(rows) for", "out at step 1 is off"),
    ],
    "06_stack": [
        ("return memory[start:end]", "return memory[start:end].clone()", "read 0 is a copy"),
        (
            "grad_last = grad[rows].clone() if",
            "grad_last = None if",
            "no gradient reaches the rows",
        ),
        (
            "ctx.gradient.get(grad_output)",
            "grad_output.new_zeros(64, *grad_output.shape[1:])",
            "the gradient of the rows is off by up to",
        ),
    ],
    "07_shared_kv": [
        ("model.key(mem)", "model.key(x)", "key at step 0 is off by up to"),
        ("x = layer(x, keys, values)", "x = layer(x, None, None)", "top at step 1 is off"),
    ],
    "09_generation": [
        (
            "logits, self.memory = self.lm(tokens, self.memory, return_memory=True)",
            "self.memory = tokens if self.memory is None else torch.cat([self.memory, tokens], 1)"
            "\n        logits = self.lm(self.memory)",
            "ran the transformer on 5 tokens, but only 1 of them new",
        ),
        ("return logits[:, -1]", "return logits[:, 0]", "the logits after call 0"),
    ],
}


def exercise(name: str) -> tuple[str, str, str, str]:
    """The chapter's (skeleton, worked solution, check function, name checked)."""
    cells = json.loads((ROOT / "book" / f"{name}.ipynb").read_text())["cells"]
    code = [
        (i, "".join(c["source"]), c["metadata"].get("tags", []))
        for i, c in enumerate(cells)
        if c["cell_type"] == "code"
    ]
    checks = [(i, CHECK.match(src)) for i, src, _ in code if CHECK.match(src)]
    assert len(checks) == 1, f"{name}: expected one check cell, found {len(checks)}"
    at, match = checks[0]
    before = [(src, tags) for i, src, tags in code if i < at]
    solution, tags = before[-1]
    skeleton, skeleton_tags = before[-2]
    assert "solution" in tags, f"{name}: the cell before the check must be the worked solution"
    assert "solution" not in skeleton_tags and "NotImplementedError" in skeleton, (
        f"{name}: the skeleton (with NotImplementedError) must come before the solution"
    )
    return skeleton, solution, match.group(1), match.group(2)


def run(source: str, check: str, defined: str) -> exercises.Verdict:
    namespace = {"np": np, "torch": torch, "fl": fl}
    exec(compile(source, "<exercise>", "exec"), namespace)
    return getattr(exercises, check)(namespace[defined])


@pytest.mark.parametrize("name", MISTAKES)
def test_the_worked_solution_passes_and_the_skeleton_does_not(name):
    skeleton, solution, check, defined = exercise(name)
    verdict = run(solution, check, defined)
    assert verdict, str(verdict)
    assert str(verdict).startswith(f"✓ {defined} is correct")
    untouched = run(skeleton, check, defined)
    assert not untouched
    assert "is not written yet: replace `raise NotImplementedError`" in str(untouched)


@pytest.mark.parametrize(
    "name, mistake",
    [(name, mistake) for name, mistakes in MISTAKES.items() for mistake in mistakes],
    ids=lambda value: value if isinstance(value, str) else value[2][:40],
)
def test_a_wrong_answer_fails_with_a_useful_message(name, mistake):
    _, solution, check, defined = exercise(name)
    old, new, message = mistake
    assert old in solution, f"{name}: the worked solution no longer contains {old!r}"
    verdict = run(solution.replace(old, new), check, defined)
    assert not verdict
    assert str(verdict).startswith(f"✗ {defined} is not right yet:")
    assert message in str(verdict), str(verdict)
    assert "(case: " in str(verdict)


def test_compare_names_the_shape_the_step_and_the_entry():
    expected = np.zeros((3, 2))
    with pytest.raises(exercises.Mismatch, match=r"x has shape \[2, 3\], expected \[3, 2\]"):
        exercises.compare("x", np.zeros((2, 3)), expected)
    with pytest.raises(exercises.Mismatch, match=r"x is None; expected an array of shape \[3, 2\]"):
        exercises.compare("x", None, expected)
    with pytest.raises(exercises.Mismatch, match=r"NaN or infinite entry at \(1, 0\)"):
        exercises.compare("x", np.array([[0, 0], [np.nan, 0], [0, 0]]), expected)
    wrong = expected.copy()
    wrong[1:, 1] = [0.5, 2.0]
    with pytest.raises(
        exercises.Mismatch, match=r"x at step 1 is off by up to 0.5 at index \(1,\)"
    ):
        exercises.compare("x", wrong, expected, steps=True)
    exercises.compare("x", torch.zeros(3, 2), expected)  # tensors are compared too


def test_an_error_in_the_readers_code_is_reported_not_raised():
    def broken(q, k, u_q, u_k_table, s_table):
        return {"A": q @ k}  # shapes do not fit

    verdict = exercises.check_score_terms(broken)
    assert "broken raised ValueError" in str(verdict)
    assert exercises.check_score_terms(lambda *args: {"A": 0}).problem
    assert "subclass of torch.autograd.Function" in str(exercises.check_stack_function(len))
