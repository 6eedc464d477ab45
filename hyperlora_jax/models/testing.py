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


def save_tiny_vlm(
    folder, tokenizer_dir=None, seed: int = 0, vocab_size: int = 512, **text_overrides
):
    """Save a tiny random HF Gemma3ForConditionalGeneration (f32) into `folder` and return it:
    a 4-layer Gemma-3 text tower (H=48) and a 2-layer SigLIP on 32x32 images in 4x4 patches,
    pooled to 4 soft tokens; the image / begin / end ids are the vocabulary's last three.
    `tokenizer_dir`: a tokenizer folder copied in (so the folder loads as a context encoder).
    Needs torch + transformers (tests, tiny notebook mode)."""
    import shutil
    from pathlib import Path

    import torch
    import transformers

    text = dict(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=512,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    config = transformers.Gemma3Config(
        text_config={**text, **text_overrides},
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
            vision_use_head=False,
        ),
        mm_tokens_per_image=4,
        image_token_index=vocab_size - 3,
        boi_token_index=vocab_size - 2,
        eoi_token_index=vocab_size - 1,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # random norms, biases and projection: none of them can hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "layernorm" in name else 0.0))
            elif "mm_input_projection" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    folder = Path(folder)
    model.save_pretrained(str(folder))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, folder / f.name)
    return model
