"""Who can see what: the computation graphs of a Transformer and a Feedback
Transformer (chapter 1).

A node is ``(row, step)``. Row ``0`` is the token embedding and rows
``1..n_layers`` are the layers' outputs; the feedback graph has one more
row, ``n_layers + 1``, for the memory vector of each step.

* ``"transformer"``: layer ``l`` at step ``t`` attends to row ``l - 1`` at
  every step ``s <= t``.
* ``"feedback"``: layer ``l`` at step ``t`` reads its own input ``(l - 1,
  t)`` and attends to the memory ``m_s`` of every earlier step ``s < t``;
  ``m_s`` is a weighted sum of all rows at step ``s``.
"""

from __future__ import annotations

from functools import cache

from feedback_lib.checks import check_positive_int

#: The two graphs this module builds.
KINDS = ("transformer", "feedback")

Node = tuple[int, int]


def _check(kind: str, n_layers: int, n_steps: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_positive_int("n_layers", n_layers)
    check_positive_int("n_steps", n_steps)


def flow_edges(
    kind: str, n_layers: int, n_steps: int
) -> list[tuple[Node, Node]]:
    """The edges ``(source, target)`` of the graph of ``kind`` over
    ``n_steps`` steps."""
    _check(kind, n_layers, n_steps)
    edges: list[tuple[Node, Node]] = []
    memory_row = n_layers + 1
    for t in range(n_steps):
        for layer in range(1, n_layers + 1):
            if kind == "transformer":
                edges += [
                    ((layer - 1, s), (layer, t)) for s in range(t + 1)
                ]
            else:
                edges.append(((layer - 1, t), (layer, t)))
                edges += [((memory_row, s), (layer, t)) for s in range(t)]
        if kind == "feedback":
            edges += [
                ((row, t), (memory_row, t)) for row in range(n_layers + 1)
            ]
    return edges


def _parents(
    kind: str, n_layers: int, n_steps: int
) -> dict[Node, list[Node]]:
    """For each node, the nodes with an edge into it."""
    parents: dict[Node, list[Node]] = {}
    for source, target in flow_edges(kind, n_layers, n_steps):
        parents.setdefault(target, []).append(source)
    return parents


def ancestors(
    kind: str, n_layers: int, n_steps: int, node: Node
) -> set[Node]:
    """Every node whose value can change the value of ``node`` (``node``
    excluded)."""
    parents = _parents(kind, n_layers, n_steps)
    seen: set[Node] = set()
    todo = [node]
    while todo:
        for parent in parents.get(todo.pop(), []):
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def computation_depth(kind: str, n_layers: int, n_steps: int) -> list[int]:
    """For each step ``t``, the most layers on one path into the top layer's
    output ``(n_layers, t)``.

    This is how many nonlinear layer applications the model can chain before
    it predicts the next token: ``n_layers`` for every step of a
    Transformer, ``n_layers * (t + 1)`` for a Feedback Transformer.
    """
    parents = _parents(kind, n_layers, n_steps)

    @cache
    def depth(node: Node) -> int:
        own = 1 if 1 <= node[0] <= n_layers else 0
        return own + max(
            (depth(p) for p in parents.get(node, [])), default=0
        )

    # Steps in order, so the recursion depth stays small.
    return [depth((n_layers, t)) for t in range(n_steps)]
