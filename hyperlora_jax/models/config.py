"""ModelConfig: the architecture of a frozen base decoder, from a HF config.json or a preset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from hyperlora_jax.errors import ConfigError

# Module names an adapter may target, HF spelling (attention: `self_attn.*`, MLP: `mlp.*`).
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
    # RoPE scaling ("rope_type": "llama3" or "linear", plus its keys) as a tuple of (key, value)
    # pairs, or None. It applies to the layers on `rope_theta` (Gemma-3: the global ones only).
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
        bad = [t for t in self.layer_types if t not in ("full", "sliding")]
        if bad:
            raise ConfigError(f"layer_types entries must be 'full' or 'sliding', got {bad[0]!r}")
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

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it use the sliding window? (all layers when layer_types is empty)."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        if not self.layer_types:
            return (True,) * self.num_layers
        return tuple(t == "sliding" for t in self.layer_types)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

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
    """Read a HF config.json (a file or a folder holding one); a clear error if it is missing."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"no config.json at {p}; pass a model folder saved with save_pretrained")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from e


def _gemma3_types(n: int) -> tuple[str, ...]:
    """Gemma-3's 5 local : 1 global pattern (layer i is global when (i + 1) % 6 == 0)."""
    return tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(n))


# Published HF config.json values (huggingface.co/<id>/blob/main/config.json).
PRESETS: dict[str, ModelConfig] = {
    "gemma-2-2b-it": ModelConfig(
        family="gemma2",
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=8192,
        sliding_window=4096,
        layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(26)),
        tie_word_embeddings=True,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        query_pre_attn_scalar=256.0,
        embed_scale=True,
        norm_plus_one=True,
        sandwich_norm=True,
        hidden_act="gelu_pytorch_tanh",
        bos_token_id=2,
        eos_token_id=(1, 107),
        pad_token_id=0,
    ),
    "gemma-3-270m": ModelConfig(
        family="gemma3",
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_local_theta=10000.0,
        max_position_embeddings=32768,
        sliding_window=512,
        layer_types=_gemma3_types(18),
        tie_word_embeddings=True,
        qk_norm=True,
        query_pre_attn_scalar=256.0,
        embed_scale=True,
        norm_plus_one=True,
        sandwich_norm=True,
        hidden_act="gelu_pytorch_tanh",
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
    "gemma-3-4b-it": ModelConfig(  # the text tower of Gemma3ForConditionalGeneration
        family="gemma3",
        vocab_size=262208,
        hidden_size=2560,
        intermediate_size=10240,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_local_theta=10000.0,
        rope_scaling=(("factor", 8.0), ("rope_type", "linear")),
        max_position_embeddings=131072,
        sliding_window=1024,
        layer_types=_gemma3_types(34),
        tie_word_embeddings=True,
        qk_norm=True,
        query_pre_attn_scalar=256.0,
        embed_scale=True,
        norm_plus_one=True,
        sandwich_norm=True,
        hidden_act="gelu_pytorch_tanh",
        bos_token_id=2,
        eos_token_id=(1, 106),
        pad_token_id=0,
    ),
    "mistral-7b-instruct-v0.2": ModelConfig(
        family="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=1_000_000.0,
        max_position_embeddings=32768,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-3.1-8b-instruct": ModelConfig(
        family="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=(
            ("factor", 8.0),
            ("high_freq_factor", 4.0),
            ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", 8192),
            ("rope_type", "llama3"),
        ),
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=(128001, 128008, 128009),
    ),
    "qwen3-4b-instruct-2507": ModelConfig(
        family="qwen3",
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=5_000_000.0,
        max_position_embeddings=262144,
        tie_word_embeddings=True,
        qk_norm=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "smollm2-135m-instruct": ModelConfig(
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A named real-model config (see PRESETS), e.g. get_preset('gemma-2-2b-it')."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
