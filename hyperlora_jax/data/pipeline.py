"""grain pipelines: deterministic, per-process sharded, checkpointable (get_state / set_state).

    records -> [process slice] -> [shuffle(seed), reshuffled every epoch] -> map -> batch
D2L rows are packed once from the process's items in a seeded order (the official code packs once
at preprocessing time) and the packs are then shuffled per epoch. Item builders turn records
(self-generated QA records or text QA records such as NIAH) into packable items; token shards
(`token_shards.ShardItems`) give the same items lazily, and `PackedRows` keeps only its plan.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from hyperlora_jax.data import packing
from hyperlora_jax.data.selfgen import context_ids, qa_ids_and_labels, qa_ids_and_labels_batch
from hyperlora_jax.data.sni import HierarchicalSource
from hyperlora_jax.data.storage import ErrorLog
from hyperlora_jax.errors import ConfigError, InputError
from hyperlora_jax.models.chat import ctx_affixes, tokenize_ctx_texts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderConfig:
    """How records become batches. batch_size is per process."""

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1  # None = repeat forever
    drop_remainder: bool = True
    process_index: int = 0
    process_count: int = 1
    worker_count: int = 0  # > 0: grain multiprocess prefetch (absl flags must be parsed)
    worker_buffer_size: int = 2

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.process_index < self.process_count:
            raise ConfigError(
                f"process_index={self.process_index} not in [0, process_count={self.process_count})"
            )


def process_slice(ds: grain.MapDataset, cfg: LoaderConfig) -> grain.MapDataset:
    """Every process_count-th element starting at process_index: disjoint, covering shards."""
    if cfg.process_count == 1:
        return ds
    return ds[cfg.process_index :: cfg.process_count]


def _finish(ds: grain.MapDataset, cfg: LoaderConfig) -> grain.IterDataset:
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    return ds


def _to_iter(ds: grain.MapDataset, cfg: LoaderConfig) -> grain.IterDataset:
    it = ds.to_iter_dataset()
    if cfg.worker_count > 0:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    return it


def make_dataset(
    source: Sequence,
    cfg: LoaderConfig,
    transform: Callable[[Any], Mapping[str, np.ndarray]] | None = None,
    batch_fn: Callable | None = None,
) -> grain.IterDataset:
    """A generic pipeline over a random-access source; iterate it and checkpoint its iterator."""
    ds = grain.MapDataset.source(source)
    ds = process_slice(ds, cfg)
    if len(ds) == 0:
        raise InputError(f"process {cfg.process_index} has no records (source has {len(source)})")
    ds = _finish(ds, cfg)
    if transform is not None:
        ds = ds.map(transform)
    ds = ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder, batch_fn=batch_fn)
    return _to_iter(ds, cfg)


# ----------------------------------------------------------------------------- D2L items
@dataclass(frozen=True)
class ChunkConfig:
    """Context chunking (official `split_too_long_ctx` arguments)."""

    max_chunk_len: int = -1  # <= 0: no chunking (unless num_chunk_probs is set)
    min_chunk_len: int | None = None
    num_chunk_probs: Mapping[int, float] | None = None
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **kw: Any) -> ChunkConfig:
        """Affixes from the tokenizer's chat format (hyperlora_jax.models.chat.ctx_affixes)."""

        prefix, suffix = ctx_affixes(tokenizer)
        return cls(prefix=tuple(prefix), suffix=tuple(suffix), **kw)


SELFGEN_FIELDS = ("ctx_ids", "input_ids", "response_start_end")


def selfgen_item(
    rec: Mapping, chunk: ChunkConfig, rng: random.Random, top_k: int | None = None
) -> dict:
    """A self-generated QA record (official columns) -> a packing item."""
    for f in SELFGEN_FIELDS:
        if f not in rec:
            raise InputError(f"self-gen record is missing {f!r} (has {sorted(rec)})")
    ctx_ids = [int(x) for x in np.asarray(rec["ctx_ids"]).reshape(-1)]
    if not ctx_ids:
        raise InputError("self-gen record has an empty context")
    inputs = [[int(x) for x in np.asarray(ids).reshape(-1)] for ids in rec["input_ids"]]
    spans = [tuple(int(v) for v in se) for se in rec["response_start_end"]]
    if len(spans) != len(inputs):
        raise InputError(f"{len(inputs)} QAs but {len(spans)} response spans")
    item = {
        "ctx_chunks": packing.chunk_context(
            ctx_ids,
            max_chunk_len=chunk.max_chunk_len,
            prefix=chunk.prefix,
            suffix=chunk.suffix,
            num_chunk_probs=chunk.num_chunk_probs,
            min_chunk_len=chunk.min_chunk_len,
            rng=rng,
        ),
        "input_ids": inputs,
        "labels": [packing.labels_from_span(ids, s, e) for ids, (s, e) in zip(inputs, spans)],
    }
    if "logprobs_vals" in rec and rec["logprobs_vals"] is not None:
        vals, idxs = [], []
        for j, (v, i) in enumerate(zip(rec["logprobs_vals"], rec["logprobs_indices"])):
            v, i = np.asarray(v, np.float32), np.asarray(i, np.int32)
            k = v.shape[-1] if v.ndim == 2 else (top_k or 16)
            v, i = v.reshape(-1, k), i.reshape(-1, k)
            s, e = spans[j]
            if len(v) != e - s:
                raise InputError(f"QA {j}: {len(v)} teacher log-prob rows for {e - s} tokens")
            vals.append(v)
            idxs.append(i)
        item["logprobs_vals"], item["logprobs_indices"] = vals, idxs
    return item


