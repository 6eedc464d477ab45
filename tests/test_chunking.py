"""Chunking and composition: the official split rule, chat affixes, combine_lora semantics.

Reference: tests/fixtures/official/d2l (official tokenize_ctx_text / split_too_long_ctx /
combine_lora outputs, float32); composition tolerances rtol 1e-4, atol 1e-6 (fixture README).
"""

import json
from functools import lru_cache

import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax.convert.official_d2l import read_official
from hyperlora_jax.errors import InputError
from hyperlora_jax.hypernet.d2l.api import compose, pad_chunks
from hyperlora_jax.hypernet.d2l.model import bias_lora
from hyperlora_jax.lora.adapter import to_dense_delta
from hyperlora_jax.models.chat import (
    CTX_AFFIXES,
    ctx_affixes,
    format_user_turn,
    num_chunks,
    split_ctx_ids,
    tokenize_ctx_text,
)

D2L = "official/d2l"


@lru_cache(maxsize=1)
def _fixture(fixtures_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(fixtures_dir / D2L / "tiny-gemma2"))
    meta = json.loads((fixtures_dir / D2L / "meta.json").read_text())
    return tok, meta, dict(np.load(fixtures_dir / D2L / "golden.npz"))


def _golden_chunks(g):
    return [r[m.astype(bool)].tolist() for r, m in zip(g["ctx_ids"], g["ctx_attn_mask"])]


def test_tokenize_and_affixes_match_official(fixtures_dir):
    tok, meta, g = _fixture(fixtures_dir)
    for i, doc in enumerate(meta["docs"]):
        assert tokenize_ctx_text(doc, tok) == g[f"doc_token_ids_{i}"].tolist()
    prefix, suffix = ctx_affixes(tok)
    assert prefix == g["ctx_chunk_prefix_ids"].tolist()
    assert suffix == g["ctx_chunk_suffix_ids"].tolist()
    for q, ids in zip(meta["questions"], g["query_ids"]):
        assert format_user_turn(q, tok) == ids.tolist()


def test_official_split_rule(fixtures_dir):
    tok, meta, g = _fixture(fixtures_dir)
    prefix, suffix = g["ctx_chunk_prefix_ids"].tolist(), g["ctx_chunk_suffix_ids"].tolist()
    n = int(g["max_ctx_chunk_len"])
    chunks = [
        c for i in range(2) for c in split_ctx_ids(g[f"doc_token_ids_{i}"], n, prefix, suffix)
    ]
    assert chunks == _golden_chunks(g)
    assert [len(c) for c in chunks] == meta["chunk_lengths"] == [53, 57, 65, 56]
    # 146 ids, 60 max -> 3 equal slices of 49/49/48, first + suffix, middle wrapped, last + prefix.
    doc1 = g["doc_token_ids_1"].tolist()
    c = split_ctx_ids(doc1, n, prefix, suffix)
    assert c[0] == doc1[:49] + suffix and c[2] == prefix + doc1[98:]
    assert num_chunks(146, 60) == 3 and num_chunks(146, 0) == 1 and num_chunks(146, None) == 1
    assert split_ctx_ids(doc1, -1, prefix, suffix) == [doc1]


def test_official_affix_table_is_gemma_like():
    """The released Gemma/Qwen affixes start/end with the same special tokens our strings use."""
    assert CTX_AFFIXES["google/gemma-2-2b-it"]["prefix"][0] == 2  # <bos>
    assert CTX_AFFIXES["Qwen/Qwen3-4B-Instruct-2507"]["suffix"][0] == 151645  # <|im_end|>


def test_document_errors(fixtures_dir):
    tok, _, _ = _fixture(fixtures_dir)
    with pytest.raises(InputError, match="empty"):
        tokenize_ctx_text("", tok)
    with pytest.raises(InputError, match="empty"):
        tokenize_ctx_text(" \n\t ", tok)

    class DropsUnknown:
        """A vocabulary tokenizer that silently drops characters it does not know."""

        bos_token = "<bos>"

        def __init__(self, inner):
            self.inner = inner

        def get_vocab(self):
            return self.inner.get_vocab()

        def __call__(self, text, add_special_tokens=False):
            text = "".join(ch for ch in text if ord(ch) < 0x2000)
            return self.inner(text, add_special_tokens=add_special_tokens)

    with pytest.raises(InputError, match="no tokens besides the chat affixes"):
        tokenize_ctx_text("\u4e2d\u6587", DropsUnknown(tok))
    with pytest.raises(InputError):
        pad_chunks([[1, 2], []])


