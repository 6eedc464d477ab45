"""The one way to load a base model from what a user types: a known model name, a hub id, a
.gguf file or a save_pretrained folder (config.json + *.safetensors). `fetch.fetch_model` turns
any of these into a ready folder (names, GGUFs: converted once into the cache)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from hyperlora_jax.errors import CheckpointError
from hyperlora_jax.models.config import ATTN_MODULES, MLP_MODULES, ModelConfig, load_hf_config
from hyperlora_jax.models.fetch import fetch_model, progress
from hyperlora_jax.models.hf import _normalize_key, config_from_hf, load_hf_model
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
    progress(f"loading base model {name_or_path} ...")
    t0 = time.perf_counter()
    config, params = load_hf_model(folder, dtype=dtype)
    tokenizer = load_tokenizer(folder)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    progress(
        f"loaded {name_or_path}: {config.family}, {config.num_layers} layers, "
        f"{n / 1e6:.1f}M params ({time.perf_counter() - t0:.1f} s)"
    )
    return Base(config, params, tokenizer, folder)


def load_base_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """The tokenizer alone; a folder holding just the tokenizer files is enough."""
    p = Path(name_or_path).expanduser()
    if p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return load_tokenizer(p)
    return load_tokenizer(fetch_model(str(name_or_path)))


# ----------------------------------------------------------------------------- fingerprint
# A base model's identity beyond its shapes: checkpoints and adapters record it, loaders compare.
# "<config hash>-<weights hash>", 8 hex digits each: sha256 of the architecture fields of
# ModelConfig (token ids and max_position_embeddings left out) and of a few weight rows -- the
# first FINGERPRINT_ROWS rows of the embedding and input rows of every attention / MLP kernel of
# the first and last layer -- rounded to bf16 (a bf16 and an f32 load agree), as f32 bytes.
FINGERPRINT_ROWS = 4
_NOT_ARCHITECTURE = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")


def _fingerprint(config: ModelConfig, rows: list[Any]) -> str:
    import ml_dtypes

    arch = {k: v for k, v in config.to_json().items() if k not in _NOT_ARCHITECTURE}
    c = hashlib.sha256(json.dumps(arch, sort_keys=True, default=list).encode()).hexdigest()
    w = hashlib.sha256()
    for x in rows:
        x = np.asarray(x).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
        w.update(np.ascontiguousarray(x).tobytes())
    return f"{c[:8]}-{w.hexdigest()[:8]}"


def base_fingerprint(config: ModelConfig, params: dict) -> str:
    """Fingerprint of a loaded base model (reads a few rows; nothing large is copied)."""
    n, layers = FINGERPRINT_ROWS, params["layers"]
    rows = [params["embedding"][:n]]
    for i in (0, config.num_layers - 1):
        for group, modules in (("attn", ATTN_MODULES), ("mlp", MLP_MODULES)):
            rows += [layers[group][m]["kernel"][i, :n] for m in modules]  # kernel [L, in, out]
    return _fingerprint(config, rows)


def folder_fingerprint(name_or_path: str | os.PathLike) -> str:
    """Fingerprint of a base model on disk (what load_base takes), reading only those rows."""

    from safetensors import safe_open

    folder = fetch_model(str(name_or_path))
    config = config_from_hf(load_hf_config(folder))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    owner = {}
    for f in files:
        try:
            h = safe_open(str(folder / f), framework="numpy")
        except Exception as e:  # SafetensorError / OSError: a missing or corrupt file
            raise CheckpointError(f"cannot read {folder / f}: {e}") from e
        owner.update({_normalize_key(k): (h, k) for k in h.keys()})

    def rows(key: str, index: Any) -> Any:
        if key not in owner:
            raise CheckpointError(f"{folder}: no tensor {key!r} to fingerprint")
        h, k = owner[key]
        return h.get_slice(k)[index]

    n = FINGERPRINT_ROWS
    found = [rows("model.embed_tokens.weight", slice(0, n))]
    for i in (0, config.num_layers - 1):
        for group, modules in (("self_attn", ATTN_MODULES), ("mlp", MLP_MODULES)):
            # HF weights are [out, in]: our kernels' input rows are their columns
            found += [
                rows(f"model.layers.{i}.{group}.{m}.weight", (slice(None), slice(0, n))).T
                for m in modules
            ]
    return _fingerprint(config, found)


def check_fingerprint(
    recorded: dict, given: str, given_name: Any, what: str, *, allow_other_base: bool = False
) -> None:
    """Refuse a base model whose fingerprint differs from the one `recorded` (a checkpoint's or
    adapter's metadata: "base_model", "base_fingerprint") unless allow_other_base."""
    want = recorded.get("base_fingerprint")
    # Files written before fingerprints were recorded have none: there is nothing to check.
    if not want or want == given or allow_other_base:
        return

    same_arch = want.split("-")[0] == given.split("-")[0]
    raise CheckpointError(
        f"{what} was made for base model {recorded.get('base_model')!r} (fingerprint {want}) "
        f"but the given base model {str(given_name)!r} has fingerprint {given} ("
        f"{'same shapes, different weights' if same_arch else 'a different architecture'}); "
        "use the base model it was made for, or pass --allow-other-base "
        "(allow_other_base=True) to use this one anyway"
    )


# Name fragments that give away a model's family ("google/gemma-2-2b-it", "tiny-gemma2", ...).
_FAMILY_NAMES = (
    (("gemma-3", "gemma3"), "gemma3"),
    (("gemma-2", "gemma2"), "gemma2"),
    (("mistral",), "mistral"),
    (("qwen3",), "qwen3"),
    (("qwen2",), "qwen2"),
    (("llama", "smollm"), "llama"),
)


def family_from_name(name: Any) -> str | None:
    """The family a model name says it is, or None when the name does not tell."""
    low = str(name or "").lower()
    return next((fam for keys, fam in _FAMILY_NAMES if any(k in low for k in keys)), None)


def check_family(
    recorded: dict, given_family: str, given_name: Any, what: str, *, allow_other_base: bool = False
) -> None:
    """Without a fingerprint (official checkpoints), at least refuse a base of another family
    than the recorded base model's name says: same shapes would otherwise pass silently."""
    want = family_from_name(recorded.get("base_model"))
    if want is None or want == given_family or allow_other_base:
        return

    raise CheckpointError(
        f"{what} was made for base model {recorded.get('base_model')!r} ({want} family) but the "
        f"given base model {str(given_name)!r} is {given_family}; use the base model it was made "
        "for, or pass --allow-other-base (allow_other_base=True) to use this one anyway"
    )