def document_text(ctx_ids: Sequence[int], tokenizer, keep_template: bool = False) -> str:
    """The document a self-gen record's templated context ids hold, decoded with the tokenizer
    that made them (the base model's). The chat affixes are dropped when the ids carry them, so
    the text is the document alone, as inference (`internalize --ctx-model`, one template) shows
    it to the encoder; keep_template=True decodes them too, as the official `detokenize_ctx_text`
    does (the encoder's template then wraps the base's turn markup)."""
    ids = [int(x) for x in np.asarray(ctx_ids).reshape(-1)]
    prefix, suffix = ctx_affixes(tokenizer)
    n, a, b = len(ids), len(prefix), len(suffix)
    if not keep_template and n > a + b and ids[:a] == list(prefix) and ids[n - b :] == list(suffix):
        ids = ids[a : n - b]
    return tokenizer.decode(ids)


def retokenize_contexts(
    records: Sequence[Mapping], tokenizer, ctx_tokenizer, keep_template: bool = False
) -> list[dict]:
    """Self-gen records (contexts in the base tokenizer) with their `ctx_ids` re-tokenized for a
    different context encoder: decoded with `tokenizer` (`document_text`), templated with
    `ctx_tokenizer` (official cross-model preprocessing, `construct_and_tokenize_ctx_qa`); one
    batched encode. Records without ctx_ids are left as they are (`selfgen_item` reports them)."""
    at = [i for i, r in enumerate(records) if r.get("ctx_ids") is not None]
    texts = [document_text(records[i]["ctx_ids"], tokenizer, keep_template) for i in at]
    out = [dict(r) for r in records]
    for i, ids in zip(at, tokenize_ctx_texts(texts, ctx_tokenizer)):
        out[i]["ctx_ids"] = ids
    return out


def record_rng(seed: int, index: int) -> random.Random:
    """The rng of record `index` (its chunk count), the same in every pipeline."""
    return random.Random(f"{seed}-chunks-{index}")


def build_items(
    source: Sequence[Mapping],
    make_item: Callable[[Mapping, random.Random], dict],
    *,
    seed: int = 0,
    max_qas_len: int = -1,
    max_qas_per_sample: int = -1,
    on_error: str = "raise",
    name: str = "records",
) -> list[dict]:
    """Items of every record; chunk counts are drawn once per record from (seed, index), like the
    official cached preprocessing. Bad records are reported with their index (skip / raise)."""
    errors = ErrorLog(on_error)
    items = []
    for i in range(len(source)):
        try:
            item = make_item(source[i], record_rng(seed, i))
        except (InputError, KeyError, TypeError, ValueError) as e:
            errors.report(name, i, str(e))
            continue
        items += packing.split_qas(item, max_qas_len, max_qas_per_sample)
    return items


class PackedRows:
    """Random-access packed rows over items (packs planned once, in a seeded shuffled order).

    `items` is a list of item dicts or a lazy item source (`token_shards.ShardItems`: getitem
    builds an item, `sizes` holds every item's `packing.item_sizes` as an [n, 4] array);
    `indices` picks this process's items. The plan is numpy; a row's items are built and packed
    when the row is read."""

    def __init__(
        self,
        items: Sequence[dict],
        cfg: packing.PackConfig,
        seed: int = 0,
        indices: Sequence[int] | None = None,
    ):
        idx = np.arange(len(items)) if indices is None else np.asarray(indices, np.int64)
        order = list(range(len(idx)))
        random.Random(f"{seed}-pack-order").shuffle(order)
        self._items, self._cfg = items, cfg
        self._idx = idx[order] if len(idx) else idx
        lazy_sizes = getattr(items, "sizes", None)
        if lazy_sizes is not None:
            sizes = np.asarray(lazy_sizes)[self._idx].tolist()
        else:
            sizes = [packing.item_sizes(items[int(i)]) for i in self._idx]
        plan = packing.plan_packs(sizes, cfg)
        self._members = np.fromiter((j for p in plan for j in p), np.int64)  # positions in _idx
        self._starts = np.cumsum([0] + [len(p) for p in plan])
        self.num_skipped = len(idx) - len(self._members)
        if self.num_skipped:
            log.warning("%d items exceed a packed row's limits and were left out", self.num_skipped)

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        pos = self._members[self._starts[i] : self._starts[i + 1]]
        return packing.pack_row([self._items[int(j)] for j in self._idx[pos]], self._cfg)


