"""Official D2L `pytorch_model.bin` (ModulatedPretrainedModel.state_dict) -> our checkpoint.

The file is read with the restricted unpickler (no code runs). The architecture is rebuilt from
the pickled `hypernet_config` / `ctx_encoder_args` (never from presets), tensors are mapped to our
Flax tree (nn.Linear [out, in] -> kernel [in, out]; EinMix weights kept; EinMix biases squeezed
from [1, L, 1, 1, d] to [L, d]; scalers [1, L, r, 1] -> [L, r]) and checked strictly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from hyperlora_jax.convert.safe_unpickle import load_torch_file, to_plain
from hyperlora_jax.errors import CheckpointError, ConfigError
from hyperlora_jax.hypernet.d2l.checkpoint import (
    D2LCheckpoint,
    check_base_model,
    check_params,
    save_checkpoint,
)
from hyperlora_jax.hypernet.d2l.model import D2LConfig
from hyperlora_jax.lora.storage import unflatten_tree

CONFIG_KEYS = ("base_model_name_or_path", "hypernet_config", "ctx_encoder_args")


def _get(d: dict, key: str, default: Any = ...) -> Any:
    if key in d:
        return d[key]
    if default is ...:
        raise CheckpointError(f"official D2L config has no field {key!r}")
    return default


def parse_config(plain: dict[str, Any]) -> tuple[D2LConfig, dict[str, Any]]:
    """D2LConfig + provenance from the JSON view (safe_unpickle.to_plain) of the three config
    entries. Legacy defaults as the official from_state_dict: num_pre_head_layers=4, use_bias."""
    hc = plain["hypernet_config"]
    ac = _get(hc, "aggregator_config")
    lora = _get(hc, "lora_config")
    ctx = plain["ctx_encoder_args"]
    targets = _get(lora, "target_modules")
    if isinstance(targets, dict) and "__set__" in targets:
        targets = targets["__set__"]
    targets = sorted(targets if isinstance(targets, list) else [targets])
    d_in, d_out = _get(hc, "feature_sizes")
    if not _get(hc, "per_rank_gen", True):
        raise CheckpointError("per_rank_gen=False D2L checkpoints are not supported")
    if _get(ac, "shared_weights", False):
        raise CheckpointError("shared_weights=True Perceiver checkpoints are not supported")
    if _get(hc, "extra_modules", None) or _get(ac, "num_extra_modules", 0):
        raise CheckpointError("D2L checkpoints with extra_modules are not supported")
    if _get(ac, "aggregator_type", "perceiver") not in ("perceiver", {"__args__": ["perceiver"]}):
        raise CheckpointError(f"unsupported aggregator {_get(ac, 'aggregator_type')!r}")
    ctx_type = _get(ctx, "ctx_encoder_type")
    if isinstance(ctx_type, dict):  # a pickled str-Enum
        ctx_type = (ctx_type.get("__args__") or [ctx_type.get("_value_")])[0]
    l2l = bool(_get(ac, "layer_to_layer_ctx_encoder"))
    if l2l != (ctx_type == "per_layer_activations"):
        raise CheckpointError(
            f"inconsistent checkpoint: ctx_encoder_type={ctx_type!r} but "
            f"layer_to_layer_ctx_encoder={l2l}"
        )
    layer_indices = _get(hc, "layer_indices", None)
    if isinstance(layer_indices, dict) and "__tensor__" in layer_indices:
        layer_indices = layer_indices["__tensor__"]
    num_layers = int(_get(ac, "num_layers"))
    if layer_indices is not None and list(layer_indices) != list(range(num_layers)):
        raise CheckpointError(f"only all-layer D2L checkpoints are supported ({layer_indices})")
    num_pre = _get(hc, "num_pre_head_layers", None)
    use_bias = _get(hc, "use_bias", None)
    try:
        cfg = D2LConfig(
            num_layers=num_layers,
            feature_size=int(_get(ac, "feature_size")),
            module_dims=tuple((m, int(d_in[m]), int(d_out[m])) for m in targets),
            rank=int(_get(lora, "r")),
            lora_alpha=float(_get(lora, "lora_alpha")),
            latent_size=int(_get(hc, "latent_size")),
            n_latent_queries=int(_get(ac, "n_latent_queries")),
            num_blocks=int(_get(ac, "num_blocks")),
            num_self_attn_per_block=int(_get(ac, "num_self_attn_per_block")),
            num_pre_head_layers=4 if num_pre is None else int(num_pre),
            per_layer_processing=bool(_get(hc, "per_layer_processing", True)),
            use_bias=True if use_bias is None else bool(use_bias),
            ctx_encoder_type=ctx_type,
            early_exit_layer=None if l2l else int(_get(ctx, "layer_idx")),
            ctx_encoder_last_layer=_get(ctx, "ctx_encoder_last_layer", None),
        )
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot rebuild the D2L architecture from the pickle: {e}") from e
    meta = {
        "base_model": plain["base_model_name_or_path"],
        "ctx_encoder_model": _get(ctx, "ctx_encoder_model_name_or_path", None),
        "quantize_ctx_encoder": bool(_get(ctx, "quantize_ctx_encoder", False)),
        "base_hidden_size": _get(hc, "base_hidden_size", None),
    }
    return cfg, meta


_LINEAR = re.compile(r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def map_tensor(key: str, x: np.ndarray, cfg: D2LConfig) -> tuple[str, np.ndarray]:
    """One official state-dict entry -> (our flat key, array)."""
    if key.startswith("aggregator.perceiver."):
        rest = key[len("aggregator.perceiver.") :]
        rest = re.sub(r"layers\.(\d+)\.", r"layers_\1.", rest)
        if _LINEAR.search(rest):
            return "aggregator/" + rest.replace(".weight", "/kernel").replace(".", "/"), x.T
        return "aggregator/" + rest.replace(".", "/"), x
    m = re.fullmatch(r"layers\.(\d+)\.layers\.(\d)\.(weight|bias)", key)
    if m:  # ResMLPBlockPerLayer: 0 LN, 1 EinMix, 3 EinMix, 4 LN
        j, idx, kind = m.groups()
        base = f"layers_{j}/"
        if idx in ("0", "4"):
            ln = "ln_in" if idx == "0" else "ln_out"
            return base + f"{ln}/" + ("scale" if kind == "weight" else "bias"), x
        n = "1" if idx == "1" else "2"
        if kind == "weight":
            return base + f"w{n}", x
        return base + f"b{n}", x.reshape(cfg.num_layers, x.shape[-1])
    m = re.fullmatch(r"layers\.(\d+)\.mlp\.(\d)\.(weight|bias)", key)
    if m:  # ResMLPBlock (shared): 0 LN, 2 Linear, 5 Linear, 6 LN
        j, idx, kind = m.groups()
        names = {"0": "ln_in", "2": "fc1", "5": "fc2", "6": "ln_out"}
        if idx not in names:
            raise CheckpointError(f"unexpected tensor {key}")
        name = names[idx]
        if name.startswith("ln"):
            return f"layers_{j}/{name}/" + ("scale" if kind == "weight" else "bias"), x
        return f"layers_{j}/{name}/" + ("kernel" if kind == "weight" else "bias"), (
            x.T if kind == "weight" else x
        )
    m = re.fullmatch(r"(bias_A|bias_B|scaler_A|scaler_B)\.(\w+)", key)
    if m:
        kind, mod = m.groups()
        if kind.startswith("scaler"):
            x = x.reshape(cfg.num_layers, cfg.rank)
        return f"{kind}/{mod}", x
    if key == "head.weight":
        if x.ndim == 3:  # n_modules == 1: [L, d, d_lora]
            x = x[:, None]
        return "head", x
    raise CheckpointError(f"unexpected tensor {key!r} in the D2L checkpoint")


def read_official(src: str | Path) -> D2LCheckpoint:
    """(D2LConfig, params nested dict of f32 numpy, provenance) from an official .bin."""
    sd = load_torch_file(src)
    missing = [k for k in CONFIG_KEYS if k not in sd]
    if missing:
        raise CheckpointError(
            f"{src} is not an official Doc-to-LoRA checkpoint: it lacks {missing} "
            "(expected the state dict of ctx_to_lora's ModulatedPretrainedModel)"
        )
    plain = {k: to_plain(sd[k]) for k in CONFIG_KEYS}
    if (
        not isinstance(plain["hypernet_config"], dict)
        or "aggregator_config" not in plain["hypernet_config"]
    ):
        raise CheckpointError(f"{src}: hypernet_config is not a D2L HypernetConfig")
    cfg, meta = parse_config(plain)
    flat = {}
    for k, v in sd.items():
        if k in CONFIG_KEYS:
            continue
        if k.startswith("_orig_mod."):
            k = k[len("_orig_mod.") :]
        if not isinstance(v, np.ndarray):
            raise CheckpointError(f"{src}: entry {k!r} is not a tensor")
        nk, nv = map_tensor(k, v, cfg)
        flat[nk] = np.asarray(nv, np.float32)
    check_params(flat, cfg, str(src))
    return D2LCheckpoint(cfg, unflatten_tree(flat), meta)


def convert(
    src: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    base_model: str | Path | None = None,
) -> str:
    """Convert `src` (pytorch_model.bin) into our checkpoint folder `out`; returns its path.

    Nothing is written unless everything parsed and checked (temp folder + rename).
    `base_model` (optional): a HF model folder checked against the hypernetwork's shapes; its
    fingerprint is recorded, so loading with another base model is refused later.
    """
    config, params, meta = read_official(src)
    fingerprint = None
    if base_model is not None:
        from hyperlora_jax.models.config import load_hf_config
        from hyperlora_jax.models.hf import config_from_hf
        from hyperlora_jax.models.load import folder_fingerprint

        check_base_model(config, config_from_hf(load_hf_config(base_model)), str(base_model))
        fingerprint = folder_fingerprint(base_model)
    save_checkpoint(
        out,
        config,
        params,
        {
            "base_model": meta["base_model"],
            "base_fingerprint": fingerprint,
            "ctx_encoder_model": meta["ctx_encoder_model"],
            "source": {"kind": "official-d2l", "path": str(src), **meta},
        },
        overwrite=overwrite,
    )
    return str(out)
