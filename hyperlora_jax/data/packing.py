"""D2L training items and packing: chunk sampling, (context, QAs) items, fixed-size packed rows.

An *item* is one context with its QAs (official `max_qas_per_sample` splitting applied):
    {"ctx_chunks": [ids, ...], "input_ids": [ids, ...], "labels": [ids, ...] (-100 = no loss),
     optionally "logprobs_vals"/"logprobs_indices": [[n_label_tokens_i, K], ...]}
Packing (official `pack_data_points_by_length`, greedy and sequential) puts several items into
one fixed-size row. Row layout (all numpy, fixed shapes; ids are local to the row):
  student side [T]:  input_ids, positions (restart per QA), segment_ids (QA number 1.., 0 = pad),
                     labels (unshifted, -100 = no loss), qa_index (QA slot, 0 on pad),
                     adapter_index (context slot of each token: selects its LoRA, 0 on pad),
                     logprobs_vals / logprobs_indices [T, K] at label positions (0 elsewhere)
  context side [Tc]: ctx_ids, ctx_positions (restart per chunk), ctx_segment_ids (chunk number 1..)
  per slot:          chunk_context [max_chunks] (context of each chunk, -1 = none),
                     n_ctx_chunks / n_queries [max_contexts], qa_context [max_qas] (-1 = none),
                     num_contexts [] (contexts in the row)
`global_indices` turns the row-local slots of a batch into batch-global ones.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hyperlora_jax.errors import ConfigError, InputError
from hyperlora_jax.models.chat import slice_into_chunks

IGNORE_INDEX = -100

# Official stage-2 / NIAH chunk-count distribution: 1 chunk 0.5, 2 chunks 0.125, 3..8 0.0625 each.
OFFICIAL_NUM_CHUNK_PROBS = {1: 0.5, 2: 0.125, **{k: 0.0625 for k in range(3, 9)}}


# ----------------------------------------------------------------------------- chunking
def sample_num_chunks(
    n_tokens: int,
    rng: random.Random,
    num_chunk_probs: Mapping[int, float],
    max_chunk_len: int,
    min_chunk_len: int | None = None,
) -> int:
    """Official training rule: k in num_chunk_probs with ceil(n/max_len) <= k <= ceil(n/min_len),
    drawn with random.choices by weight. Falls back to ceil(n/max_len) if no candidate is left."""
    min_required = max(1, math.ceil(n_tokens / max_chunk_len)) if max_chunk_len > 0 else 1
    cands = dict(num_chunk_probs)
    if min_chunk_len:
        max_split = math.ceil(n_tokens / min_chunk_len)
        cands = {k: v for k, v in cands.items() if 0 < k <= max_split}
    cands = {k: v for k, v in cands.items() if k >= min_required}
    if not cands or sum(cands.values()) <= 0:
        return min_required
    return rng.choices(list(cands), weights=list(cands.values()), k=1)[0]


def choose_num_chunks(
    n_tokens: int,
    *,
    max_chunk_len: int,
    num_chunk_probs: Mapping[int, float] | None = None,
    min_chunk_len: int | None = None,
    rng: random.Random | None = None,
) -> int:
    """How many chunks `chunk_context` cuts a context of n_tokens into (sampled in training)."""
    if max_chunk_len <= 0 and num_chunk_probs is None:
        return 1
    if num_chunk_probs is not None:
        if rng is None:
            raise ConfigError("chunk sampling with num_chunk_probs needs an rng")
        return sample_num_chunks(n_tokens, rng, num_chunk_probs, max_chunk_len, min_chunk_len)
    return math.ceil(n_tokens / max_chunk_len)


def chunk_context(
    ctx_ids: Sequence[int],
    *,
    max_chunk_len: int,
    prefix: Sequence[int] = (),
    suffix: Sequence[int] = (),
    num_chunk_probs: Mapping[int, float] | None = None,
    min_chunk_len: int | None = None,
    rng: random.Random | None = None,
) -> list[list[int]]:
    """Chunks of one context: sampled count (training, with num_chunk_probs) or ceil(n/max_len)."""
    k = choose_num_chunks(
        len(ctx_ids),
        max_chunk_len=max_chunk_len,
        num_chunk_probs=num_chunk_probs,
        min_chunk_len=min_chunk_len,
        rng=rng,
    )
    return slice_into_chunks(ctx_ids, k, prefix, suffix)


# ----------------------------------------------------------------------------- items
def labels_from_span(input_ids: Sequence[int], start: int, end: int) -> list[int]:
    """Official `get_labels_from_input_ids`: tokens in [start, end) supervised, -100 elsewhere."""
    n = len(input_ids)
    if not 0 <= start <= end <= n:
        raise InputError(f"response span ({start}, {end}) outside a sequence of {n} tokens")
    return [IGNORE_INDEX] * start + list(input_ids[start:end]) + [IGNORE_INDEX] * (n - end)


def split_qa_groups(
    lengths: Sequence[int], max_qas_len: int = -1, max_qas_per_sample: int = -1
) -> list[list[int]]:
    """Official `split_too_long_qas` on QA lengths: the QA indices of each resulting item (at most
    max_qas_per_sample QAs and max_qas_len student tokens; single QAs longer are dropped)."""
    n_qa, total = len(lengths), sum(lengths)
    if (max_qas_len < 0 or total <= max_qas_len) and (
        max_qas_per_sample < 0 or n_qa <= max_qas_per_sample
    ):
        return [list(range(n_qa))]
    out, cur, cur_len = [], [], 0
    for i, n in enumerate(lengths):
        if max_qas_len > 0 and n > max_qas_len:
            continue
        fits = (max_qas_len < 0 or cur_len + n <= max_qas_len) and (
            max_qas_per_sample < 0 or len(cur) < max_qas_per_sample
        )
        if not fits and cur:
            out.append(cur)
            cur, cur_len = [], 0
        cur.append(i)
        cur_len += n
    if cur:
        out.append(cur)
    return out


def split_qas(item: dict, max_qas_len: int = -1, max_qas_per_sample: int = -1) -> list[dict]:
    """Official `split_too_long_qas`: one context's QAs into several items (`split_qa_groups`)."""
    qa_keys = [k for k in ("input_ids", "labels", "logprobs_vals", "logprobs_indices") if k in item]
    n_qa = len(item["input_ids"])
    groups = split_qa_groups([len(x) for x in item["input_ids"]], max_qas_len, max_qas_per_sample)
    if len(groups) == 1 and len(groups[0]) == n_qa:
        return [item]
    rest = {k: v for k, v in item.items() if k not in qa_keys}
    return [{**rest, **{k: [item[k][i] for i in idx] for k in qa_keys}} for idx in groups]


