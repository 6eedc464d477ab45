"""Hugging Face checkpoints -> (ModelConfig, params): config.json parsing and per-family key maps.

HF Linear weights are [out, in]; ours are [in, out] and stacked over layers ([L, in, out]).
`params_from_torch_state_dict` holds the key map so other loaders (GGUF) can reuse it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import CheckpointError, ConfigError
from hyperlora_jax.models.config import ModelConfig, load_hf_config
from hyperlora_jax.models.transformer import init_params

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3")
_FAMILY = {"gemma3_text": "gemma3"}
_ROPE_KEYS = (
    "rope_type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)
# Keys that may sit in a checkpoint without being model weights we load.
_IGNORED_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def _rope(params: Mapping[str, Any] | None, where: str) -> tuple[float, tuple | None]:
    params = dict(params or {})
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise ConfigError(f"{where}: rope_type {kind!r} is not supported (default, linear, llama3)")
    theta = float(params.get("rope_theta", 10000.0))
    if kind == "default":
        return theta, None
    return theta, tuple(sorted((k, params[k]) for k in _ROPE_KEYS if k in params))


def config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a HF config.json dict (transformers fills in the published defaults)."""
    from transformers import CONFIG_MAPPING

    model_type = d.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"unsupported model_type {model_type!r} in config.json; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    cfg = CONFIG_MAPPING[model_type](**{k: v for k, v in d.items() if k != "model_type"})
    if model_type == "gemma3":
        cfg, model_type = cfg.text_config, "gemma3_text"
    family = _FAMILY.get(model_type, model_type)
    gemma = family in ("gemma2", "gemma3")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if getattr(cfg, "mlp_bias", False):
        raise ConfigError(f"{model_type}: mlp_bias=True is not supported")

    rp = cfg.rope_parameters
    local_theta = None
    if family == "gemma3":
        theta, scaling = _rope(rp["full_attention"], "full_attention")
        local_theta, local_scaling = _rope(rp["sliding_attention"], "sliding_attention")
        if local_scaling is not None:
            raise ConfigError("gemma3: RoPE scaling on sliding layers is not supported")
    else:
        theta, scaling = _rope(rp, model_type)

    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    layer_types = ()
    if window is not None and types:
        layer_types = tuple("sliding" if t == "sliding_attention" else "full" for t in types)
        if "sliding" not in layer_types:
            window, layer_types = None, ()
    elif types and "sliding_attention" in types:
        raise ConfigError(f"{model_type}: sliding layers without a sliding_window")

    eos = cfg.eos_token_id
    return ModelConfig(
        family=family,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.rms_norm_eps),
        rope_theta=theta,
        rope_local_theta=local_theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.max_position_embeddings,
        sliding_window=window,
        layer_types=layer_types,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        attention_bias=True if family == "qwen2" else bool(getattr(cfg, "attention_bias", False)),
        qk_norm=family in ("qwen3", "gemma3"),
        attn_logit_softcap=getattr(cfg, "attn_logit_softcapping", None)
        if family == "gemma2"
        else None,
        final_logit_softcap=getattr(cfg, "final_logit_softcapping", None) if gemma else None,
        query_pre_attn_scalar=float(cfg.query_pre_attn_scalar) if gemma else None,
        embed_scale=gemma,
        norm_plus_one=gemma,
        sandwich_norm=gemma,
        hidden_act=(cfg.hidden_activation if gemma else cfg.hidden_act) or "silu",
        bos_token_id=cfg.bos_token_id,
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=cfg.pad_token_id,
    )


# ---------------------------------------------------------------------------------------------
# key map


def _hf_key(config: ModelConfig, path: tuple[str, ...]) -> tuple[str, bool]:
    """HF key template ('{i}' = layer) for one of our param paths, and whether to transpose."""
    if path == ("embedding",):
        return "model.embed_tokens.weight", False
    if path == ("final_norm", "scale"):
        return "model.norm.weight", False
    if path == ("lm_head",):
        return "lm_head.weight", True
    assert path[0] == "layers", path
    rest = path[1:]
    pre = "model.layers.{i}."
    if rest[0] in ("attn", "mlp"):
        block = "self_attn" if rest[0] == "attn" else "mlp"
        name, leaf = rest[1], rest[2]
        hf_leaf = {"kernel": "weight", "bias": "bias", "scale": "weight"}[leaf]
        return f"{pre}{block}.{name}.{hf_leaf}", leaf == "kernel"
    norms = {
        "attn_norm": "input_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm"
        if config.sandwich_norm
        else "post_attention_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
    }
    return f"{pre}{norms[rest[0]]}.weight", False


