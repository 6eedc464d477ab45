"""grain pipelines: per-process shards, seeded order, exact resume from iterator state, packed
D2L rows from self-gen records, and multiprocess prefetch giving the same batches."""

import numpy as np
import pytest

from hyperlora_jax.data import packing, pipeline
from hyperlora_jax.errors import ConfigError, InputError

SOURCE = [{"i": np.int32(i)} for i in range(23)]


def _ids(ds):
    return [b["i"].tolist() for b in ds]


def test_two_processes_see_disjoint_shards_covering_the_data():
    seen = []
    for p in (0, 1):
        cfg = pipeline.LoaderConfig(
            batch_size=3, seed=1, drop_remainder=False, process_index=p, process_count=2
        )
        seen.append(sum(_ids(pipeline.make_dataset(SOURCE, cfg)), []))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(23))


def test_same_seed_same_order_and_epochs_reshuffle():
    cfg = pipeline.LoaderConfig(batch_size=4, seed=7, num_epochs=2)
    a, b = _ids(pipeline.make_dataset(SOURCE, cfg)), _ids(pipeline.make_dataset(SOURCE, cfg))
    assert a == b
    other = _ids(pipeline.make_dataset(SOURCE, pipeline.LoaderConfig(batch_size=4, seed=8)))
    assert a[: len(other)] != other
    flat = sum(a, [])
    assert flat[:20] != flat[23:43]  # epoch 2 has its own order


def test_restoring_iterator_state_yields_exactly_the_remaining_batches():
    cfg = pipeline.LoaderConfig(batch_size=4, seed=3, num_epochs=2)
    ds = pipeline.make_dataset(SOURCE, cfg)
    it = iter(ds)
    for _ in range(7):  # past the first epoch boundary (5 batches per epoch)
        next(it)
    state = it.get_state()
    rest = [b["i"].tolist() for b in it]
    it2 = iter(pipeline.make_dataset(SOURCE, cfg))
    it2.set_state(state)
    assert [b["i"].tolist() for b in it2] == rest and len(rest) == 4


