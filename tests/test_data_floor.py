"""The context-blind floor: the empirical conditional entropy of answers given the query."""

import itertools
import math

import pytest

from hyperlora_jax.data.floor import context_blind_floor, items_floor

X = -100


def _qa(query, answer):
    return list(query) + list(answer), [X] * len(query) + list(answer)


def test_floor_by_hand():
    q = [1, 2]
    ctxs = [[_qa(q, [5, 6, 9])], [_qa(q, [5, 7, 9])], [_qa(q, [8, 6, 9])]]
    shared = (-math.log(2 / 3) - math.log(1 / 2)) / 3  # the last token is certain
    want = (2 * shared + (-math.log(1 / 3)) / 3) / 3
    assert context_blind_floor(ctxs) == pytest.approx(want, abs=1e-12)


def test_queries_are_separate_and_qas_average_within_a_context():
    a, b = _qa([1], [5]), _qa([2], [6])
    assert context_blind_floor([[a], [b]]) == 0.0  # each query has one answer
    ctx = [_qa([1], [5]), _qa([1], [6])]
    assert context_blind_floor([ctx]) == pytest.approx(math.log(2))


def test_fresh_niah_answers_sit_at_4_ln10_over_5():
    """Every 4-digit needle once, then end-of-turn: uniform digits, a certain end token."""
    end = 99
    ctxs = [[_qa([7, 7], [*map(int, d), end])] for d in itertools.product("0123456789", repeat=4)]
    assert context_blind_floor(ctxs) == pytest.approx(4 * math.log(10) / 5, abs=1e-9)


def test_items_floor_reads_packing_items():
    items = [{"ctx_chunks": [[3]], "input_ids": [x], "labels": [y]} for x, y in [_qa([1], [5])]]
    assert items_floor(items) == 0.0
    assert math.isnan(items_floor([{"input_ids": [[1, 2]], "labels": [[X, X]]}]))
