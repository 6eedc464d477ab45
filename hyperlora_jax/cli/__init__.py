"""`hyperlora-jax` command line: one file per verb group in this package, each with `register`."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
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


def _no_default(value) -> bool:
    """None, False (a flag), SUPPRESS and [] (repeatable flags) are not worth saying."""
    return value is None or value is False or value is argparse.SUPPRESS or value == []


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one worth saying (not None /
    False) and the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or _no_default(action.default) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _polish(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    """Defaults in every (sub)command's help, and a description where its module gave none
    (its one-line `help`, as a sentence)."""
    parser.formatter_class = HelpFormatter
    if parser.description is None and help_text:
        parser.description = help_text[0].upper() + help_text[1:].rstrip(".") + "."
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                _polish(child, helps.get(name))
        elif action.help is None and action.option_strings:
            # argparse shows no help line at all without a help text: give the default one
            if not _no_default(action.default):
                action.help = "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperlora-jax",
        description="Hypernetworks that write LoRA adapters, in JAX: Doc-to-LoRA (a document "
        "in, an adapter out) and Text-to-LoRA (a task description in, an adapter out).",
        epilog="`hyperlora-jax COMMAND --help` describes a command, its flags and their "
        "defaults. The first run of a command that names a model fetches it (one line says so).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _polish(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers (tokenizers only, here) would say at import that PyTorch is missing, which the
    # demo install leaves out on purpose
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
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
