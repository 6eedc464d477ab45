"""The context-blind floor of D2L training data: the loss of a model that never reads the document.

Such a model can still learn every query's answer distribution from the training set (for 16
NIAH records with one shared question, it memorises the 16 answers: teacher forcing identifies
the record after a digit or two). Its best possible loss is the empirical conditional entropy of
each answer token given the query and the answer tokens before it, counted over the data. A run
whose loss sits at this floor has learned the format and the answer statistics but nothing from
the context; only the adapter can take the loss below it (fresh NIAH data: 4 uniform digits and
an end-of-turn token, ln(10) * 4 / 5 = 1.84 nats per label token).

The floor is normalised like the D2L loss (`train/d2l_loss.py`): mean over a QA's label
tokens, mean over a context's QAs, mean over contexts.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

IGNORE_INDEX = -100


def _split(input_ids: Sequence[int], labels: Sequence[int]) -> tuple[tuple, tuple]:
    """(query: the ids before the first label, answer: the label tokens in order)."""
    pos = [i for i, y in enumerate(labels) if int(y) != IGNORE_INDEX]
    if not pos:
        return tuple(int(x) for x in input_ids), ()
    return tuple(int(x) for x in input_ids[: pos[0]]), tuple(int(labels[i]) for i in pos)


def context_blind_floor(contexts: Iterable[Sequence[tuple[Sequence[int], Sequence[int]]]]) -> float:
    """The floor in nats per label token for contexts given as lists of (input_ids, labels) QAs.

    Counts every (query, answer prefix) -> next answer token over all QAs, then scores each QA
    with those empirical probabilities. Contexts without label tokens are skipped.
    """
    qas = [[_split(x, y) for x, y in ctx] for ctx in contexts]
    counts: dict[tuple, Counter] = defaultdict(Counter)
    for ctx in qas:
        for query, answer in ctx:
            for j, tok in enumerate(answer):
                counts[(query, answer[:j])][tok] += 1
    totals = {k: sum(c.values()) for k, c in counts.items()}
    per_ctx = []
    for ctx in qas:
        per_qa = []
        for query, answer in ctx:
            if not answer:
                continue
            nll = 0.0
            for j, tok in enumerate(answer):
                key = (query, answer[:j])
                nll -= math.log(counts[key][tok] / totals[key])
            per_qa.append(nll / len(answer))
        if per_qa:
            per_ctx.append(sum(per_qa) / len(per_qa))
    if not per_ctx:
        return float("nan")
    return sum(per_ctx) / len(per_ctx)


FLOOR_SAMPLE = 50_000  # items: enough for a stable floor, a few seconds to count


def items_floor(items: Sequence[dict], max_items: int = FLOOR_SAMPLE) -> float:
    """`context_blind_floor` of D2L packing items ({"input_ids": [...], "labels": [...]}), over at
    most max_items evenly spaced ones (a large set's floor is its answers' entropy, which such a
    sample estimates closely: 640,000 NIAH records, 1.796 over all, 1.782 from 50,000)."""
    step = max(1, -(-len(items) // max_items))
    picked = (items[i] for i in range(0, len(items), step))
    return context_blind_floor(list(zip(it["input_ids"], it["labels"])) for it in picked)
