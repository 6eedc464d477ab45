"""Cached batched generation (hyperlora_jax.models.decoding) against transformers' `generate`.

Reference: HF greedy generate on the same tiny random model, left-padded batch with an attention
mask, pad_token_id for finished rows. Tokens must be identical (exact ids, no tolerance).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import make_tiny_hf, to_jax

from hyperlora_jax.errors import InputError
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.models.decoding import _sample, generate, left_pad

PROMPTS = [[5, 17, 33, 9, 61, 70, 12], [44, 3, 90], [7, 8, 100, 101, 27]]
NEW = 10
PAD = 0


@functools.cache
def _tiny(family: str, tmp_root: str):
    model, _ = make_tiny_hf(family)
    cfg, params = to_jax(model, f"{tmp_root}/{family}")
    return model, cfg, params


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    return _tiny(request.param, str(tmp_path_factory.mktemp("dec")))


def _hf_generate(model, prompts, eos):
    ids, seg = left_pad(prompts, PAD)
    with torch.no_grad():
        out = model.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(seg),
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
        )
    res = np.full((len(prompts), NEW), PAD)
    gen = out[:, ids.shape[1] :].numpy()
    res[:, : gen.shape[1]] = gen
    return res


def test_greedy_matches_hf_generate_left_padded(tiny):
    """Batch of 3 prompts of lengths 7/3/5 (left padding; sliding window 4 for gemma3 < 17
    tokens). A stop id taken from row 0's HF output checks per-row stopping too."""
    model, cfg, params = tiny
    free = _hf_generate(model, PROMPTS, eos=None)
    # choose a stop token: row 0's 4th token if it does not occur earlier in that row
    stop = int(free[0, 3])
    ref = _hf_generate(model, PROMPTS, eos=stop)
    out = generate(params, cfg, PROMPTS, max_new_tokens=NEW, stop_ids=[stop], pad_id=PAD)
    np.testing.assert_array_equal(out.tokens, ref)
    first = np.argmax(ref == stop, axis=1)
    expected_len = np.where((ref == stop).any(1), first + 1, NEW)
    np.testing.assert_array_equal(out.lengths, expected_len)
    assert out.lengths[0] <= 4
    # no stop ids at all: the free-running HF output
    out = generate(params, cfg, PROMPTS, max_new_tokens=NEW, stop_ids=[], pad_id=PAD)
    np.testing.assert_array_equal(out.tokens, free)


def test_adapter_is_applied_in_prefill_and_steps(tiny):
    """Generation with a shared LoRA == generation with the LoRA merged into the weights
    (q_proj and down_proj, rank 2, scale 2): the adapter reaches prefill and every cached step."""
    _, cfg, params = tiny
    rng = np.random.default_rng(0)
    a, b = {}, {}
    for m in ("q_proj", "down_proj"):
        d_in, d_out = cfg.module_dims(m)
        a[m] = jnp.asarray(rng.normal(0, 0.3, (cfg.num_layers, 2, d_in)), jnp.float32)
        b[m] = jnp.asarray(rng.normal(0, 0.3, (cfg.num_layers, 2, d_out)), jnp.float32)
    adapter = Adapter(a, b, scale=2.0)
    merged = jax.tree.map(lambda x: x, params)
    merged["layers"]["attn"]["q_proj"]["kernel"] += 2.0 * jnp.einsum(
        "lri,lro->lio", a["q_proj"], b["q_proj"]
    )
    merged["layers"]["mlp"]["down_proj"]["kernel"] += 2.0 * jnp.einsum(
        "lri,lro->lio", a["down_proj"], b["down_proj"]
    )
    kw = dict(max_new_tokens=NEW, stop_ids=[], pad_id=PAD)
    with_lora = generate(params, cfg, PROMPTS, adapter=adapter, **kw).tokens
    np.testing.assert_array_equal(with_lora, generate(merged, cfg, PROMPTS, **kw).tokens)
    assert not np.array_equal(with_lora, generate(params, cfg, PROMPTS, **kw).tokens)
    # one adapter per row: row i gets adapter i; rows 0 and 2 get the LoRA, row 1 a zero one
    zero = jax.tree.map(jnp.zeros_like, adapter)
    per_row = jax.tree.map(lambda x, z: jnp.stack([x, z, x]), adapter, zero)
    rows = generate(params, cfg, PROMPTS, adapter=per_row, **kw).tokens
    base = generate(params, cfg, PROMPTS, **kw).tokens
    np.testing.assert_array_equal(rows[[0, 2]], with_lora[[0, 2]])
    np.testing.assert_array_equal(rows[1], base[1])


def test_sampling_is_deterministic_per_seed(tiny):
    _, cfg, params = tiny
    kw = dict(max_new_tokens=NEW, stop_ids=[], pad_id=PAD, temperature=1.5, top_p=0.95)
    s1 = generate(params, cfg, PROMPTS, seed=1, **kw).tokens
    np.testing.assert_array_equal(s1, generate(params, cfg, PROMPTS, seed=1, **kw).tokens)
    assert not np.array_equal(s1, generate(params, cfg, PROMPTS, seed=2, **kw).tokens)
    # a vanishing nucleus keeps only the argmax: sampling == greedy
    greedy = generate(params, cfg, PROMPTS, max_new_tokens=NEW, stop_ids=[], pad_id=PAD).tokens
    kw.update(top_p=1e-6)
    np.testing.assert_array_equal(generate(params, cfg, PROMPTS, seed=3, **kw).tokens, greedy)


def test_top_p_sampling_distribution():
    """Top-p 0.7 over probs (0.5, 0.3, 0.15, 0.05) keeps the first two tokens: frequencies
    0.625/0.375 within 0.03 over 4000 samples; dropped tokens never appear."""
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: _sample(logits, k, 1.0, 0.7)[0])(keys))
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert freq[2] == 0 and freq[3] == 0
    np.testing.assert_allclose(freq[:2], [0.625, 0.375], atol=0.03)


def test_bad_inputs_raise():
    with pytest.raises(InputError, match="at least one token"):
        left_pad([[1, 2], []], 0)
    with pytest.raises(InputError, match="max_new_tokens"):
        generate({}, None, [[1]], max_new_tokens=0)
    with pytest.raises(InputError, match="tokenizer"):
        generate({}, None, ["hello"], max_new_tokens=2)


def test_logits_at_positions_equal_the_full_logits_rows(tiny):
    from hyperlora_jax.models.transformer import forward

    _, cfg, params = tiny
    ids, seg = left_pad(PROMPTS, PAD)
    full = forward(params, cfg, ids, segment_ids=seg).logits
    at = np.array([[6, 2], [6, 5], [3, 4]])
    part = forward(params, cfg, ids, segment_ids=seg, logits_at=at).logits
    np.testing.assert_allclose(
        part, np.take_along_axis(np.asarray(full), at[..., None], 1), rtol=1e-5, atol=1e-5
    )
