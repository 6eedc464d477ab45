"""Corpus reading with bad-record reports, and record files: JSONL, Parquet, ArrayRecord, TFDS."""

import json

import numpy as np
import pytest

from hyperlora_jax.data import storage
from hyperlora_jax.errors import InputError


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_text(
        json.dumps({"text": "First document."})
        + "\n"
        + json.dumps({"body": "no text field"})
        + "\n"
        + json.dumps({"text": "   "})
        + "\n"
        + json.dumps({"text": "Second document."})
        + "\n"
    )
    (d / "b.txt").write_text("A plain text document.\n")
    (d / "c.txt").write_bytes(b"caf\xe9 latin-1 bytes")
    return d


def test_bad_records_are_reported_with_file_and_index(corpus):
    docs, bad = storage.read_documents(corpus, on_error="skip")
    assert [d["text"] for d in docs] == [
        "First document.",
        "Second document.",
        "A plain text document.\n",
    ]
    reasons = {(b.file.rsplit("/", 1)[-1], b.index): b.reason for b in bad}
    assert set(reasons) == {("a.jsonl", 1), ("a.jsonl", 2), ("c.txt", -1)}
    assert "missing field 'text'" in reasons[("a.jsonl", 1)]
    assert reasons[("a.jsonl", 2)] == "empty document"
    assert "UTF-8" in reasons[("c.txt", -1)]


def test_bad_records_raise_by_default(corpus):
    with pytest.raises(InputError, match=r"a\.jsonl record 1: missing field 'text'"):
        storage.read_documents(corpus)
    with pytest.raises(InputError, match="on_error"):
        storage.read_documents(corpus, on_error="ignore")


def test_parquet_corpus_and_max_chars(tmp_path):
    storage.write_parquet(tmp_path / "d.parquet", [{"text": "short"}, {"text": "x" * 50}])
    docs, bad = storage.read_documents(tmp_path / "d.parquet", max_chars=10)
    assert [d["text"] for d in docs] == ["short"] and not bad


RECS = [
    {
        "i": i,
        "text": "héllo\n",
        "ids": np.arange(i + 1, dtype=np.int32),
        "nested": [[1, 2], [3]],
        "lp": np.full((2, 3), -0.5, np.float16),
    }
    for i in range(6)
]


def _same(a, b):
    assert a["i"] == b["i"] and a["text"] == b["text"] and a["nested"] == b["nested"]
    np.testing.assert_array_equal(np.asarray(a["ids"]), b["ids"])
    np.testing.assert_array_equal(np.asarray(a["lp"], np.float16), b["lp"])


@pytest.mark.parametrize("ext", ["array_record", "parquet", "jsonl"])
def test_record_files_round_trip(tmp_path, ext):
    path = tmp_path / f"recs.{ext}"
    storage.write_records(path, RECS)
    src = storage.RecordSource(path)
    assert len(src) == len(RECS)
    for i in (0, 5, 2):
        _same(src[i], RECS[i])
    if ext == "array_record":  # dtypes survive exactly
        assert src[3]["ids"].dtype == np.int32 and src[3]["lp"].dtype == np.float16


def test_tfds_builder_round_trip(tmp_path):
    path = storage.write_tfds(tmp_path / "tfds", "toy_records", {"train": RECS, "val": RECS[:2]})
    train = storage.TfdsSource(path, "train")
    assert len(train) == 6 and len(storage.TfdsSource(path, "val")) == 2
    got = sorted((train[i] for i in range(6)), key=lambda r: r["i"])
    for a, b in zip(got, RECS):
        _same(a, b)
    import tensorflow_datasets as tfds

    assert len(tfds.data_source("toy_records", data_dir=str(tmp_path / "tfds"), split="train")) == 6


def test_decoder_refuses_object_arrays():
    bad = storage.encode_record({"x": np.zeros(2)}).replace(b"<f8", b"|O8")
    with pytest.raises((InputError, ValueError, TypeError)):
        storage.decode_record(bad)
