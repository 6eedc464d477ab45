"""NIAH generator: token bins under the base tokenizer, even depth spread, one needle, disjoint
needle pools per split, determinism, and the files on disk."""

import collections
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hyperlora_jax.data import niah

TINY = Path(__file__).parent / "fixtures" / "official" / "d2l" / "tiny-gemma2"
BINS = [(32, 128), (128, 256), (256, 512)]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def generated(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("niah")
    summary = niah.generate_niah(tok, out, bins=BINS, n_train=60, n_val=40, n_test=40, seed=3)
    return out, summary


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _check_examples(recs, tok, lo, hi):
    for r in recs:
        n = len(tok(r["context"])["input_ids"])
        assert lo <= n < hi and n == r["token_len"], (n, lo, hi)
        assert r["prompt"] == niah.QUERY and len(r["response"]) == 4 and r["response"].isdigit()
        assert r["context"].count(r["response"]) == 1
        needle = niah.NEEDLE_TEMPLATE.format(magic_number=r["response"])
        blocks = r["context"].split(niah.SEP)
        assert blocks.count(needle) == 1 and blocks.index(needle) == r["insert_at"]
        assert all(b == niah.NOISE_BLOCK for i, b in enumerate(blocks) if i != r["insert_at"])
        k = r["num_blocks"]  # the needle's relative depth lies in its depth bin (official rule)
        d = r["depth_bin"]
        assert int(k * d / 10) <= r["insert_at"] <= max(int(k * d / 10), -(-k * (d + 1) // 10) - 1)


def test_lengths_depths_and_needles(generated, tok):
    out, summary = generated
    assert set(summary) == {f"ctx_magic_number_{lo}_{hi}" for lo, hi in BINS}
    for lo, hi in BINS:
        pools = {}
        for split in niah.SPLITS:
            recs = _read(out / f"ctx_magic_number_{lo}_{hi}" / f"{split}.jsonl")
            assert len(recs) == {"train": 60, "val": 40, "test": 40}[split]
            _check_examples(recs, tok, lo, hi)
            depth = collections.Counter(r["depth_bin"] for r in recs)
            assert set(depth) == set(range(10)) and max(depth.values()) - min(depth.values()) <= 1
            pools[split] = {r["response"] for r in recs}
        assert not pools["train"] & pools["val"] and not pools["val"] & pools["test"]
        assert not pools["train"] & pools["test"]


def test_deterministic_for_a_seed(generated, tok, tmp_path):
    out, _ = generated
    niah.generate_niah(tok, tmp_path, bins=BINS[:1], n_train=60, n_val=40, n_test=40, seed=3)
    for split in niah.SPLITS:
        name = f"ctx_magic_number_32_128/{split}.jsonl"
        assert (tmp_path / name).read_text() == (out / name).read_text()
    niah.generate_niah(tok, tmp_path, bins=BINS[:1], n_train=60, n_val=40, n_test=40, seed=4)
    assert (tmp_path / "ctx_magic_number_32_128/val.jsonl").read_text() != (
        out / "ctx_magic_number_32_128/val.jsonl"
    ).read_text()


def test_training_data_only_for_small_bins(tok, tmp_path):
    s = niah.generate_niah(
        tok, tmp_path, bins=[(1024, 2048)], n_train=5, n_val=3, n_test=3, fmt="parquet"
    )
    assert s == {"ctx_magic_number_1024_2048": {"val": 3, "test": 3}}
    assert not (tmp_path / "ctx_magic_number_1024_2048" / "train.parquet").exists()


def test_official_bins():
    bins = niah.official_token_bins()
    assert bins[:5] == [(32, 128), (128, 256), (256, 512), (512, 1024), (32, 1024)]
    assert bins[-1] == (2**15 + 2**13 * 11, 2**17) and len(bins) == 36
    assert niah.parse_bins("32-128,128-256") == [(32, 128), (128, 256)]


@pytest.mark.slow
def test_smollm2_tokenizer_bins(tmp_path):
    from hyperlora_jax.models.fetch import fetch_model
    from hyperlora_jax.models.tokenizer import load_tokenizer

    tok = load_tokenizer(fetch_model("smollm2-135m-instruct"))
    bins = [(32, 128), (128, 256), (1024, 2048), (8192, 9216)]
    niah.generate_niah(tok, tmp_path, bins=bins, n_train=20, n_val=20, n_test=10, seed=0)
    for lo, hi in bins:
        recs = _read(tmp_path / f"ctx_magic_number_{lo}_{hi}" / "test.jsonl")
        assert len(recs) == 10
        _check_examples(recs, tok, lo, hi)