# ----------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class PackConfig:
    """Fixed sizes of a packed row (official: max_packed_inp_len / max_packed_ctx_len)."""

    max_inp_len: int = 4096
    max_ctx_len: int = 4096
    max_contexts: int = 16
    max_chunks: int = 64
    max_qas: int = 64
    top_k: int = 16  # teacher log-probs per label token (0 = none)

    def __post_init__(self):
        for name in ("max_inp_len", "max_ctx_len", "max_contexts", "max_chunks", "max_qas"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"PackConfig.{name} must be positive, got {getattr(self, name)}")


def item_sizes(item: dict) -> tuple[int, int, int, int]:
    """(student tokens, context tokens, chunks, QAs) of an item."""
    return (
        sum(len(x) for x in item["input_ids"]),
        sum(len(x) for x in item["ctx_chunks"]),
        len(item["ctx_chunks"]),
        len(item["input_ids"]),
    )


def plan_packs(sizes: Sequence[tuple[int, int, int, int]], cfg: PackConfig) -> list[list[int]]:
    """Greedy sequential grouping of item indices (official `pack_data_points_by_length`, plus the
    slot limits of fixed rows). An item that alone exceeds a limit is left out."""
    packs: list[list[int]] = []
    cur: list[int] = []
    tot = [0, 0, 0, 0]
    lim = (cfg.max_inp_len, cfg.max_ctx_len, cfg.max_chunks, cfg.max_qas)
    for i, s in enumerate(sizes):
        if any(x > m for x, m in zip(s, lim)):
            continue
        new = [a + b for a, b in zip(tot, s)]
        if cur and (any(x > m for x, m in zip(new, lim)) or len(cur) >= cfg.max_contexts):
            packs.append(cur)
            cur, new = [], list(s)
        cur.append(i)
        tot = new
    if cur:
        packs.append(cur)
    return packs


