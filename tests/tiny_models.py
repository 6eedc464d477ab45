"""Tiny random transformers models (2-3 layers, GQA) for parity tests, and their JAX twins.

make_tiny_hf(family) -> (torch model in eval mode, HF config); to_jax(model, dir) saves it with
save_pretrained and loads it back with our loader, so every test also exercises hf.py.
JAX-only tiny models: hyperlora_jax.models.testing.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

SLIDING_WINDOW = 4  # smaller than the test sequences, so windows matter

_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    attn_implementation="eager",
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,  # larger than the default 0.02 so logits (and soft-caps) are O(1)
)

_FAMILY = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(
            sliding_window=SLIDING_WINDOW, rope_parameters=dict(rope_type="default", rope_theta=1e6)
        ),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(tie_word_embeddings=True),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(
            sliding_window=SLIDING_WINDOW,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(
            sliding_window=SLIDING_WINDOW,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                "full_attention": dict(rope_type="linear", rope_theta=1e6, factor=8.0),
            },
            final_logit_softcapping=3.0,
        ),
    ),
}


def make_tiny_hf(family: str, seed: int = 0, **overrides):
    """A random tiny HF causal LM of `family` (float32, eval mode) and its config."""
    config_cls, model_cls, extra = _FAMILY[family]
    kw = {**_BASE, **extra, **overrides}
    config = config_cls(**kw)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random norm weights, so a swapped or missing norm cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if family.startswith("gemma") else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model, config


def to_jax(model, folder: str | Path, dtype=None):
    """Save `model` with save_pretrained into `folder` and load (config, params) with our loader."""
    from hyperlora_jax.models.hf import load_hf_model

    model.save_pretrained(str(folder))
    return load_hf_model(folder, dtype=dtype)
