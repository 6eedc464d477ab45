"""`hyperlora-jax` command line: one file per verb group in this package, each with `register`."""

from __future__ import annotations

import argparse
import errno
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
    "hyperlora_jax.cli.serve",  # serve
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
        # A failure is exit 2; an error class with its own code (a SIGTERM interruption: 143,
        # as if killed) is a stop, not an error, and says so in its own words.
        code = getattr(e, "exit_code", 2)
        # one line even when a wrapped library message (YAML, absl) spans several
        text = " ".join(x.strip() for x in str(e).splitlines() if x.strip().strip("^"))
        print(f"error: {text}" if code == 2 else str(e), file=sys.stderr)
        return code
    except OSError as e:  # the machine, not the input: exit 1, one line naming path and fix
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 1


_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write to a writable folder",
    errno.EACCES: "no permission; check the folder's owner and mode, or write elsewhere",
    errno.EPERM: "not permitted; check the folder's owner and mode, or write elsewhere",
    errno.ENOTDIR: "a parent of this path is a file, not a folder; choose another path",
    errno.EEXIST: "a file is in the way; remove it or choose another path",
    errno.EISDIR: "this is a folder; give a file path",
    errno.ENOENT: "no such file or folder; check the path",
}


def os_error_message(e: OSError) -> str:
    """'<strerror>: <path> (<what to do>)' for an OSError."""
    msg = e.strerror or str(e)
    if e.filename is not None:
        msg += f": {e.filename}"
    hint = _OS_HINTS.get(e.errno)
    return f"{msg} ({hint})" if hint else msg
