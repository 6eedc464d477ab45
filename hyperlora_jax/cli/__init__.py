"""`hyperlora-jax` command line: one file per verb group in this package, each with `register`."""

from __future__ import annotations

import argparse
import importlib
import sys

from hyperlora_jax.errors import HyperLoraError

# Modules exposing `register(subparsers)`; each adds its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "hyperlora_jax.cli.models",  # fetch-model, chat
    "hyperlora_jax.cli.lora",  # export-peft
    "hyperlora_jax.cli.d2l",  # internalize
    "hyperlora_jax.cli.t2l",  # generate-adapter
    "hyperlora_jax.cli.convert",  # convert official-d2l | official-t2l
    "hyperlora_jax.cli.data",  # data niah | selfgen | ...
    "hyperlora_jax.cli.train",  # train, plan, export-run
    "hyperlora_jax.cli.eval",  # eval d2l | t2l
    "hyperlora_jax.cli.demo",  # demo
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
