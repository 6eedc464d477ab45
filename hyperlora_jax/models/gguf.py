"""Read llama.cpp GGUF files: metadata -> HF config, dequantized tensors -> HF-named state dict.

We go through HF naming on purpose: `fetch.py` writes the result as a save_pretrained folder, so
the same weights load in transformers (the parity reference) and in `hf.load_hf_model`.
Conversions undo what llama.cpp's convert_hf_to_gguf.py did, exactly as transformers' GGUF loader
does: llama q/k rows are un-permuted (llama.cpp interleaves RoPE halves) and Gemma norm weights
get 1 subtracted (llama.cpp stores 1 + w).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import CheckpointError, ConfigError
from hyperlora_jax.models import hf

SUPPORTED_ARCHS = ("llama", "gemma3")

# GGUF per-block tensor name -> HF name inside model.layers.N (family specific entries below).
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAMES_BY_ARCH = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors llama.cpp may add that HF models do not have (precomputed RoPE tables).
_IGNORED = ("rope_freqs", "rope_factors_long", "rope_factors_short")
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")


def read_gguf(path: str | os.PathLike) -> Any:
    """Open a GGUF file with gguf.GGUFReader, checking that every tensor lies inside the file.

    Raises CheckpointError naming the file when it is missing, not GGUF, corrupt or truncated.
    """
    import gguf

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"GGUF file not found: {p}")
    try:
        reader = gguf.GGUFReader(p)
    except Exception as e:  # the reader raises ValueError/IndexError/... on garbage
        raise CheckpointError(
            f"{p} is not a readable GGUF file ({type(e).__name__}: {e}); it is corrupt or "
            "truncated - download it again (hyperlora-jax fetch-model re-creates it)"
        ) from e
    size = p.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(
                f"{p} is truncated: tensor {t.name!r} ends at byte {end} but the file has {size} "
                "bytes; download it again"
            )
    return reader


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_architecture(reader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    return arch


def hf_config_from_gguf(reader) -> dict:
    """A HF config.json dict (transformers' own class defaults filled in) from GGUF metadata."""
    import transformers

    arch = gguf_architecture(reader)
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    d: dict[str, Any] = {
        "vocab_size": int(vocab),
        "hidden_size": int(g("embedding_length")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": int(g("attention.head_count")),
        "num_key_value_heads": int(g("attention.head_count_kv", g("attention.head_count"))),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(g("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
    }
    for key in ("bos", "eos", "padding"):
        v = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if v is not None:
            d["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(v)
    theta = float(g("rope.freq_base", 10000.0))
    if arch == "llama":
        model_type = "llama"
        d["head_dim"] = int(g("rope.dimension_count", d["hidden_size"] // d["num_attention_heads"]))
        d["rope_theta"] = theta
        if g("rope.scaling.type") not in (None, "none"):
            raise ConfigError(f"GGUF rope scaling {g('rope.scaling.type')!r} is not supported")
    else:
        model_type = "gemma3_text"
        d["head_dim"] = int(g("attention.key_length"))
        d["sliding_window"] = int(g("attention.sliding_window"))
        # Same as transformers' GGUF loader: global theta from the file, local theta default 1e4.
        d["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
    cfg = transformers.AutoConfig.for_model(model_type, **d)
    out = cfg.to_dict()
    out["architectures"] = ["LlamaForCausalLM" if arch == "llama" else "Gemma3ForCausalLM"]
    return out


def _hf_name(arch: str, gguf_name: str) -> str | None:
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        hf = _BLOCK_NAMES_BY_ARCH[arch].get(part) or _BLOCK_NAMES.get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _IGNORED:
        return ""
    hf = _TOP_NAMES.get(base)
    return None if hf is None else f"{hf}.{kind}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (halves -> interleaved pairs), as transformers does."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_state_dict(reader, dtype=np.float32) -> dict[str, np.ndarray]:
    """Every tensor dequantized to `dtype`, HF-named and HF-shaped ([out, in] for projections)."""
    import gguf

    arch = gguf_architecture(reader)
    path = getattr(reader.data, "filename", "<gguf>")
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = _hf_name(arch, t.name)
        if name == "":
            continue
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a {arch} GGUF")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{path}: tensor {t.name!r}: {e}") from e
        # GGUF shapes list the fastest axis first; numpy data is already [rows, cols] = [out, in].
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
        if arch == "llama" and ".attn_q." in t.name:
            w = _unpermute(w, n_head)
        elif arch == "llama" and ".attn_k." in t.name:
            w = _unpermute(w, n_kv)
        if arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1.0
        out[name] = np.ascontiguousarray(w.astype(dtype))
    return out


def load_gguf(path: str | os.PathLike, dtype=None):
    """(ModelConfig, params) straight from a GGUF file (dequantized; no folder written)."""

    reader = read_gguf(path)
    hf_cfg = hf_config_from_gguf(reader)
    config = hf.config_from_hf(hf_cfg)
    sd = gguf_state_dict(reader)
    params = hf.params_from_getter(
        config, list(sd), sd.__getitem__, dtype or jnp.float32, source=str(path)
    )
    return config, params
