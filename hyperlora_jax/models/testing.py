"""Tiny random base models for tests and examples (cf. gemma's `gm/testing/_dummy_model.py`).

The default is a 2-layer GQA Llama (hidden 32, 4 heads / 2 KV heads of 8, MLP 64, vocab 64):
small enough to compile in seconds on CPU. Other families switch on their architecture flags
(sliding windows, soft-caps, sandwich norms, ...) at the same sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hyperlora_jax.models import transformer
from hyperlora_jax.models.config import ModelConfig

_SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
# A window smaller than test sequences, so sliding layers differ from full ones.
_FAMILY_FLAGS = {
    "llama": {},
    "mistral": dict(sliding_window=4),
    "qwen2": dict(attention_bias=True),
    "qwen3": dict(qk_norm=True, tie_word_embeddings=True),
    "gemma2": dict(
        sliding_window=4,
        layer_types=("sliding", "full"),
        attn_logit_softcap=5.0,
        final_logit_softcap=3.0,
        query_pre_attn_scalar=8,
        embed_scale=True,
        norm_plus_one=True,
        sandwich_norm=True,
        hidden_act="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
    "gemma3": dict(
        sliding_window=4,
        layer_types=("sliding", "full"),
        rope_local_theta=10000.0,
        rope_theta=1e6,
        qk_norm=True,
        final_logit_softcap=3.0,
        query_pre_attn_scalar=8,
        embed_scale=True,
        norm_plus_one=True,
        sandwich_norm=True,
        hidden_act="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
}


def tiny_config(family: str = "llama", **overrides) -> ModelConfig:
    """A tiny ModelConfig of `family`; `overrides` replace any field (sizes, flags)."""
    return ModelConfig(family=family, **{**_SIZES, **_FAMILY_FLAGS[family], **overrides})


def tiny_model(
    seed: int = 0, family: str = "llama", dtype: jnp.dtype = jnp.float32, **overrides
) -> tuple[ModelConfig, transformer.Params]:
    """(config, params): `tiny_config(family, **overrides)` with random params from `seed`."""
    config = tiny_config(family, **overrides)
    return config, transformer.init_params(config, jax.random.key(seed), dtype)