def _selfgen_records(n=12, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for c in range(n):
        ctx = [1000 + c] + rng.integers(3, 90, int(rng.integers(10, 60))).tolist()
        ids, spans, vals, idx = [], [], [], []
        for _ in range(int(rng.integers(1, 4))):
            L = int(rng.integers(6, 20))
            s = int(rng.integers(2, L - 1))
            ids.append(rng.integers(3, 90, L).astype(np.int32))
            spans.append([s, L])
            vals.append(-rng.random((L - s, 16)).astype(np.float32))
            idx.append(rng.integers(0, 90, (L - s, 16)).astype(np.int32))
        recs.append(
            {
                "ctx_ids": ctx,
                "input_ids": ids,
                "response_start_end": spans,
                "logprobs_vals": vals,
                "logprobs_indices": idx,
            }
        )
    return recs


CHUNK = pipeline.ChunkConfig(
    max_chunk_len=32,
    min_chunk_len=8,
    num_chunk_probs=packing.OFFICIAL_NUM_CHUNK_PROBS,
    prefix=(7, 7),
    suffix=(8,),
)
PACK = packing.PackConfig(
    max_inp_len=64, max_ctx_len=128, max_contexts=4, max_chunks=12, max_qas=8, top_k=16
)


def _items(recs, seed=0, **kw):
    return pipeline.build_items(
        recs, lambda r, rng: pipeline.selfgen_item(r, CHUNK, rng), seed=seed, **kw
    )


def test_chunk_counts_are_drawn_once_per_record():
    recs = _selfgen_records()
    a, b = _items(recs), _items(recs)
    assert [len(x["ctx_chunks"]) for x in a] == [len(x["ctx_chunks"]) for x in b]
    assert max(len(x["ctx_chunks"]) for x in a) > 1
    for it, r in zip(a, recs):  # affixes between chunks, the ids themselves untouched
        n = len(it["ctx_chunks"])
        flat = sum(it["ctx_chunks"], [])
        assert len(flat) == len(r["ctx_ids"]) + (n - 1) * 3
        assert all(len(c) <= 32 + 3 for c in it["ctx_chunks"])


def test_packed_pipeline_shards_and_resumes():
    items = _items(_selfgen_records(20))
    contexts = []
    for p in (0, 1):
        cfg = pipeline.LoaderConfig(
            batch_size=2, seed=5, drop_remainder=False, process_index=p, process_count=2
        )
        got = []
        for batch in pipeline.make_packed_dataset(items, PACK, cfg):
            assert batch["input_ids"].shape == (batch["input_ids"].shape[0], 64)
            first = batch["ctx_positions"] == 0
            got += batch["ctx_ids"][first & (batch["ctx_ids"] >= 1000)].tolist()
        contexts.append(got)
    assert not set(contexts[0]) & set(contexts[1])
    assert sorted(contexts[0] + contexts[1]) == list(range(1000, 1020))
    cfg = pipeline.LoaderConfig(batch_size=1, seed=5, num_epochs=3)
    ds = pipeline.make_packed_dataset(items, PACK, cfg)
    it = iter(ds)
    next(it), next(it)
    state = it.get_state()
    rest = [b["input_ids"] for b in it]
    it2 = iter(pipeline.make_packed_dataset(items, PACK, cfg))
    it2.set_state(state)
    again = [b["input_ids"] for b in it2]
    assert len(rest) == len(again) > 0 and all((x == y).all() for x, y in zip(rest, again))


def test_bad_selfgen_records_are_reported():
    recs = _selfgen_records(4)
    del recs[1]["response_start_end"]
    recs[2]["ctx_ids"] = []
    with pytest.raises(InputError, match="selfgen.parquet record 1: .*response_start_end"):
        _items(recs, name="selfgen.parquet")
    items = _items(recs, on_error="skip", name="selfgen.parquet")
    assert len(items) == 2


def test_loader_config_validation():
    with pytest.raises(ConfigError):
        pipeline.LoaderConfig(batch_size=2, process_index=2, process_count=2)
    with pytest.raises(InputError, match="no records"):
        pipeline.make_dataset(
            SOURCE[:1], pipeline.LoaderConfig(batch_size=1, process_index=1, process_count=2)
        )


def test_multiprocess_prefetch_gives_the_same_batches():
    items = _items(_selfgen_records(10))
    base = pipeline.LoaderConfig(batch_size=2, seed=2, drop_remainder=False)
    mp = pipeline.LoaderConfig(batch_size=2, seed=2, drop_remainder=False, worker_count=2)
    a = [b["input_ids"] for b in pipeline.make_packed_dataset(items, PACK, base)]
    b = [b["input_ids"] for b in pipeline.make_packed_dataset(items, PACK, mp)]
    assert len(a) == len(b) and all((x == y).all() for x, y in zip(a, b))


def test_niah_records_become_items_with_gold_response_labels():
    from pathlib import Path

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        Path(__file__).parent / "fixtures" / "official" / "d2l" / "tiny-gemma2"
    )
    chunk = pipeline.ChunkConfig.for_tokenizer(tok, max_chunk_len=24)
    assert chunk.prefix == tuple(
        tok("<bos><start_of_turn>user\n\n\n", add_special_tokens=False)["input_ids"]
    )
    recs = [
        {
            "context": "The grass is green.\nThe special magic number is 0042.\nHere we go.",
            "prompt": "What is the special magic number? Reply with only the number.",
            "response": "0042",
        },
        {"context": "", "prompt": "x", "response": "y"},
    ]
    items = pipeline.build_items(
        recs, lambda r, rng: pipeline.text_qa_item(r, rng, tok, chunk), on_error="skip"
    )
    assert len(items) == 1 and len(items[0]["ctx_chunks"]) > 1
    (ids,), (labels,) = items[0]["input_ids"], items[0]["labels"]
    assert tok.decode([t for t in labels if t != packing.IGNORE_INDEX]) == "0042<end_of_turn>"
    assert "0042" not in tok.decode(ids[: labels.index(next(t for t in labels if t >= 0))])
    row = packing.pack_row(items, packing.PackConfig(max_inp_len=64, max_ctx_len=128, top_k=0))
    assert row["n_ctx_chunks"][0] == len(items[0]["ctx_chunks"])
