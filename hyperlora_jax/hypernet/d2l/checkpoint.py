"""Our D2L checkpoint folder: params.safetensors (flat "a/b/c" keys) + d2l_config.json.

d2l_config.json holds everything needed to rebuild: the hypernetwork config, the base model id,
the LoRA rank/alpha/targets, the context-encoder spec and the base-model dims the hypernetwork
was built for (checked when a base model is attached). Base weights are never stored here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hyperlora_jax.errors import CheckpointError, ConfigError
from hyperlora_jax.hypernet.d2l.model import D2LConfig, init_params
from hyperlora_jax.lora.storage import atomic_dir, load_safetensors, save_safetensors

FORMAT = "hyperlora_jax.d2l"
VERSION = 1
WEIGHTS = "params.safetensors"
CONFIG = "d2l_config.json"


def flatten(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = np.asarray(v)
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def expected_shapes(cfg: D2LConfig) -> dict[str, tuple[int, ...]]:
    """Flat key -> shape of every hypernetwork parameter (nothing allocated)."""
    tree = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    return {k: tuple(v.shape) for k, v in flatten_shapes(tree).items()}


def flatten_shapes(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_shapes(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_params(flat: dict[str, np.ndarray], cfg: D2LConfig, where: str) -> None:
    """Strict key/shape check against the architecture `cfg` describes."""
    want = expected_shapes(cfg)
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
    params: dict,
    cfg: D2LConfig,
    *,
    base_model: str | None,
    base_dims: dict[str, Any] | None = None,
    ctx_encoder_model: str | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write params + config atomically (a temp folder renamed into place)."""
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    check_params(flat, cfg, "save_checkpoint")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "hypernet": cfg.to_json(),
        "base_model": base_model,
        "base_dims": base_dims or base_dims_of_config(cfg),
        "lora": {
            "r": cfg.lora_r,
            "alpha": cfg.lora_alpha,
            "target_modules": list(cfg.target_modules),
        },
        "ctx_encoder": {
            "type": cfg.ctx_encoder_type,
            "model": ctx_encoder_model,
            "early_exit_layer": cfg.early_exit_layer,
            "last_layer": cfg.ctx_encoder_last_layer,
        },
        "num_params": int(sum(math.prod(v.shape) for v in flat.values())),
        **(extra or {}),
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_safetensors(flat, tmp / WEIGHTS, {"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def base_dims_of_config(cfg: D2LConfig) -> dict[str, Any]:
    """What the hypernetwork assumes about its base model: L and (d_in, d_out) per module."""
    return {
        "num_layers": cfg.num_layers,
        "modules": {m: [i, o] for m, i, o in cfg.module_dims},
    }


def read_config(ckpt_dir: str | Path) -> tuple[D2LConfig, dict[str, Any]]:
    p = Path(ckpt_dir) / CONFIG
    if not p.is_file():
        raise CheckpointError(
            f"no {CONFIG} in {ckpt_dir}; pass a folder written by save_checkpoint or "
            "`hyperlora-jax convert official-d2l`, or an official pytorch_model.bin"
        )
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a {FORMAT} config (format={meta.get('format')!r})")
    try:
        cfg = D2LConfig.from_json(meta["hypernet"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: bad hypernet config ({e})") from e
    return cfg, meta


def load_checkpoint(ckpt_dir: str | Path) -> tuple[dict, D2LConfig, dict[str, Any]]:
    """(params as a nested dict of numpy f32 arrays, config, metadata) from our folder."""
    cfg, meta = read_config(ckpt_dir)
    flat = load_safetensors(Path(ckpt_dir) / WEIGHTS)
    check_params(flat, cfg, str(Path(ckpt_dir) / WEIGHTS))
    return unflatten(flat), cfg, meta
