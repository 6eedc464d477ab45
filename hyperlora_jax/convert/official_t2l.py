"""Official Text-to-LoRA release folder -> our T2L checkpoint (`convert official-t2l`).

Reads `hypermod.pt` with the safe unpickler, `args.yaml` with a YAML loader that turns python
tags into plain data, and `adapter_config.json`; rebuilds the architecture from them and maps
every tensor strictly (a missing or unused tensor is an error). The layer-type (module) order is
taken from the order of the `heads.*` keys in hypermod.pt: PEFT stores target_modules as a set, so
the order in args.yaml / adapter_config.json can differ from the one the hypernetwork was trained
with (as in the released SakanaAI/text-to-lora checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hyperlora_jax.convert.safe_unpickle import load_torch_file
from hyperlora_jax.errors import CheckpointError, ConfigError
from hyperlora_jax.hypernet.t2l.checkpoint import check_base_model, check_params, save_checkpoint
from hyperlora_jax.hypernet.t2l.model import T2LConfig
from hyperlora_jax.hypernet.t2l.task_encoder import encoder_spec_for
from hyperlora_jax.models.config import load_hf_config
from hyperlora_jax.models.hf import config_from_hf
from hyperlora_jax.models.load import folder_fingerprint


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader that reads unknown tags (e.g. !!python/object) as plain data, never code."""


def _plain_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {"__tag__": suffix, "value": value}


_PlainLoader.add_multi_constructor("!", _plain_tag)
_PlainLoader.add_multi_constructor("tag:yaml.org,2002:python/", _plain_tag)


# Keys every official args.yaml holds that the config is built from (the rest default as there).
REQUIRED_ARGS = ("hypernet_latent_size", "shared_AB_head", "autoreg_gen", "model_dir")


