"""The one way to load a base model from what a user types: a known model name, a hub id, a
.gguf file or a save_pretrained folder (config.json + *.safetensors). `fetch.fetch_model` turns
any of these into a ready folder (names, GGUFs: converted once into the cache)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from hyperlora_jax.models.config import ModelConfig
from hyperlora_jax.models.fetch import fetch_model
from hyperlora_jax.models.hf import load_hf_model
from hyperlora_jax.models.tokenizer import load_tokenizer


class Base(NamedTuple):
    """A loaded base model; `path` is the folder it was read from."""

    config: ModelConfig
    params: dict
    tokenizer: Any
    path: Path


def load_base(name_or_path: str | os.PathLike, *, dtype: Any = None) -> Base:
    """Config, params (dtype=None keeps the checkpoint's) and tokenizer of a base model."""
    folder = fetch_model(str(name_or_path))
    config, params = load_hf_model(folder, dtype=dtype)
    return Base(config, params, load_tokenizer(folder), folder)


def load_base_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """The tokenizer alone; a folder holding just the tokenizer files is enough."""
    p = Path(name_or_path).expanduser()
    if p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return load_tokenizer(p)
    return load_tokenizer(fetch_model(str(name_or_path)))
