"""Argument helpers shared by the command modules. Only light imports here: the parser is built
from every command module for `--help`, which must not wait for jax."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from pathlib import Path

from hyperlora_jax.errors import ConfigError

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


def output_dir(path: str | Path) -> Path:
    """The results folder of a command, created if missing (files in it are replaced)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out