def read_args_yaml(path: str | Path) -> dict:
    """args.yaml as a dict; python-specific tags become {"__tag__", "value"} records."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no args.yaml at {p}; the release folder must hold it")
    try:
        data = yaml.load(p.read_text(), Loader=_PlainLoader)  # noqa: S506 (safe subclass)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{p} should hold a mapping of training arguments")
    return data


def _read_adapter_config(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"no adapter_config.json at {path}; the release folder must hold it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _head_kind(args: dict) -> str:
    shared, autoreg = bool(args.get("shared_AB_head")), bool(args.get("autoreg_gen"))
    if shared and autoreg:
        return "S"
    if shared:
        return "M"
    if autoreg:
        raise ConfigError(
            "args.yaml has autoreg_gen=True with shared_AB_head=False (an ablation variant); "
            "only the L, M and S heads are supported"
        )
    return "L"


def _module_order(sd: dict, path: Path) -> list[str]:
    order = []
    for k in sd:
        if k.startswith("heads.") and k.endswith(".weight"):
            order.append(k[len("heads.") : -len(".weight")])
    if not order:
        raise CheckpointError(
            f"{path} has no heads.<module>.weight tensors: not a T2L hypermod.pt (or truncated)"
        )
    return order


def build_config(sd: dict, args: dict, adapter_cfg: dict, path: Path) -> T2LConfig:
    """The T2LConfig of an official checkpoint, cross-checked against the tensor shapes."""
    missing = [k for k in REQUIRED_ARGS if k not in args]
    if missing:
        raise CheckpointError(
            f"args.yaml is missing {', '.join(missing)}: not the args.yaml of a T2L training run "
            "(the release folder's args.yaml is written by the official train script)"
        )
    modules = _module_order(sd, path)
    if args.get("encoder_type", "linear") != "linear":
        raise ConfigError(
            f"encoder_type={args.get('encoder_type')!r} (an ablation) is not supported; "
            "only the released 'linear' task encoder is"
        )
    if args.get("use_one_hot_task_emb"):
        raise ConfigError("use_one_hot_task_emb checkpoints are not supported")
    if args.get("mt_lora_path") and args.get("learnable_AB_offset"):
        pass  # the offset is stored in the state dict either way
    r = int(adapter_cfg.get("r", 8))
    targets = set(adapter_cfg.get("target_modules") or args.get("target_modules") or [])
    if targets and targets != set(modules):
        raise CheckpointError(
            f"hypermod.pt heads {modules} do not match adapter_config.json target_modules "
            f"{sorted(targets)}"
        )
    missing = [
        f"AB_offset.{ab}.{m}" for m in modules for ab in "AB" if f"AB_offset.{ab}.{m}" not in sd
    ]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; cannot infer the module sizes")
    in_f = tuple(int(sd[f"AB_offset.A.{m}"].shape[-1]) for m in modules)
    out_f = tuple(int(sd[f"AB_offset.B.{m}"].shape[-2]) for m in modules)
    try:
        task_w = sd["task_encoder.mlp.0.weight"]
        num_layers = int(sd["layer_depth_encoder.0.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"{path} lacks tensor {e}; not a complete T2L checkpoint") from e
    latent = int(args.get("hypernet_latent_size", 128))
    if task_w.shape[0] != latent // 2:
        raise CheckpointError(
            f"args.yaml hypernet_latent_size={latent} but task_encoder output is {task_w.shape[0]}"
        )
    head = _head_kind(args)
    cfg = T2LConfig(
        modules=tuple(modules),
        in_features=in_f,
        out_features=out_f,
        num_layers=num_layers,
        task_emb_size=int(task_w.shape[1]),
        latent_size=latent,
        head_in_size=int(args.get("head_in_size", 512)),
        head=head,
        learnable_pos_emb=bool(args.get("learnable_pos_emb")) and head == "S",
        head_use_bias=f"heads.{modules[0]}.bias" in sd,
        head_init="sft"
        if args.get("training_task", "sft") == "sft" and not args.get("mt_lora_path")
        else "default",
        rank=r,
        lora_alpha=float(adapter_cfg.get("lora_alpha", 16)),
        use_rslora=bool(adapter_cfg.get("use_rslora", False)),
        dropout_rate=0.05,
        training_task=str(args.get("training_task", "sft")),
        factorized=bool(args.get("factorized", False)),
        pred_z_score=bool(args.get("pred_z_score", False)),
        delta_w_scaling=float(args.get("delta_w_scaling", 10000)),
    )
    for i, m in enumerate(modules):
        w = sd[f"heads.{m}.weight"]
        if tuple(w.shape) != (cfg.head_width(m), cfg.head_in_size):
            raise CheckpointError(
                f"heads.{m}.weight has shape {tuple(w.shape)}, expected "
                f"{(cfg.head_width(m), cfg.head_in_size)} for head {head} (r={r}, "
                f"in={in_f[i]}, out={out_f[i]}, head_in_size={cfg.head_in_size}); "
                "args.yaml / adapter_config.json do not describe this checkpoint"
            )
    return cfg


def _linear(sd, prefix):
    out = {"kernel": np.ascontiguousarray(sd.pop(f"{prefix}.weight").T)}
    if f"{prefix}.bias" in sd:
        out["bias"] = sd.pop(f"{prefix}.bias")
    return out


def _norm(sd, prefix):
    return {"scale": sd.pop(f"{prefix}.weight"), "bias": sd.pop(f"{prefix}.bias")}


def map_state_dict(sd: dict, cfg: T2LConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """Official state dict -> (our params tree, constants); strict in both directions."""
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items() if isinstance(v, np.ndarray)}
    p: dict[str, Any] = {
        "task_linear": _linear(sd, "task_encoder.mlp.0"),
        "task_norm": _norm(sd, "task_encoder.mlp.1"),
        "depth_embed": {"embedding": sd.pop("layer_depth_encoder.0.weight")},
        "depth_norm": _norm(sd, "layer_depth_encoder.1"),
        "type_embed": {"embedding": sd.pop("layer_type_encoder.0.weight")},
        "type_norm": _norm(sd, "layer_type_encoder.1"),
        "mixer_fc1": _linear(sd, "mixer.1"),
        "mixer_fc2": _linear(sd, "mixer.4"),
        "mlp3_norm": _norm(sd, "mlp3.0"),
        "mlp3_fc1": _linear(sd, "mlp3.1"),
        "mlp3_fc2": _linear(sd, "mlp3.4"),
    }
    for blk in ("mlp1", "mlp2"):
        p[blk] = {
            "norm": _norm(sd, f"{blk}.mlp.0"),
            "fc1": _linear(sd, f"{blk}.mlp.1"),
            "fc2": _linear(sd, f"{blk}.mlp.4"),
        }
    for m in cfg.modules:
        p[f"heads_{m}"] = _linear(sd, f"heads.{m}")
    if cfg.head in ("M", "S"):
        p["out_emb"] = np.stack(
            [np.stack([sd.pop(f"out_emb.{m}.A"), sd.pop(f"out_emb.{m}.B")]) for m in cfg.modules]
        )
        p["out_emb_norm"] = _norm(sd, "out_emb_norm")
    if cfg.learnable_pos_emb:
        p["pos_embed"] = {"embedding": sd.pop("pos_emb.0.weight")}
        p["pos_norm"] = _norm(sd, "pos_emb.1")
    constants: dict[str, np.ndarray] = {}
    for src, dst in (
        ("AB_offset", "ab_offset"),
        ("mean_recon_target", "mean"),
        ("std_recon_target", "std"),
    ):
        for m in cfg.modules:
            for ab in "AB":
                key = f"{src}.{ab}.{m}"
                if key not in sd:
                    continue
                v = sd.pop(key)
                if ab == "B":  # official [L, out, r] -> ours [L, r, out]
                    v = np.ascontiguousarray(np.swapaxes(v, -1, -2))
                if np.any(v != 0):  # the official SFT release stores zeros: drop them
                    constants[f"{dst}.{ab.lower()}.{m}"] = v
    if sd:
        raise CheckpointError(f"hypermod.pt has tensors this converter does not map: {sorted(sd)}")
    check_params(p, cfg, "converted T2L params")
    return p, constants


def convert(src: str | Path, out: str | Path, base_model: str | Path | None = None) -> str:
    """Convert an official T2L release folder into our checkpoint folder; returns its path.

    `base_model` (optional): a HF model folder to check the hypernetwork's shapes against; its
    fingerprint is recorded, so loading with another base model is refused later.
    """
    src = Path(src)
    if src.is_file():
        src = src.parent
    pt = src / "hypermod.pt"
    if not pt.is_file():
        raise CheckpointError(f"no hypermod.pt in {src}; pass the official release folder")
    args = read_args_yaml(src / "args.yaml")
    adapter_cfg = _read_adapter_config(src / "adapter_config.json")
    sd = load_torch_file(pt)
    cfg = build_config(sd, args, adapter_cfg, pt)
    params, constants = map_state_dict(dict(sd), cfg)
    base_name = str(args.get("model_dir") or adapter_cfg.get("base_model_name_or_path") or "")
    adapter_base = adapter_cfg.get("base_model_name_or_path")
    if adapter_base and args.get("model_dir") and adapter_base.rstrip("/") != base_name.rstrip("/"):
        raise CheckpointError(
            f"args.yaml model_dir={base_name!r} differs from adapter_config.json "
            f"base_model_name_or_path={adapter_base!r}; the release folder is inconsistent"
        )
    if base_model is not None:
        check_base_model(cfg, config_from_hf(load_hf_config(base_model)), base_name)
    meta = {
        "base_model": base_name.rstrip("/"),
        "base_fingerprint": None if base_model is None else folder_fingerprint(base_model),
        "lora": {
            "r": cfg.rank,
            "lora_alpha": cfg.lora_alpha,
            "use_rslora": cfg.use_rslora,
            "lora_dropout": float(adapter_cfg.get("lora_dropout", 0.0)),
            "target_modules": list(cfg.modules),
        },
        "encoder": encoder_spec_for(args.get("emb_model")),
        "source": {
            "kind": "official-t2l",
            "path": str(src),
            "run_name": args.get("run_name"),
            "args_target_modules": list(args.get("target_modules") or []),
        },
    }
    # Re-converting into a previous T2L checkpoint replaces it; any other non-empty folder is kept.
    again = (Path(out) / "t2l.json").is_file()
    return str(save_checkpoint(out, cfg, params, meta, constants=constants, overwrite=again))
