"""`hyperlora-jax export-peft`: our adapter folder -> a HF PEFT LoRA folder."""

from __future__ import annotations

import argparse

from hyperlora_jax.cli.common import add_allow_other_base
from hyperlora_jax.paths import Path


def _export_peft(args: argparse.Namespace) -> int:
    from hyperlora_jax.lora.peft import export_peft
    from hyperlora_jax.lora.storage import load_adapter, read_adapter_meta
    from hyperlora_jax.models.config import ModelConfig
    from hyperlora_jax.models.load import check_fingerprint, folder_fingerprint

    meta = read_adapter_meta(args.adapter_dir)
    adapter = load_adapter(args.adapter_dir)
    base = args.base_model or meta.get("base_model")
    fingerprint = meta.get("base_fingerprint")
    if args.base_model and Path(args.base_model).is_dir():  # a hub id has no weights here
        given = folder_fingerprint(args.base_model)
        check_fingerprint(
            meta,
            given,
            args.base_model,
            f"the adapter {args.adapter_dir}",
            allow_other_base=args.allow_other_base,
        )
        fingerprint = given
    model_config = None
    if meta.get("model_config") and not (base and Path(base).is_dir()):
        model_config = ModelConfig.from_json(meta["model_config"])
    out = export_peft(
        adapter,
        base,
        args.out_dir,
        model_config=model_config,
        rslora=args.rslora,
        overwrite=args.overwrite,
        base_fingerprint=fingerprint,
    )
    print(f"wrote PEFT adapter (rank {adapter.rank}, scale {adapter.scale:g}) to {out}")
    return 0


def register(subparsers) -> None:
    """Add this area's subcommands to the `hyperlora-jax` parser."""
    p = subparsers.add_parser(
        "export-peft",
        help="write a saved adapter as a HF PEFT LoRA folder (PEFT, vLLM)",
        description="Convert an adapter folder written by save_adapter into adapter_model."
        "safetensors + adapter_config.json. PEFT's scaling equals ours exactly: "
        "lora_alpha = scale*r, or scale*sqrt(r) with --rslora.",
    )
    p.add_argument("adapter_dir", help="folder with adapter.safetensors + adapter.json")
    p.add_argument("out_dir", help="new folder for the PEFT adapter")
    p.add_argument(
        "--base-model",
        default=None,
        help="base model folder (its config.json is copied for vLLM) or hub id; "
        "default: the base_model recorded in adapter.json",
    )
    p.add_argument("--rslora", action="store_true", help="write use_rslora=True (T2L style)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    add_allow_other_base(p, "adapter")
    p.set_defaults(func=_export_peft)
