"""Our T2L checkpoint folder (written by save_checkpoint, e.g. by `convert official-t2l`):

  t2l.json               format/version, hypernet config (T2LConfig), base model id and
                         fingerprint (models/load.py), LoRA r/alpha/rsLoRA/targets (module
                         order = layer-type index order), task-encoder spec
  params.safetensors     hypernetwork params, keys = '/'-joined Flax param paths, f32
  constants.safetensors  (optional) non-zero AB_offset / recon mean / std, our layout [L, r, d]

Mirrors hypernet/d2l/checkpoint.py: save_checkpoint, load_checkpoint, check_base_model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from hyperlora_jax.errors import CheckpointError
from hyperlora_jax.hypernet.t2l.model import T2LConfig, init_params
from hyperlora_jax.hypernet.t2l.task_encoder import encoder_spec_for
from hyperlora_jax.lora.storage import (
    flatten_tree,
    load_safetensors,
    load_tree,
    read_json,
    save_tree,
)
from hyperlora_jax.models.config import ModelConfig
from hyperlora_jax.paths import Path

FORMAT = "hyperlora_jax.t2l"
VERSION = 1
CONFIG = "t2l.json"
WEIGHTS = "params.safetensors"
CONSTANTS = "constants.safetensors"


class T2LCheckpoint(NamedTuple):
    config: T2LConfig
    params: dict  # nested dict of f32 numpy arrays
    meta: dict[str, Any]  # the t2l.json document
    constants: dict[str, np.ndarray]  # flat "ab_offset.a.q_proj" -> [L, r, d]; {} when none


def save_checkpoint(
    out_dir: str | Path,
    config: T2LConfig,
    params: dict,
    meta: dict[str, Any] | None = None,
    *,
    constants: dict[str, np.ndarray] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a T2L checkpoint folder atomically (see the module docstring for the layout).

    meta: "base_model", "base_fingerprint" (models/load.py; checked when a base model is given),
    "lora" and "encoder" (defaults from the config / the base-LM encoder); any other key is
    stored as is (e.g. "source", "training").
    """
    meta = dict(meta or {})
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "hypernet": config.to_json(),
        "base_model": meta.pop("base_model", None),
        "base_fingerprint": meta.pop("base_fingerprint", None),
        "lora": meta.pop(
            "lora",
            {
                "r": config.rank,
                "lora_alpha": config.lora_alpha,
                "use_rslora": config.use_rslora,
                "target_modules": list(config.modules),
            },
        ),
        "encoder": meta.pop("encoder", encoder_spec_for(None)),
        **meta,
    }
    files = {WEIGHTS: jax.tree.map(lambda x: np.asarray(x, np.float32), params)}
    if constants:
        files[CONSTANTS] = {k: np.asarray(v, np.float32) for k, v in constants.items()}
    return save_tree(out_dir, files, CONFIG, doc, overwrite=overwrite)


def load_checkpoint(path: str | Path) -> T2LCheckpoint:
    """(config, params, metadata, constants) of a folder written by save_checkpoint."""
    d = Path(path)
    hint = "not a T2L checkpoint"
    if (d / "hypermod.pt").is_file():
        hint += f"; this is an official release: run `hyperlora-jax convert official-t2l {d} OUT`"
    doc = read_json(d / CONFIG, FORMAT, hint)
    if int(doc.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{d / CONFIG} is version {doc['version']}; this library reads {VERSION}"
        )
    try:
        config = T2LConfig.from_json(doc["hypernet"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{d / CONFIG}: malformed hypernet config ({e})") from e
    params = load_tree(d / WEIGHTS)
    check_params(params, config, str(d / WEIGHTS))
    constants = load_safetensors(d / CONSTANTS) if (d / CONSTANTS).is_file() else {}
    return T2LCheckpoint(config, params, doc, constants)


def check_params(params: dict, config: T2LConfig, where: str) -> None:
    """Strict key/shape check of a params tree against the architecture `config` describes."""
    want = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    flat_w = {k: tuple(v.shape) for k, v in flatten_tree(want).items()}
    flat_h = {k: tuple(np.shape(v)) for k, v in flatten_tree(params).items()}
    if flat_w.keys() != flat_h.keys():
        raise CheckpointError(
            f"{where}: params do not match the architecture: missing "
            f"{sorted(flat_w.keys() - flat_h.keys())}, "
            f"unexpected {sorted(flat_h.keys() - flat_w.keys())}"
        )
    bad = {k: (flat_h[k], flat_w[k]) for k in flat_w if flat_h[k] != flat_w[k]}
    if bad:
        raise CheckpointError(f"{where}: param shapes (got, want) differ from the config: {bad}")


def check_base_model(config: T2LConfig, base_config: ModelConfig, where: str) -> None:
    """Error if the base model's layers / module sizes differ from what the hypernet writes."""
    if base_config.num_layers != config.num_layers:
        raise CheckpointError(
            f"the T2L checkpoint writes {config.num_layers} layers (trained for base model "
            f"{where!r}) but the given base model has {base_config.num_layers}; "
            "use the base model named in args.yaml model_dir"
        )
    for m in config.modules:
        if tuple(base_config.module_dims(m)) != config.dims(m):
            raise CheckpointError(
                f"the T2L checkpoint (base model {where!r}) writes {m} as {config.dims(m)} "
                f"(in, out) but the given base model has {tuple(base_config.module_dims(m))}; "
                "use the base model named in args.yaml model_dir"
            )
