"""Doc-to-LoRA end to end: chunking, composition and the `DocToLoRA` API (model.py: the forward).

document text --chat template--> ids --official split + affixes--> chunks [N, T] (padded, segment 0)
--frozen base LM, first L-1 layers (l2l) or first L//4 (early exit)--> features
--HyperLoRA--> per-chunk A/B [N, L, r, d] --compose--> Adapter [n_docs, L, (Kmax+1) r, d].

Composition is the official `combine_lora`: per document, chunk ranks in chunk order, then the
learned bias LoRA once, then zero rows up to the longest document. No 1/K averaging; the scale is
alpha used directly. Per-document `scalers` multiply A only; `bias_scaler` multiplies both.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import CheckpointError, ConfigError, InputError
from hyperlora_jax.hypernet.d2l.checkpoint import check_base_model, load_checkpoint, save_checkpoint
from hyperlora_jax.hypernet.d2l.model import (
    D2LConfig,
    bias_lora,
    context_features,
    encoder_layers,
    generate_chunk_loras,
)
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.models import transformer
from hyperlora_jax.models.chat import (
    ctx_affixes,
    format_user_turn,
    split_ctx_ids,
    tokenize_ctx_text,
)
from hyperlora_jax.models.config import ModelConfig
from hyperlora_jax.models.tokenizer import load_tokenizer


@functools.partial(jax.jit, static_argnames=("config", "ctx_config", "iterative", "dtype"))
def chunk_loras(
    hyper_params: dict,
    ctx_params: dict,
    tokens: jax.Array,
    mask: jax.Array,
    *,
    config: D2LConfig,
    ctx_config: ModelConfig,
    iterative: bool = False,
    dtype=jnp.float32,
):
    """Token chunks [N, T] -> per-chunk (A, B) dicts, [N, L, r, d]. One program per shape."""
    feats = context_features(ctx_params, ctx_config, config, tokens, mask, dtype=dtype)
    return generate_chunk_loras(hyper_params, config, feats, mask, iterative=iterative, dtype=dtype)


# ----------------------------------------------------------------------------- chunks & compose
def pad_chunks(
    chunks: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad chunks to a common length (rounded up to `multiple`): tokens, mask [N, T]."""
    if not chunks or any(len(c) == 0 for c in chunks):
        raise InputError("every chunk needs at least one token")
    t = max(len(c) for c in chunks)
    t = -(-t // multiple) * multiple
    tokens = np.full((len(chunks), t), pad_id, np.int32)
    mask = np.zeros((len(chunks), t), bool)
    for i, c in enumerate(chunks):
        tokens[i, : len(c)] = c
        mask[i, : len(c)] = True
    return tokens, mask


def compose(
    chunk_a: dict[str, jax.Array],
    chunk_b: dict[str, jax.Array],
    n_chunks: Sequence[int],
    scale: float,
    bias: tuple[dict[str, jax.Array], dict[str, jax.Array]] | None = None,
    scalers: Sequence[float] | jax.Array | None = None,
    bias_scaler: float | None = None,
) -> Adapter:
    """Official combine_lora: chunk LoRAs [sum K, L, r, d] -> Adapter [n_docs, L, (Kmax+1) r, d].

    Document g gets ranks [chunk_1 .. chunk_Kg, bias (if given), zeros]; zero rows are exact.
    """
    n_chunks = [int(k) for k in n_chunks]
    if not n_chunks or min(n_chunks) < 1:
        raise InputError(f"every document needs at least one chunk, got n_chunks={n_chunks}")
    total = sum(n_chunks)
    first = next(iter(chunk_a.values()))
    if first.shape[0] != total:
        raise InputError(f"{first.shape[0]} chunk LoRAs for n_chunks={n_chunks} (sum {total})")
    kmax = max(n_chunks)
    slots = kmax + 1
    # Slot index into [chunks..., bias, zero]: chunk j of doc g, then bias, then zero.
    idx = np.full((len(n_chunks), slots), total + 1, np.int32)
    start = 0
    for g, k in enumerate(n_chunks):
        idx[g, :k] = np.arange(start, start + k)
        idx[g, k] = total if bias is not None else total + 1
        start += k
    doc_of_chunk = np.repeat(np.arange(len(n_chunks)), n_chunks)
    bscale = 1.0 if bias_scaler is None else bias_scaler
    out_a, out_b = {}, {}
    for m in chunk_a:
        for src, dst, which in ((chunk_a, out_a, "a"), (chunk_b, out_b, "b")):
            x = src[m]
            if which == "a" and scalers is not None:
                s = jnp.asarray(scalers, x.dtype)[jnp.asarray(doc_of_chunk)]
                x = x * s[:, None, None, None]
            zero = jnp.zeros_like(x[:1])
            if bias is not None:
                bx = bias[0 if which == "a" else 1][m].astype(x.dtype) * bscale
            else:
                bx = zero[0]
            pool = jnp.concatenate([x, bx[None], zero], axis=0)  # [total + 2, L, r, d]
            g = pool[jnp.asarray(idx)]  # [G, slots, L, r, d]
            g = jnp.moveaxis(g, 1, 2)  # [G, L, slots, r, d]
            dst[m] = g.reshape(g.shape[0], g.shape[1], slots * g.shape[3], g.shape[4])
    return Adapter(out_a, out_b, float(scale))


@functools.partial(
    jax.jit, static_argnames=("config", "ctx_config", "n_chunks", "iterative", "dtype")
)
def _internalize(
    hyper_params, ctx_params, tokens, mask, scalers, bias_scaler, *, config, ctx_config, n_chunks,
    iterative, dtype,
) -> Adapter:  # fmt: skip
    """chunk_loras + bias LoRA + compose as ONE compiled program (no eager ops per call)."""
    a, b = chunk_loras(
        hyper_params, ctx_params, tokens, mask, config=config, ctx_config=ctx_config,
        iterative=iterative, dtype=dtype,
    )  # fmt: skip
    bias = bias_lora(hyper_params, config) if config.use_bias else None
    return compose(a, b, n_chunks, config.lora_alpha, bias, scalers, bias_scaler)


# ----------------------------------------------------------------------------- API
def _resolve_model(given, name: str | None, roots: Sequence[Path], what: str):
    """(config, params, folder or None) from (config, params), a model (what fetch_model
    takes), or the name the checkpoint records (a folder relative to it, or a known model)."""
    from hyperlora_jax.models.fetch import HUB_ALIASES, KNOWN_MODELS, fetch_model
    from hyperlora_jax.models.hf import load_hf_model

    if isinstance(given, tuple):
        return given[0], given[1], None
    if given is not None:
        found = fetch_model(str(given))
        return (*load_hf_model(found), found)
    if not name:
        raise CheckpointError(f"the checkpoint names no {what}; pass it explicitly")
    cands = [Path(name)] + [r / name for r in roots]
    found = next((c for c in cands if (c / "config.json").is_file()), None)
    if found is None:
        if name in KNOWN_MODELS or name in HUB_ALIASES:  # obtainable offline: fetch it
            found = fetch_model(name)
    if found is None:
        raise ConfigError(
            f"{what} {name!r} named by the checkpoint is not a local folder; download it "
            "(hyperlora-jax fetch-model) and pass it explicitly"
        )
    return (*load_hf_model(found), found)


class DocToLoRA:
    """A D2L hypernetwork bound to its frozen base model (and context encoder, default the same).

    internalize(texts) -> Adapter, applied by hyperlora_jax.models.transformer.forward or the
    decoding helpers (adapter=...).
    """

    def __init__(
        self,
        config: D2LConfig,
        params: dict,
        base_params: dict,
        base_config: ModelConfig,
        tokenizer: Any = None,
        *,
        ctx_params: dict | None = None,
        ctx_config: ModelConfig | None = None,
        ctx_tokenizer: Any = None,
        dtype=jnp.float32,
        template_kind: str | None = None,
        pad_multiple: int = 64,
        meta: dict | None = None,
    ):
        check_base_model(config, base_config, "the D2L hypernetwork")
        self.config = config
        self.params = jax.tree.map(jnp.asarray, params)
        self.base_params = base_params
        self.base_config = base_config
        self.ctx_params = base_params if ctx_params is None else ctx_params
        self.ctx_config = base_config if ctx_config is None else ctx_config
        if self.ctx_config.hidden_size != config.feature_size:
            raise CheckpointError(
                f"the hypernetwork reads {config.feature_size}-d context features but the "
                f"context encoder has hidden size {self.ctx_config.hidden_size}"
            )
        encoder_layers(config, self.ctx_config)
        self.tokenizer = tokenizer
        self.ctx_tokenizer = ctx_tokenizer if ctx_tokenizer is not None else tokenizer
        self.dtype = dtype
        self.template_kind = template_kind
        self.pad_multiple = pad_multiple
        self.meta = meta or {}

    # -- construction
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        base_model: str | Path | tuple[ModelConfig, dict] | None = None,
        **kw,
    ) -> DocToLoRA:
        """Our checkpoint folder (an official pytorch_model.bin: hyperlora_jax.api.load_d2l).

        base_model and **kw: as from_params; a model the checkpoint names is also looked up
        beside the folder it was converted from.
        """
        path = Path(path)
        config, params, meta = load_checkpoint(path)
        src = (meta.get("source") or {}).get("path")
        root = Path(src).parent if src else path.parent
        meta = {**meta, "ctx_encoder_model": (meta.get("ctx_encoder") or {}).get("model")}
        return cls.from_params(
            config, params, meta, base_model, search=[path.parent, root], where=str(path), **kw
        )

    @classmethod
    def from_params(
        cls,
        config: D2LConfig,
        params: dict,
        meta: dict,
        base_model: str | Path | tuple[ModelConfig, dict] | None = None,
        *,
        ctx_model: str | Path | tuple[ModelConfig, dict] | None = None,
        tokenizer: Any = None,
        dtype=jnp.float32,
        search: Sequence[Path] = (),
        where: str = "the D2L hypernetwork",
        **kw,
    ) -> DocToLoRA:
        """A loaded hypernetwork bound to its models.

        base_model / ctx_model: a HF save_pretrained folder, (config, params), or None = the model
        meta names ("base_model" / "ctx_encoder_model": a local path, tried as is and under each
        `search` folder, or a fetchable name). The context encoder defaults to the base model.
        """
        base_config, base_params, base_dir = _resolve_model(
            base_model, meta.get("base_model"), search, "base model"
        )
        check_base_model(config, base_config, where)
        if tokenizer is None and base_dir is not None:
            tokenizer = load_tokenizer(base_dir)
        ctx = {}
        if ctx_model is not None or meta.get("ctx_encoder_model"):
            c_cfg, c_params, c_dir = _resolve_model(
                ctx_model, meta.get("ctx_encoder_model"), search, "context encoder"
            )
            ctx = {"ctx_params": c_params, "ctx_config": c_cfg}
            if c_dir is not None:
                ctx["ctx_tokenizer"] = load_tokenizer(c_dir)
        return cls(
            config, params, base_params, base_config, tokenizer, dtype=dtype, meta=meta, **ctx, **kw
        )

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write our checkpoint format (hypernetwork params + config; no base weights)."""
        meta = {k: self.meta.get(k) for k in ("base_model", "ctx_encoder_model")}
        return save_checkpoint(
            out_dir,
            self.config,
            jax.tree.map(np.asarray, self.params),
            meta,
            overwrite=overwrite,
        )

    # -- tokenization
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ConfigError("this DocToLoRA has no tokenizer; pass tokenizer= or use *_ids APIs")
        return self.tokenizer

    def chunk_document(self, text: str, chunk_size: int | None = None) -> list[list[int]]:
        """Templated ids of `text` split by the official rule (chunk_size None/<=0: one chunk)."""
        tok = self.ctx_tokenizer or self._need_tokenizer()
        ids = tokenize_ctx_text(text, tok, self.template_kind)
        prefix, suffix = ctx_affixes(tok, self.template_kind)
        return split_ctx_ids(ids, chunk_size, prefix, suffix)

    def query_ids(self, question: str) -> list[int]:
        """A question as a user turn (repo template, empty system message)."""
        return format_user_turn(question, self._need_tokenizer(), self.template_kind)

    # -- internalization
    def chunk_loras(self, chunks: Sequence[Sequence[int]], *, iterative: bool = False):
        """Per-chunk (A, B): [N, L, r, d] for N token chunks."""
        tokens, mask = pad_chunks(chunks, multiple=self.pad_multiple)
        return chunk_loras(
            self.params,
            self.ctx_params,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            config=self.config,
            ctx_config=self.ctx_config,
            iterative=iterative,
            dtype=self.dtype,
        )

    def internalize_chunks(
        self,
        docs_chunks: Sequence[Sequence[Sequence[int]]],
        *,
        iterative: bool = False,
        scalers: Sequence[float] | None = None,
        bias_scaler: float | None = None,
    ) -> Adapter:
        """Already-chunked documents (lists of token-id chunks) -> Adapter [n_docs, L, R, d]."""
        if not docs_chunks or any(len(d) == 0 for d in docs_chunks):
            raise InputError("every document needs at least one chunk")
        flat = [list(c) for d in docs_chunks for c in d]
        tokens, mask = pad_chunks(flat, multiple=self.pad_multiple)
        return _internalize(
            self.params,
            self.ctx_params,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            None if scalers is None else jnp.asarray(scalers, jnp.float32),
            None if bias_scaler is None else jnp.asarray(bias_scaler, jnp.float32),
            config=self.config,
            ctx_config=self.ctx_config,
            n_chunks=tuple(len(d) for d in docs_chunks),
            iterative=iterative,
            dtype=self.dtype,
        )

    def internalize(
        self,
        texts: str | Sequence[str],
        chunk_size: int | None = None,
        *,
        iterative: bool = False,
        scalers: Sequence[float] | None = None,
        bias_scaler: float | None = None,
        combine: bool = False,
    ) -> Adapter:
        """Documents -> one composed Adapter. A single str gives an unbatched adapter
        [L, (K+1) r, d]; a list gives [n_docs, L, (Kmax+1) r, d] (zero-padded ranks).
        combine=True composes all documents into ONE unbatched adapter: every chunk of every
        document in order, then the bias LoRA once (as if they were one chunked document)."""
        single = isinstance(texts, str)
        docs = [texts] if single else list(texts)
        if not docs:
            raise InputError("no documents to internalize")
        chunks = [self.chunk_document(t, chunk_size) for t in docs]
        if combine:
            chunks, single = [[c for d in chunks for c in d]], True
        ad = self.internalize_chunks(
            chunks, iterative=iterative, scalers=scalers, bias_scaler=bias_scaler
        )
        if single:
            ad = Adapter(
                {m: x[0] for m, x in ad.a.items()}, {m: x[0] for m, x in ad.b.items()}, ad.scale
            )
        return ad

    # -- using the adapter
    def logits(self, query_ids: jax.Array, adapter: Adapter | None = None, **kw) -> jax.Array:
        """Base-model logits for token ids [B, T] with `adapter` applied (None = base model)."""
        out = transformer.forward(
            self.base_params,
            self.base_config,
            jnp.asarray(query_ids),
            adapter=adapter,
            dtype=self.dtype,
            **kw,
        )
        return out.logits

    def generate(
        self,
        questions: str | Sequence[str],
        adapter: Adapter | None,
        max_new_tokens: int = 64,
        **kw,
    ) -> str | list[str]:
        """Answers with `adapter` applied (greedy unless temperature= is given).

        One question: a str; a list of questions with a batched adapter: question i uses
        document i's adapter (as the official eval: one query per internalized context).
        """
        from hyperlora_jax.models.decoding import generate

        tok = self._need_tokenizer()
        single = isinstance(questions, str)
        qs = [questions] if single else list(questions)
        if adapter is not None and adapter.batch_shape and adapter.batch_shape[0] != len(qs):
            raise InputError(
                f"{len(qs)} questions for a batch of {adapter.batch_shape[0]} adapters; "
                "pass one question per internalized document"
            )
        out = generate(
            self.base_params,
            self.base_config,
            [self.query_ids(q) for q in qs],
            max_new_tokens=max_new_tokens,
            adapter=adapter,
            tokenizer=tok,
            dtype=self.dtype,
            **kw,
        )
        return out.texts[0] if single else out.texts
