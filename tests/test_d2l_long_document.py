"""Long documents: grouped internalization equals the all-at-once compose, four compiled shapes for
any chunk count, and the size limits (chunks per document, the context window, --chunk-size > 0).

Tiny official fixture (tiny-gemma2, window 2,048). Grouped vs all-at-once: the same per-chunk
program on batches of CHUNK_GROUP rows instead of all rows; asserted equal to rtol 1e-5 / atol 1e-6
(f32; measured: max abs diff 9e-8 on values ~0.1, as the batch size changes XLA:CPU blocking).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax.api import load_d2l
from hyperlora_jax.cli import main as cli_main
from hyperlora_jax.errors import InputError
from hyperlora_jax.hypernet.d2l import api as d2l_api
from hyperlora_jax.hypernet.d2l.model import bias_lora

D2L = "official/d2l"
WORDS = "the quick brown fox jumps over the lazy dog while seven owls watch".split()


def _text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


@pytest.fixture(scope="module")
def d2l(fixtures_dir):
    return load_d2l(fixtures_dir / D2L / "pytorch_model.bin")


def _all_at_once(d2l, docs_chunks, scalers, bias_scaler):
    """The previous path: every chunk in one batch, then compose."""
    flat = [c for d in docs_chunks for c in d]
    tokens, mask = d2l_api.pad_chunks(flat, multiple=d2l.pad_multiple)
    a, b = d2l_api.chunk_loras(
        d2l.params, d2l.ctx_params, jnp.asarray(tokens), jnp.asarray(mask),
        config=d2l.config, ctx_config=d2l.ctx_config,
    )  # fmt: skip
    return d2l_api.compose(
        a, b, [len(d) for d in docs_chunks], d2l.config.lora_alpha,
        bias_lora(d2l.params, d2l.config), scalers, bias_scaler,
    )  # fmt: skip


def test_grouped_equals_all_at_once(d2l):
    # 20 and 8 chunks: three full groups and a padded one, one group spanning both documents
    docs = [d2l.chunk_document(_text(100, 1), 16), d2l.chunk_document(_text(30, 2), 16)]
    assert [len(d) for d in docs] == [20, 8]
    scalers, bias_scaler = [0.5, 2.0], 0.75
    got = d2l.internalize_chunks(docs, scalers=scalers, bias_scaler=bias_scaler)
    ref = _all_at_once(d2l, docs, scalers, bias_scaler)
    assert got.scale == ref.scale
    for m in ref.a:
        for x, y in ((got.a[m], ref.a[m]), (got.b[m], ref.b[m])):
            assert x.shape == y.shape == (2, 3, 21 * 8, y.shape[-1]) and x.dtype == y.dtype
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
            assert not np.asarray(x)[1, :, 9 * 8 :].any()  # bias at slot 8, zeros after it


def test_single_text_matches_chunk_document(d2l):
    text = _text(200, 3)
    ad = d2l.internalize(text, 16)
    k = len(d2l.chunk_document(text, 16))
    assert ad.batch_shape == () and ad.rank == (k + 1) * d2l.config.rank


def test_chunk_counts_share_four_compiled_shapes(d2l):
    """Chunk counts run as groups of 1, 2, 4 or CHUNK_GROUP (8) rows, the next power of two:
    documents of 10 and 15 chunks reuse the 8-row program of a 5-chunk one, a 2-chunk document
    compiles the 2-row program once, and longest chunks of 59..116 tokens share one length."""
    d2l.internalize(_text(140, 5), 100)
    before = d2l_api.batched_chunk_loras._cache_size()
    ranks = [d2l.internalize(_text(n, 5), 100).rank for n in (300, 500)]
    assert [r // d2l.config.rank - 1 for r in ranks] == [10, 15]
    assert d2l_api.batched_chunk_loras._cache_size() == before
    assert d2l.internalize(_text(32, 5), 100).rank // d2l.config.rank - 1 == 2
    assert d2l_api.batched_chunk_loras._cache_size() == before + 1
    d2l.internalize(_text(36, 6), 100)  # 2 chunks again
    assert d2l_api.batched_chunk_loras._cache_size() == before + 1


def test_chunk_limit(d2l):
    text = _text(200, 6)
    n = len(d2l.chunk_document(text, 16))
    with pytest.raises(InputError, match=rf"{n} chunks of 16, over the limit of 4 .*chunk size"):
        d2l.internalize(text, 16, max_chunks=4)
    with pytest.raises(InputError, match="split the document"):
        d2l.internalize(_text(800, 7), 16, max_chunks=1)
    with pytest.raises(InputError, match="3 chunks, over the limit of 2"):
        d2l.internalize_chunks([[[1, 2]] * 3], max_chunks=2)
    assert d2l_api.MAX_DOC_CHUNKS == 2048


def test_chunk_longer_than_window(d2l):
    assert d2l.ctx_config.max_position_embeddings == 2048
    text = _text(800, 8)  # > 2,048 tokens in one chunk: refused, not truncated
    with pytest.raises(InputError, match=r"longer than the context model's window of 2,048; use"):
        d2l.internalize(text)
    with pytest.raises(InputError, match="window of 2,048"):
        d2l.internalize(text, 4000)
    with pytest.raises(InputError, match="chunk of 2,049 tokens"):
        d2l.internalize_chunks([[[5] * 2049]])
    assert d2l.internalize(text, 1024).rank > 2 * d2l.config.rank


def test_cli_refuses_nonpositive_chunk_size(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("some text")
    argv = ["internalize", "--doc", str(doc), "--out", str(tmp_path / "ad"), "--chunk-size"]
    for bad in ("-5", "0"):
        with pytest.raises(SystemExit) as e:  # argparse refuses it before any model loads
            cli_main([*argv, bad])
        assert e.value.code == 2
        err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
        assert err == [
            f"hyperlora-jax internalize: error: argument --chunk-size: must be a positive "
            f"integer, got {bad}"
        ]
    assert not (tmp_path / "ad").exists()


def test_cli_two_megabyte_document_fails_fast_with_one_line(tmp_path, capsys, fixtures_dir):
    """The two ways a 2 MB text ran away before (no --chunk-size: one 500k-token chunk for over
    5 minutes; --chunk-size 64: ~10k chunks in one batch, a 46.8 GB allocation) now stop before
    any model work, with one line and nothing written."""
    doc = tmp_path / "doc.txt"
    doc.write_text(_text(400_000, 9))  # ~2 MB
    assert doc.stat().st_size > 2_000_000
    argv = ["internalize", "--hypernet", str(fixtures_dir / D2L / "pytorch_model.bin"),
            "--base-model", str(fixtures_dir / D2L / "tiny-gemma2"), "--doc", str(doc),
            "--out", str(tmp_path / "ad")]  # fmt: skip
    for extra, want in (
        ([], "window of 2,048"),
        (["--chunk-size", "64"], "over the limit of 2,048"),
    ):
        assert cli_main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
        assert not (tmp_path / "ad").exists()
