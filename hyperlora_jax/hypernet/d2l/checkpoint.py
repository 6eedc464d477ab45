"""Our D2L checkpoint folder: params.safetensors (flat "a/b/c" keys) + d2l_config.json.

d2l_config.json holds everything needed to rebuild: the hypernetwork config, the base model id,
the LoRA rank/alpha/targets, the context-encoder spec and the base-model dims the hypernetwork
was built for (checked when a base model is attached). Base weights are never stored here.
Mirrors hypernet/t2l/checkpoint.py: save_checkpoint, load_checkpoint, check_base_model.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np

from hyperlora_jax.errors import CheckpointError, ConfigError
from hyperlora_jax.hypernet.d2l.model import D2LConfig, init_params
from hyperlora_jax.lora.storage import flatten_tree, load_tree, read_json, save_tree
from hyperlora_jax.models.config import ModelConfig
from hyperlora_jax.paths import Path

FORMAT = "hyperlora_jax.d2l"
VERSION = 1
WEIGHTS = "params.safetensors"
CONFIG = "d2l_config.json"


class D2LCheckpoint(NamedTuple):
    config: D2LConfig
    params: dict  # nested dict of f32 numpy arrays
    meta: dict[str, Any]  # the d2l_config.json document (or an official file's provenance)


def expected_shapes(config: D2LConfig) -> dict[str, tuple[int, ...]]:
    """Flat key -> shape of every hypernetwork parameter (nothing allocated)."""
    tree = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    return {k: tuple(v.shape) for k, v in flatten_tree(tree).items()}


def check_params(flat: dict[str, np.ndarray], config: D2LConfig, where: str) -> None:
    """Strict key/shape check against the architecture `config` describes."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{where}: parameters do not match the D2L config (missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''})"
        )
    for k, shape in want.items():
        if tuple(flat[k].shape) != shape:
            raise CheckpointError(
                f"{where}: {k} has shape {tuple(flat[k].shape)}, the config needs {shape}"
            )


def save_checkpoint(
    out_dir: str | Path,
    config: D2LConfig,
    params: dict,
    meta: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write params + config atomically (a temp folder renamed into place).

    meta: "base_model", "base_fingerprint" (models/load.py; checked when a base model is
    attached), "ctx_encoder_model" (stored as ctx_encoder.model), "base_dims" (default: the
    config's); any other key is stored as is (e.g. "source", "training").
    """
    extra = dict(meta or {})
    base_model = extra.pop("base_model", None)
    base_fingerprint = extra.pop("base_fingerprint", None)
    ctx_encoder_model = extra.pop("ctx_encoder_model", None)
    base_dims = extra.pop("base_dims", None)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_tree(params).items()}
    check_params(flat, config, "save_checkpoint")
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "hypernet": config.to_json(),
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "base_dims": base_dims or base_dims_of_config(config),
        "lora": {
            "r": config.rank,
            "alpha": config.lora_alpha,
            "target_modules": list(config.modules),
        },
        "ctx_encoder": {
            "type": config.ctx_encoder_type,
            "model": ctx_encoder_model,
            "early_exit_layer": config.early_exit_layer,
            "last_layer": config.ctx_encoder_last_layer,
        },
        "num_params": int(sum(math.prod(v.shape) for v in flat.values())),
        **extra,
    }
    return save_tree(out_dir, {WEIGHTS: flat}, CONFIG, doc, overwrite=overwrite)


def base_dims_of_config(config: D2LConfig) -> dict[str, Any]:
    """What the hypernetwork assumes about its base model: L and (d_in, d_out) per module."""
    return {
        "num_layers": config.num_layers,
        "modules": {m: [i, o] for m, i, o in config.module_dims},
    }


def check_base_model(config: D2LConfig, base_config: ModelConfig, where: str) -> None:
    """A hypernetwork is tied to its base model's depth and module shapes."""
    want = base_dims_of_config(config)
    got = {
        "num_layers": base_config.num_layers,
        "modules": {m: list(base_config.module_dims(m)) for m in config.modules},
    }
    if want != got:
        raise CheckpointError(
            f"{where} was trained for a base model with {want} but the loaded base model has "
            f"{got}; load the base model named in the checkpoint"
        )


def read_config(ckpt_dir: str | Path) -> tuple[D2LConfig, dict[str, Any]]:
    """(config, the d2l_config.json document) of our checkpoint folder."""
    p = Path(ckpt_dir) / CONFIG
    hint = "pass a folder written by save_checkpoint or `hyperlora-jax convert official-d2l`"
    if Path(ckpt_dir).is_file():
        hint = (
            f"an official .bin converts with `hyperlora-jax convert official-d2l {ckpt_dir} OUT` "
            "or loads with hyperlora_jax.api.load_d2l"
        )
    meta = read_json(p, FORMAT, hint)
    try:
        config = D2LConfig.from_json(meta["hypernet"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: bad hypernet config ({e})") from e
    return config, meta


def load_checkpoint(ckpt_dir: str | Path) -> D2LCheckpoint:
    """(config, params as a nested dict of numpy f32 arrays, metadata) from our folder."""
    config, meta = read_config(ckpt_dir)
    params = load_tree(Path(ckpt_dir) / WEIGHTS)
    check_params(flatten_tree(params), config, str(Path(ckpt_dir) / WEIGHTS))
    return D2LCheckpoint(config, params, meta)


def trained_chunk_size(meta: dict[str, Any]) -> int | None:
    """The longest context chunk a checkpoint's training run used (`max_ctx_chunk_len` of the
    config its `training` record holds), or None when it does not say (official releases)."""
    config = (meta.get("training") or {}).get("config") or {}
    for part in ("train", "eval"):
        value = (config.get(part) or {}).get("max_ctx_chunk_len")
        if isinstance(value, int) and value > 0:
            return value
    return None
