"""Experiment configs from 'FILE.py:PRESET' plus '--config.a.b=VALUE' overrides: ml_collections
config files read through absl flags (`hyperlora-jax train|plan` and plan's subprocess)."""

from __future__ import annotations

import re
from pathlib import Path

from hyperlora_jax.errors import ConfigError


def define_config_flag(fv, sys_argv: list[str]) -> None:
    """Add the locked `--config` flag to the absl FlagValues `fv`."""
    from ml_collections import config_flags

    # sys_argv: the dotted overrides are registered from the argument list they will come from
    config_flags.DEFINE_config_file(
        "config",
        None,
        "experiment config",
        flag_values=fv,
        lock_config=True,  # an unknown --config.x.y is an error, not a new key
        sys_argv=sys_argv,
    )


def one_line(e: Exception) -> str:
    """absl / config_flags errors quote a whole traceback; keep the line that says what."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    if any(x.startswith("Traceback") for x in lines):
        return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])
    return lines[0]


def _check_key(config, dotted: str) -> None:
    """An override's key must exist: one line naming the valid keys at the level it left."""
    from ml_collections import ConfigDict

    node, where = config, "config"
    for part in dotted.split("."):
        if not isinstance(node, ConfigDict):
            raise ConfigError(f"--config.{dotted}: {where} is a value, not a group of keys")
        if part not in node:
            raise ConfigError(
                f"--config.{dotted}: unknown key {part!r}; {where} has: {', '.join(node.keys())}"
            )
        node, where = node[part], f"{where}.{part}"


def _load(config_arg: str, overrides: list[str]):
    from absl import flags

    argv = ["config", f"--config={config_arg}", *overrides]
    fv = flags.FlagValues()
    define_config_flag(fv, argv)
    try:
        fv(argv)
        return fv.config
    except Exception as e:
        raise ConfigError(f"config {config_arg}: {one_line(e)}") from e


def load_config(config_arg: str, overrides: list[str]):
    """A locked experiment config from 'file.py:preset' plus '--config.x=...' overrides;
    ConfigError (one line) for a missing file, an unknown preset or key, or a wrong type."""
    path = config_arg.split(":", 1)[0]
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} not found")
    base = _load(config_arg, [])
    for o in overrides:
        _check_key(base, o.removeprefix("--config.").split("=", 1)[0])
    return _load(config_arg, overrides)
