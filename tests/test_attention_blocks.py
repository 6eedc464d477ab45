"""The blocked causal attention path (no KV cache, T > ATTN_BLOCK) against transformers.

Reference: transformers' eager models (tests/tiny_models.py), float32. ATTN_BLOCK is lowered to 5
so a 12-token batch runs 3 query blocks (the last one partial) with padding, packing, sliding
windows (4) and soft-caps. Tolerance: max abs error 1e-4 on real tokens' logits.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from tiny_models import make_tiny_hf, to_jax

from hyperlora_jax.models import layers, transformer

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
