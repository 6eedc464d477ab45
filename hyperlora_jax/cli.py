"""`hyperlora-jax` command line. Each area registers its own subcommands in its `cli.py`."""

from __future__ import annotations

import argparse
import importlib
import sys

from hyperlora_jax.errors import HyperLoraError

# Modules exposing `register(subparsers)`; each adds its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "hyperlora_jax.models.cli",  # fetch-model, chat
    "hyperlora_jax.lora.cli",  # export-peft
    "hyperlora_jax.hypernet.doc_to_lora_cli",  # internalize
    "hyperlora_jax.hypernet.text_to_lora_cli",  # generate-adapter
    "hyperlora_jax.convert.cli",  # convert official-d2l | official-t2l
    "hyperlora_jax.data.cli",  # data niah | selfgen | ...
    "hyperlora_jax.train.cli",  # train, plan, export-run
    "hyperlora_jax.eval.cli",  # eval d2l | t2l
    "hyperlora_jax.demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperlora-jax", description="Hypernetworks that write LoRA adapters, in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except HyperLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
