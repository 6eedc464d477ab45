"""Model / hypernetwork shapes the benchmarks run (random weights: speed does not depend on them).

Base models: "tiny" (quick mode), "smollm2" (SmolLM2-135M-Instruct shape), "gemma2_2b"
(Gemma-2-2b-it shape). D2L hypernetworks: "official" = the official main architecture
(reference/official-cpu-timings.md: 157,481,440 params on SmolLM2), "cpu_default" = the embedded
CPU-sized default of configs/d2l.py:smollm2_qa, "tiny" for smoke runs.
"""

from __future__ import annotations

import numpy as np

from hyperlora_jax.errors import ConfigError
from hyperlora_jax.hypernet.d2l.model import D2LConfig
from hyperlora_jax.models.chat import split_ctx_ids
from hyperlora_jax.models.config import ModelConfig, get_preset
from hyperlora_jax.models.testing import tiny_config

TINY_BASE = tiny_config(
    vocab_size=256, hidden_size=64, intermediate_size=128, head_dim=16, max_position_embeddings=4096
)
BASES = {
    "tiny": lambda: TINY_BASE,
    "smollm2": lambda: get_preset("smollm2-135m-instruct"),
    "gemma2_2b": lambda: get_preset("gemma-2-2b-it"),
}
HYPERNETS = {
    "tiny": dict(latent_size=16, num_blocks=1, n_latent_queries=4),
    "cpu_default": dict(latent_size=32, num_blocks=2),
    "official": {},
}
# Official chat affix lengths for SmolLM2 (chatml): 8-token prefix, 6-token suffix, so a
# 4096-token document splits at 1024 into chunks of 1030/1038/1038/1032 tokens.
PREFIX_LEN, SUFFIX_LEN = 8, 6


def base_config(name: str) -> ModelConfig:
    if name not in BASES:
        raise ConfigError(f"unknown benchmark base {name!r}; choose from {', '.join(BASES)}")
    return BASES[name]()


def d2l_config(name: str, base: ModelConfig) -> D2LConfig:
    if name not in HYPERNETS:
        raise ConfigError(f"unknown hypernetwork {name!r}; choose from {', '.join(HYPERNETS)}")
    return D2LConfig.for_base(base, ("down_proj",), **HYPERNETS[name])


def t2l_config(base: ModelConfig, tiny: bool = False):
    """The official T2L L head for `base` (reference/official-cpu-timings.md): latent 128, head
    input 512, q_proj + v_proj, task embeddings of size 1024 given directly."""
    from hyperlora_jax.hypernet.t2l.model import T2LConfig

    mods = ("q_proj", "v_proj")
    latent, head_in = (16, 32) if tiny else (128, 512)
    return T2LConfig(
        modules=mods, in_features=tuple(base.module_dims(m)[0] for m in mods),
        out_features=tuple(base.module_dims(m)[1] for m in mods), num_layers=base.num_layers,
        task_emb_size=1024, latent_size=latent, head_in_size=head_in, head="L",
        head_init="default",
    )  # fmt: skip


def document_chunks(n_tokens: int, vocab: int, chunk: int | None = 1024, seed: int = 0):
    """A templated n-token document (prefix + random ids + suffix), split by the official rule."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, vocab, PREFIX_LEN).tolist()
    suffix = rng.integers(3, vocab, SUFFIX_LEN).tolist()
    body = rng.integers(3, vocab, max(n_tokens - PREFIX_LEN - SUFFIX_LEN, 1)).tolist()
    return split_ctx_ids(prefix + body + suffix, chunk, prefix, suffix)
