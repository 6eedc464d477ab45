"""ModelConfig: the architecture of a frozen base decoder, from a HF config.json or a named preset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from hyperlora_jax.errors import ConfigError

# Module names an adapter may target, HF spelling. Attention ones live under `self_attn`, MLP ones under `mlp`.
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTN_MODULES + MLP_MODULES

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only LM. Every family difference is a field, not a subclass."""

    family: str  # one of FAMILIES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Gemma-3: RoPE base of the sliding (local) layers; None = same as rope_theta.
    rope_local_theta: float | None = None
    # Llama-3.1 style scaling as a sorted tuple of (key, value) pairs, or None.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 8192
    # Window for sliding layers (None = no sliding layers at all).
    sliding_window: int | None = None
    # Per-layer attention kind, "full" or "sliding"; len == num_layers.
    layer_types: tuple[str, ...] = ()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3, Gemma-3: RMSNorm on q and k per head
    attn_logit_softcap: float | None = None  # Gemma-2
    final_logit_softcap: float | None = None  # Gemma-2
    query_pre_attn_scalar: float | None = None  # Gemma-2/3: softmax scale = scalar ** -0.5
    embed_scale: bool = False  # Gemma: multiply embeddings by sqrt(hidden_size)
    norm_plus_one: bool = False  # Gemma: RMSNorm weight applied as (1 + w)
    sandwich_norm: bool = False  # Gemma-2/3: extra post-attention / post-ffw norms
    hidden_act: str = "silu"  # "silu" or "gelu_pytorch_tanh"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(
                f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}"
            )

    def module_dims(self, name: str) -> tuple[int, int]:
        """(d_in, d_out) of a target module, e.g. module_dims('down_proj') == (I, H)."""
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        dims = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if name not in dims:
            raise ConfigError(f"unknown target module {name!r}; expected one of {TARGET_MODULES}")
        return dims[name]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ModelConfig:
        d = dict(d)
        for k in ("layer_types",):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple((k, v) for k, v in d["rope_scaling"])
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)


def load_hf_config(path: str | Path) -> dict:
    """Read a HF config.json (a file or a folder holding one) with a clear error if it is missing."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"no config.json at {p}; pass a model folder saved with save_pretrained")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from e