def _rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_compose_matches_official_combined(fixtures_dir):
    _, _, g = _fixture(fixtures_dir)
    cfg, params, _ = read_official(fixtures_dir / D2L / "pytorch_model.bin")
    bias = bias_lora(params, cfg)
    np.testing.assert_array_equal(np.asarray(bias[0]["down_proj"]), g["bias_A__down_proj"])
    ad = compose(
        {"down_proj": jnp.asarray(g["A__down_proj"])},
        {"down_proj": jnp.asarray(g["B__down_proj"])},
        g["n_ctx_chunks"].tolist(),
        cfg.lora_alpha,
        bias,
    )
    assert ad.scale == pytest.approx(float(g["lora_alpha"]))
    for k, x in (("A", ad.a), ("B", ad.b)):
        np.testing.assert_allclose(
            np.asarray(x["down_proj"]), g[f"combined_{k}__down_proj"], rtol=1e-4, atol=1e-6
        )


def test_three_chunk_rank_and_concatenation():
    """Doc with 3 chunks -> rank (3+1) r = chunks in order + bias; 1-chunk doc zero-padded;
    the composed delta is the sum of the chunk deltas and the bias delta (no 1/K)."""
    L, r, di, do = 2, 4, 6, 5  # noqa: N806
    a = _rand((4, L, r, di), 0)
    b = _rand((4, L, r, do), 1)
    bias = ({"down_proj": _rand((L, r, di), 2)}, {"down_proj": _rand((L, r, do), 3)})
    ad = compose({"down_proj": a}, {"down_proj": b}, [1, 3], 2.0, bias)
    A, B = np.asarray(ad.a["down_proj"]), np.asarray(ad.b["down_proj"])  # noqa: N806
    assert A.shape == (2, L, (3 + 1) * r, di) and ad.rank == 16
    want_a = np.concatenate([a[1], a[2], a[3], bias[0]["down_proj"]], axis=1)
    np.testing.assert_array_equal(A[1], want_a)
    np.testing.assert_array_equal(A[0, :, :r], a[0])
    np.testing.assert_array_equal(A[0, :, r : 2 * r], bias[0]["down_proj"])
    assert not A[0, :, 2 * r :].any() and not B[0, :, 2 * r :].any()
    dense = np.asarray(to_dense_delta(ad)["down_proj"])  # [2, L, di, do]
    parts = sum(np.einsum("lri,lro->lio", a[k], b[k]) for k in (1, 2, 3))
    parts += np.einsum("lri,lro->lio", bias[0]["down_proj"], bias[1]["down_proj"])
    np.testing.assert_allclose(dense[1], 2.0 * parts, rtol=1e-5, atol=1e-5)


def test_compose_scalers():
    """Per-document scalers act on A only (linear); bias_scaler on A and B (quadratic)."""
    L, r, d = 1, 2, 3  # noqa: N806
    a, b = _rand((3, L, r, d), 4), _rand((3, L, r, d), 5)
    bias = ({"down_proj": _rand((L, r, d), 6)}, {"down_proj": _rand((L, r, d), 7)})
    base = compose({"down_proj": a}, {"down_proj": b}, [2, 1], 1.0, bias)
    sc = compose(
        {"down_proj": a}, {"down_proj": b}, [2, 1], 1.0, bias, scalers=[0.5, 3.0], bias_scaler=-2.0
    )
    A0, A1 = np.asarray(base.a["down_proj"]), np.asarray(sc.a["down_proj"])  # noqa: N806
    B0, B1 = np.asarray(base.b["down_proj"]), np.asarray(sc.b["down_proj"])  # noqa: N806
    np.testing.assert_allclose(A1[0, :, : 2 * r], 0.5 * A0[0, :, : 2 * r], rtol=1e-6)
    np.testing.assert_allclose(A1[1, :, :r], 3.0 * A0[1, :, :r], rtol=1e-6)
    np.testing.assert_array_equal(B1[0, :, : 2 * r], B0[0, :, : 2 * r])
    np.testing.assert_allclose(A1[0, :, 2 * r :], -2.0 * A0[0, :, 2 * r :], rtol=1e-6)
    np.testing.assert_allclose(B1[0, :, 2 * r :], -2.0 * B0[0, :, 2 * r :], rtol=1e-6)
    with pytest.raises(InputError):
        compose({"down_proj": a}, {"down_proj": b}, [2, 2], 1.0)
