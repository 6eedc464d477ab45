"""Argument helpers shared by the command modules. Only light imports here: the parser is built
from every command module for `--help`, which must not wait for jax."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from hyperlora_jax.errors import ConfigError, InputError
from hyperlora_jax.paths import Path

# Base models are loaded by hyperlora_jax.models.load.load_base, which takes all of these.
MODEL_HELP = "known model name (see fetch-model), model folder, .gguf file or hub id"


def choice_list(text: str, allowed: Collection[str], what: str = "method") -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'), each one of `allowed`."""
    out = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in out if m not in allowed]
    if bad or not out:
        raise ConfigError(f"unknown {what}(s) {bad or text!r}; choose from {', '.join(allowed)}")
    return out


def name_value_pairs(specs: Iterable[str], flag: str, example: str) -> dict[str, str]:
    """Repeated NAME=VALUE arguments -> {NAME: VALUE}."""
    out = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"{flag} {spec!r}: write NAME=VALUE, e.g. {example}")
        name, value = spec.split("=", 1)
        out[name] = value
    return out


def check_output_dir(path: str | Path) -> Path:
    """Refuse an output folder that is a file before the work starts, not after."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out} is a file; give a folder path")
    return out


def output_dir(path: str | Path) -> Path:
    """The results folder of a command, created if missing (files in it are replaced)."""
    out = check_output_dir(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _number(kind, text: str, ok, need: str):
    import argparse

    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
    return value


# argparse `type=`s: a bad number is one usage line naming the flag, before any model loads.
def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, "a number >= 0")


def probability(text: str) -> float:
    return _number(float, text, lambda v: 0 < v <= 1, "a number in (0, 1]")


def add_allow_other_base(parser, records: str) -> None:
    """--allow-other-base: the escape from the base-model fingerprint check (what `records` it)."""
    parser.add_argument(
        "--allow-other-base",
        action="store_true",
        help=f"use a base model whose fingerprint differs from the one the {records} records",
    )


MESH_HELP = (
    "device mesh data=N,fsdp=N,tensor=N over this process's devices, as `train --mesh` (-1 = "
    "the remaining devices): base weights laid out by the training rules, rows (documents, "
    "questions) split over data x fsdp; default: one device"
)


def add_mesh(parser) -> None:
    """--mesh: sharded inference (models/sharding.py)."""
    parser.add_argument("--mesh", default=None, metavar="data=N,fsdp=N,tensor=N", help=MESH_HELP)


def mesh_from_args(args):
    """The Mesh of --mesh (None without it); a ConfigError naming the fix when the sizes do not
    fit the visible devices. Called before any model loads."""
    if not getattr(args, "mesh", None):
        return None
    from hyperlora_jax.models.sharding import mesh_from_spec

    return mesh_from_spec(args.mesh)
