"""The flash-style causal attention path (key blocks, running max and sum) against transformers.

Reference: transformers' eager models (tests/tiny_models.py), float32. ATTN_BLOCK is lowered to 5
so a 12-token batch runs 3 query blocks (the last one partial) with padding, packing, sliding
windows (4) and soft-caps. Tolerance: max abs error 1e-4 on real tokens' logits. The prefill of
generation takes the same path (prompt keys only, K/V written into the cache once): its logits
and cache equal the path over all cache slots (1e-5) and greedy tokens equal HF generate.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from tiny_models import make_tiny_hf, to_jax

from hyperlora_jax.models import decoding, layers, transformer

T = 12


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_blocked_attention_matches_transformers(family, monkeypatch, tmp_path):
    model, _ = make_tiny_hf(family)
    cfg, params = to_jax(model, tmp_path)
    toks = np.random.RandomState(3).randint(3, 128, size=(3, T)).astype(np.int32)
    seg = np.ones((3, T), np.int32)
    seg[0, 8:] = 0  # right padding
    seg[1, :3] = 0  # left padding
    seg[2, 7:] = 2  # packed segments of 7 and 5 tokens
    monkeypatch.setattr(layers, "ATTN_BLOCK", 5)
    fwd = jax.jit(lambda p, t, s: transformer.forward(p, cfg, t, segment_ids=s).logits)
    logits = np.asarray(fwd(params, toks, seg))
    for row, sl in [(0, slice(0, 8)), (1, slice(3, T)), (2, slice(0, 7)), (2, slice(7, T))]:
        with torch.no_grad():
            ref = model(torch.as_tensor(toks[row : row + 1, sl])).logits[0].numpy()
        np.testing.assert_allclose(logits[row, sl], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_prefill_blocks_equal_full_cache_path_and_hf_generate(family, monkeypatch, tmp_path):
    model, _ = make_tiny_hf(family)
    cfg, params = to_jax(model, tmp_path)
    prompts = [list(range(3, 3 + T)), [44, 3, 90, 7, 61], [7, 8, 100, 101, 27, 9, 11, 13, 5]]
    toks, seg = decoding.left_pad(prompts, 0)
    monkeypatch.setattr(layers, "ATTN_BLOCK", 5)

    def prefill(p, t, s, flash):
        cache = transformer.init_cache(cfg, t.shape[0], t.shape[1] + 4)
        out = transformer.forward(p, cfg, t, segment_ids=s, cache=cache, prefill=flash)
        return out.logits, out.cache

    (lf, cf), (lc, cc) = (jax.jit(prefill, static_argnums=3)(params, toks, seg, f) for f in (1, 0))
    real = seg.astype(bool)
    np.testing.assert_allclose(np.asarray(lf)[real], np.asarray(lc)[real], atol=1e-5, rtol=0)
    for name in ("k", "v"):  # real slots (pads are never attended; their K/V may differ)
        # [L, B, kv, S, d] -> [L, kv, B, S, d]: real (B, S) slots as one boolean index
        got, want = (np.asarray(c[name])[:, :, :, :T].swapaxes(1, 2) for c in (cf, cc))
        np.testing.assert_allclose(got[:, :, real], want[:, :, real], atol=1e-5, rtol=0)
    for name in ("segment_ids", "end", "next_position"):
        np.testing.assert_array_equal(np.asarray(cf[name]), np.asarray(cc[name]))
    decoding._generate.clear_cache()  # retrace with the lowered block size
    out = decoding.generate(params, cfg, prompts, max_new_tokens=6, stop_ids=[], pad_id=0)
    with torch.no_grad():
        ref = model.generate(
            torch.as_tensor(toks, dtype=torch.long),
            attention_mask=torch.as_tensor(seg),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )[:, T:]
    decoding._generate.clear_cache()
    np.testing.assert_array_equal(out.tokens, ref.numpy())