def pack_row(items: Sequence[dict], cfg: PackConfig) -> dict[str, np.ndarray]:
    """Materialise one packed row (layout in the module docstring) from items that fit cfg."""
    T, Tc, K = cfg.max_inp_len, cfg.max_ctx_len, max(cfg.top_k, 1)
    i32 = np.int32
    row = {
        "input_ids": np.zeros(T, i32),
        "positions": np.zeros(T, i32),
        "segment_ids": np.zeros(T, i32),
        "labels": np.full(T, IGNORE_INDEX, i32),
        "qa_index": np.zeros(T, i32),
        "adapter_index": np.zeros(T, i32),
        "ctx_ids": np.zeros(Tc, i32),
        "ctx_positions": np.zeros(Tc, i32),
        "ctx_segment_ids": np.zeros(Tc, i32),
        "chunk_context": np.full(cfg.max_chunks, -1, i32),
        "n_ctx_chunks": np.zeros(cfg.max_contexts, i32),
        "n_queries": np.zeros(cfg.max_contexts, i32),
        "qa_context": np.full(cfg.max_qas, -1, i32),
        "num_contexts": np.array(len(items), i32),
    }
    has_lp = cfg.top_k > 0 and all("logprobs_vals" in it for it in items)
    if has_lp:
        row["logprobs_vals"] = np.zeros((T, K), np.float32)
        row["logprobs_indices"] = np.zeros((T, K), i32)
    if len(items) > cfg.max_contexts:
        raise InputError(f"{len(items)} contexts > max_contexts={cfg.max_contexts}")
    t = tc = q = ch = 0
    for c, it in enumerate(items):
        for chunk in it["ctx_chunks"]:
            n = len(chunk)
            if tc + n > Tc or ch >= cfg.max_chunks:
                raise InputError("item does not fit the row's context side; use plan_packs")
            row["ctx_ids"][tc : tc + n] = chunk
            row["ctx_positions"][tc : tc + n] = np.arange(n)
            row["ctx_segment_ids"][tc : tc + n] = ch + 1
            row["chunk_context"][ch] = c
            tc += n
            ch += 1
        row["n_ctx_chunks"][c] = len(it["ctx_chunks"])
        row["n_queries"][c] = len(it["input_ids"])
        for j, ids in enumerate(it["input_ids"]):
            n = len(ids)
            if t + n > T or q >= cfg.max_qas:
                raise InputError("item does not fit the row's student side; use plan_packs")
            labels = np.asarray(it["labels"][j], i32)
            if len(labels) != n:
                raise InputError(f"labels ({len(labels)}) and input_ids ({n}) lengths differ")
            row["input_ids"][t : t + n] = ids
            row["positions"][t : t + n] = np.arange(n)
            row["segment_ids"][t : t + n] = q + 1
            row["labels"][t : t + n] = labels
            row["qa_index"][t : t + n] = q
            row["adapter_index"][t : t + n] = c
            row["qa_context"][q] = c
            if has_lp:
                pos = t + np.nonzero(labels != IGNORE_INDEX)[0]
                vals = np.asarray(it["logprobs_vals"][j], np.float32).reshape(-1, K)
                idx = np.asarray(it["logprobs_indices"][j], i32).reshape(-1, K)
                if len(vals) != len(pos):
                    raise InputError(
                        f"{len(vals)} teacher log-prob rows for {len(pos)} label tokens"
                    )
                row["logprobs_vals"][pos] = vals
                row["logprobs_indices"][pos] = idx
            t += n
            q += 1
    return row


def pack_items(items: Sequence[dict], cfg: PackConfig) -> list[dict[str, np.ndarray]]:
    """plan_packs + pack_row over a list of items."""
    plan = plan_packs([item_sizes(it) for it in items], cfg)
    return [pack_row([items[i] for i in p], cfg) for p in plan]


def global_indices(batch: Mapping, cfg: PackConfig):
    """Batch-global slots for a batch of rows [B, ...] (numpy or jax arrays):

    adapter_index [B, T] into the B*max_contexts per-context adapters (for
    `forward(adapter_index=...)`), qa_ids [B, T] in [0, B*max_qas), ctx_ids [B, T], and
    qa_context [B*max_qas] / chunk_context [B*max_chunks] (-1 = unused) in global numbering.
    """
    if isinstance(batch["adapter_index"], np.ndarray):
        xp = np
    else:  # jax only when given jax arrays: the data workers (niah_tokens, shards) never load it
        import jax.numpy as xp
    b = batch["adapter_index"].shape[0]
    rows = xp.arange(b)[:, None]
    ad = batch["adapter_index"] + rows * cfg.max_contexts
    qa = batch["qa_index"] + rows * cfg.max_qas

    def glob(x):
        return xp.where(x >= 0, x + rows * cfg.max_contexts, -1).reshape(-1)

    return {
        "adapter_index": ad,
        "ctx_ids": ad,
        "qa_ids": qa,
        "qa_context": glob(batch["qa_context"]),
        "chunk_context": glob(batch["chunk_context"]),
    }


def check_label_budget(batch, max_label_len: int | None) -> None:
    """Host-side check that no row of a batch has more loss positions than the LM head is
    computed for (train.max_label_len; 0 / None: every position, nothing to check).

    batch: numpy rows with "labels" [B, T] (D2L; -100 = no loss) or "loss_mask" [B, T] (T2L).
    Raises InputError naming the row; call it where batches are made (the loss cannot raise).
    """

    if not max_label_len:
        return
    if "labels" in batch:
        supervised = np.asarray(batch["labels"]) >= 0
    else:
        supervised = np.asarray(batch["loss_mask"]).astype(bool)
    # the first token is never predicted (the logits at t predict t + 1)
    counts = supervised[:, 1:].sum(axis=1)
    worst = int(np.argmax(counts))
    if counts[worst] > max_label_len:
        raise InputError(
            f"row {worst} of the batch has {int(counts[worst])} label tokens > "
            f"train.max_label_len={max_label_len} (the LM head runs only at that many positions "
            "per row); raise train.max_label_len (0: every position) or pack fewer queries per row"
        )