def _normalize_key(key: str) -> str:
    for old, new in (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ):
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor; numpy has no bf16, go through the bits
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def _expected_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    tree = jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def params_from_getter(
    config: ModelConfig,
    keys: list[str],
    get: Callable[[str], Any],
    dtype: Any = None,
    source: str = "state dict",
) -> dict:
    """Build our params from HF-named tensors. `keys`: available names; `get(name)` -> array."""
    available = {_normalize_key(k): k for k in keys}
    used: set[str] = set()

    def fetch(key: str, shape: tuple[int, ...], transpose: bool) -> np.ndarray:
        if key not in available:
            raise CheckpointError(f"{source}: missing tensor {key!r} for a {config.family} model")
        x = _to_numpy(get(available[key]))
        if transpose:
            x = x.T
        if tuple(x.shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(x.shape)}, expected {shape} "
                "(does config.json match the weights?)"
            )
        used.add(key)
        return x

    flat = {}
    for path, shape in _expected_shapes(config).items():
        template, transpose = _hf_key(config, path)
        if path[0] == "layers":
            x = np.stack(
                [
                    fetch(template.format(i=i), shape[1:], transpose)
                    for i in range(config.num_layers)
                ]
            )
        else:
            x = fetch(template, shape, transpose)
        flat[path] = jnp.asarray(x, dtype=dtype) if dtype is not None else jnp.asarray(x)

    extra = [
        k
        for k in available
        if k not in used
        and not k.startswith(_IGNORED_PREFIXES)
        and not k.endswith("rotary_emb.inv_freq")
        and not (k == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if extra:
        raise CheckpointError(
            f"{source}: {len(extra)} unexpected tensor(s) for a {config.family} model, e.g. "
            f"{sorted(extra)[:5]} (wrong architecture in config.json?)"
        )
    return _unflatten(flat)


def params_from_torch_state_dict(
    config: ModelConfig, state_dict: Mapping[str, Any], dtype: Any = None
) -> dict:
    """Params from a HF-named state dict (torch tensors or numpy arrays)."""
    return params_from_getter(config, list(state_dict), state_dict.__getitem__, dtype)


# ---------------------------------------------------------------------------------------------
# safetensors folders


def _open_safetensors(path: Path):
    from safetensors import safe_open

    if not path.exists():
        raise CheckpointError(f"missing weights file {path}")
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        raise CheckpointError(
            f"cannot read {path}: {e} (truncated or corrupt safetensors file? re-download it)"
        ) from e


def load_hf_model(
    path: str | Path, dtype: Any = None, sharding: Any = None
) -> tuple[ModelConfig, dict]:
    """(config, params) from a save_pretrained folder: config.json + model.safetensors or a
    sharded model.safetensors.index.json. dtype=None keeps the checkpoint dtype. `sharding`: a
    Sharding or a tree of them matching params, applied with device_put."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    config = config_from_hf(load_hf_config(folder))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = {f: folder / f for f in sorted(set(weight_map.values()))}
    else:
        single = folder / "model.safetensors"
        if not single.exists():
            raise CheckpointError(
                f"no model.safetensors or model.safetensors.index.json in {folder}; "
                "save the model with save_pretrained(safe_serialization=True)"
            )
        files = {single.name: single}
    handles = {name: _open_safetensors(p) for name, p in files.items()}
    owner: dict[str, str] = {}
    for name, h in handles.items():
        for k in h.keys():
            owner[k] = name

    def get(key: str):
        name = owner[key]
        try:
            return handles[name].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {files[name]}: {e}") from e

    params = params_from_getter(config, list(owner), get, dtype, source=str(folder))
    if sharding is not None:
        params = jax.device_put(params, sharding)
    return config, params