def make_packed_dataset(
    items: Sequence[dict], pack_cfg: packing.PackConfig, cfg: LoaderConfig
) -> grain.IterDataset:
    """Batches of packed D2L rows [batch_size, ...] for this process (items are sliced first).

    `items`: a list of item dicts, or a lazy item source (see PackedRows)."""
    local = range(cfg.process_index, len(items), cfg.process_count)
    rows = PackedRows(items, pack_cfg, seed=cfg.seed, indices=local)
    single = LoaderConfig(**{**cfg.__dict__, "process_index": 0, "process_count": 1})
    return make_dataset(rows, single)


# ----------------------------------------------------------------------------- text QA records
def text_qa_fields(rec: Mapping) -> tuple[str, list[str], list[str]]:
    """(context, prompts, responses) of a text QA record, or an InputError saying what is off."""
    ctx = rec.get("context")
    if not isinstance(ctx, str) or not ctx.strip():
        raise InputError("record has no non-empty 'context'")
    prompts = rec.get("prompts", [rec["prompt"]] if "prompt" in rec else None)
    responses = rec.get("responses", [rec["response"]] if "response" in rec else None)
    if not prompts or responses is None or len(prompts) != len(responses):
        raise InputError("record needs 'prompt'/'response' (or equal-length 'prompts'/'responses')")
    return ctx, list(prompts), [str(r) for r in responses]


def text_qa_tokens(
    records: Sequence[Mapping], tokenizer, chat_template: str | None = None
) -> list[tuple[list[int], list[tuple[list[int], list[int]]]]]:
    """What `text_qa_item` tokenizes, for many records with batched tokenizer calls (same ids):
    per record (context ids, [(input_ids, labels) per QA]); no chunking."""

    fields = [text_qa_fields(r) for r in records]
    ctx_ids = tokenize_ctx_texts([f[0] for f in fields], tokenizer)
    prompts = [p for f in fields for p in f[1]]
    qas = qa_ids_and_labels_batch(
        tokenizer, prompts, [r for f in fields for r in f[2]], chat_template
    )
    out, q = [], 0
    for ids, (_, record_prompts, _) in zip(ctx_ids, fields):
        out.append((ids, qas[q : q + len(record_prompts)]))
        q += len(record_prompts)
    return out


def text_qa_item(
    rec: Mapping,
    rng: random.Random,
    tokenizer,
    chunk: ChunkConfig,
    chat_template: str | None = None,
    ctx_tokenizer=None,
) -> dict:
    """A text record {context, prompt(s), response(s)} (e.g. NIAH) -> an item with gold-response
    labels (cross-entropy training, as the official NIAH runs). ctx_tokenizer: a separate
    context encoder's tokenizer (cross-model D2L) for the context; the QAs stay in `tokenizer`."""

    ctx, prompts, responses = text_qa_fields(rec)
    ids = context_ids(tokenizer if ctx_tokenizer is None else ctx_tokenizer, ctx, chat_template)
    inputs, labels = [], []
    for p, r in zip(prompts, responses):
        x, y = qa_ids_and_labels(tokenizer, p, str(r), chat_template)
        inputs.append(x)
        labels.append(y)
    chunks = packing.chunk_context(
        ids,
        max_chunk_len=chunk.max_chunk_len,
        prefix=chunk.prefix,
        suffix=chunk.suffix,
        num_chunk_probs=chunk.num_chunk_probs,
        min_chunk_len=chunk.min_chunk_len,
        rng=rng,
    )
    return {"ctx_chunks": chunks, "input_ids": inputs, "labels": labels}


# ----------------------------------------------------------------------------- T2L (SNI) steps
def make_sni_dataset(
    tasks: Sequence,
    cfg: LoaderConfig,
    *,
    tasks_per_step: int = 8,
    pad_to: int = 512,
    pad_id: int = 0,
) -> grain.IterDataset:
    """Batches of the official hierarchical T2L stream (k tasks x 1 example per step).

    Each process takes every process_count-th slot of a step, so its batch_size must be
    tasks_per_step / process_count; the processes' batches together form the global step. The
    order is a function of cfg.seed alone (cfg.shuffle is not used); num_epochs=None is endless.
    """

    if tasks_per_step % cfg.process_count:
        raise ConfigError(
            f"tasks_per_step={tasks_per_step} is not divisible by process_count={cfg.process_count}"
        )
    local = tasks_per_step // cfg.process_count
    if cfg.batch_size != local:
        raise ConfigError(f"batch_size must be tasks_per_step / process_count = {local}")
    src = HierarchicalSource(
        tasks,
        tasks_per_step,
        seed=cfg.seed,
        num_epochs=cfg.num_epochs or 10**9,
        pad_to=pad_to,
        pad_id=pad_id,
    )
    ds = process_slice(grain.MapDataset.source(src), cfg)
    return _to_iter(ds.batch(local, drop_remainder=True), cfg)
