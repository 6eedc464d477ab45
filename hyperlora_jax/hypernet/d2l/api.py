"""Doc-to-LoRA end to end: chunking, composition and the `DocToLoRA` API (model.py: the forward).

document text --chat template--> ids --official split + affixes--> chunks [N, T] (padded, segment 0)
--frozen base LM, first L-1 layers (l2l) or first L//4 (early exit)--> features
--HyperLoRA--> per-chunk A/B [N, L, r, d] --compose--> Adapter [n_docs, L, (Kmax+1) r, d].

Composition is the official `combine_lora`: per document, chunk ranks in chunk order, then the
learned bias LoRA once, then zero rows up to the longest document. No 1/K averaging; the scale is
alpha used directly. Per-document `scalers` multiply A only; `bias_scaler` multiplies both.

Images (a Gemma-3 VLM context encoder, models/vision.py): `internalize(images=[...])` makes the
images (and optional text) ONE chunk; their soft tokens' activations feed the Perceiver as text
activations do, and the adapter is for the (text-only) base model.

Any document length in bounded memory: chunks run CHUNK_GROUP at a time (fewer chunks: the next
power of two) through one compiled program and each group's LoRAs are written straight into the
composed adapter's slots, so the activations stay those of one group; only the adapter grows
(rank (K+1) r by design).
Limits: at most MAX_DOC_CHUNKS chunks per document, and no chunk longer than the context model's
window (max_position_embeddings) -- both InputErrors that name the chunk size that would fit.
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
    streamed_chunk_loras,
)
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.models import sharding as shd
from hyperlora_jax.models import transformer, vision
from hyperlora_jax.models.chat import (
    _encode,
    ctx_affixes,
    format_user_turn,
    num_chunks,
    split_ctx_ids,
    template_kind,
    tokenize_ctx_text,
    turn_affixes,
)
from hyperlora_jax.models.config import ModelConfig
from hyperlora_jax.models.decoding import generate
from hyperlora_jax.models.fetch import HUB_ALIASES, KNOWN_MODELS, fetch_model
from hyperlora_jax.models.hf import load_hf_model
from hyperlora_jax.models.load import base_fingerprint, check_family, check_fingerprint
from hyperlora_jax.models.tokenizer import load_tokenizer
from hyperlora_jax.paths import as_path
from hyperlora_jax.precision import Precision, get_precision

# Chunks per compiled call: every document runs as groups of [CHUNK_GROUP, T] (the last group
# padded; fewer chunks than that: a group of the next power of two, so a 1-chunk document does not
# pay for 8), so at most 4 shapes compile and peak activations do not grow with the document.
CHUNK_GROUP = 8
# Chunks per document: the composed rank is (K + 1) r, so the adapter grows with K (SmolLM2-135M
# down_proj: 2 MB of f32 per chunk, 4 GB at the limit). 2,048 takes a 2 MB text at chunk size 1,024
# even with a byte-level tokenizer and refuses runaway ones (2 MB at 64: ~10,700); past it, larger
# chunks or a split document.
MAX_DOC_CHUNKS = 2048


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
    """Token chunks [N, T] -> per-chunk (A, B) dicts, [N, L, r, d]. One program per shape.

    iterative (l2l): each layer's LoRA made as the encoder produces that layer's activations
    (model.streamed_chunk_loras), for the least memory; otherwise all layers' features first."""
    kw = dict(config=config, ctx_config=ctx_config, dtype=dtype)
    if not (iterative and config.layer_to_layer):
        return batched_chunk_loras(hyper_params, ctx_params, tokens, mask, **kw)
    stored_bf16 = jax.tree.leaves(hyper_params)[0].dtype == jnp.bfloat16
    traced = isinstance(tokens, jax.core.Tracer)  # inside a jit: its compile options apply
    run = _streamed_bf16_stored if stored_bf16 and not traced else _streamed
    return run(hyper_params, config, ctx_params, ctx_config, tokens, mask, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("config", "ctx_config", "dtype"))
def batched_chunk_loras(hyper_params, ctx_params, tokens, mask, *, config, ctx_config, dtype):
    """chunk_loras through the features of all layers at once (their Perceiver in groups)."""
    feats = context_features(
        ctx_params, ctx_config, config, tokens, mask, dtype=dtype, zero_padding=False
    )
    return generate_chunk_loras(hyper_params, config, feats, mask, dtype=dtype)


_STREAMED_STATIC = ("config", "ctx_config", "dtype")
_streamed = jax.jit(streamed_chunk_loras, static_argnames=_STREAMED_STATIC)
# A hypernetwork stored in bf16 (policy bf16-params): XLA's loop-invariant code motion hoists
# weight casts out of the layer scan, holding a cast copy of every layer's weights at once
# (official hypernetwork, SmolLM2, 1,024 tokens: 451 MiB of temporaries, 856 with the base in
# bf16 too); without the pass each layer's are cast as the scan reaches them (100 MiB either
# way, and faster). An f32-stored one keeps the pass: there it holds the bf16 policy's casts of
# the shared Perceiver weights out of the loop (201 MiB with it, 304 without; f32: the same).
_streamed_bf16_stored = jax.jit(
    streamed_chunk_loras,
    static_argnames=_STREAMED_STATIC,
    compiler_options={"xla_disable_hlo_passes": "while-loop-invariant-code-motion"},
)


@functools.partial(
    jax.jit, static_argnames=("config", "ctx_config", "vision_config", "iterative", "dtype")
)
def image_chunk_loras(
    hyper_params: dict,
    ctx_params: dict,
    vision_params: dict,
    tokens: jax.Array,
    mask: jax.Array,
    groups: jax.Array,
    pixels: jax.Array,
    *,
    config: D2LConfig,
    ctx_config: ModelConfig,
    vision_config: vision.VisionConfig,
    iterative: bool = False,
    dtype=jnp.float32,
):
    """One chunk [1, T] holding images (placeholders, `groups` from vision.image_groups) and
    their pixels [N_img, C, S, S] -> (A, B) [1, L, r, d], through a Gemma-3 VLM encoder."""
    _, soft = vision.encode_images(vision_params, vision_config, pixels.astype(dtype))
    embeds = vision.scatter_soft_tokens(tokens, soft, vision_config.image_token_id)
    ids = jnp.where(groups > 0, 0, tokens)  # placeholders may lie past the LM's vocabulary
    if iterative and config.layer_to_layer:
        return streamed_chunk_loras(
            hyper_params, config, ctx_params, ctx_config, ids, mask, dtype=dtype,
            image_embeddings=embeds.astype(dtype), image_groups=groups,
        )  # fmt: skip
    feats = context_features(
        ctx_params, ctx_config, config, ids, mask, dtype=dtype,
        image_embeddings=embeds.astype(dtype), image_groups=groups, zero_padding=False,
    )  # fmt: skip
    return generate_chunk_loras(hyper_params, config, feats, mask, iterative=iterative, dtype=dtype)


# ----------------------------------------------------------------------------- chunks & compose
def pad_chunks(
    chunks: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1, length: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad chunks to a common length, at least `length`, rounded up to `multiple`:
    tokens, mask [N, T]."""
    if not chunks or any(len(c) == 0 for c in chunks):
        raise InputError("every chunk needs at least one token")
    t = max(length, *(len(c) for c in chunks))
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


@functools.partial(jax.jit, donate_argnums=0)
def _write_slots(out, loras, doc: jax.Array, slot: jax.Array):
    """out[doc[i], :, slot[i]] = loras[i] for (A, B) dicts [G, L, S, r, d], in place (donated);
    rows with doc == G (a padded group's filler) are dropped."""
    return jax.tree.map(lambda o, x: o.at[doc, :, slot].set(x, mode="drop"), out, loras)


@functools.partial(jax.jit, donate_argnums=0)
def _finish_slots(out, bias, a_scale, bias_scale, bias_slot):
    """Official combine_lora on the slot arrays, in place: A of chunk slots times `a_scale`
    [G, S] (None: 1), the bias LoRA (times bias_scale) at slot bias_slot[g], then
    [G, L, S, r, d] -> [G, L, S * r, d]."""
    a, b = out
    if a_scale is not None:
        a = {m: x * a_scale.astype(x.dtype)[:, None, :, None, None] for m, x in a.items()}
    g = jnp.arange(bias_slot.shape[0])

    def put(o, x):
        return o.at[g, :, bias_slot].set(
            jnp.broadcast_to(x.astype(o.dtype) * bias_scale, o[:, :, 0].shape)
        )

    if bias is not None:
        a = {m: put(x, bias[0][m]) for m, x in a.items()}
        b = {m: put(x, bias[1][m]) for m, x in b.items()}
    return jax.tree.map(lambda x: x.reshape(*x.shape[:2], -1, x.shape[-1]), (a, b))


def check_chunks(
    docs_chunks: Sequence[Sequence[Sequence[int]]], window: int, max_chunks: int = MAX_DOC_CHUNKS
) -> None:
    """InputError when a document has more than `max_chunks` chunks or a chunk is longer than the
    context model's `window` (its positions past the window are untrained)."""
    for i, d in enumerate(docs_chunks):
        if len(d) > max_chunks:
            raise InputError(
                f"document {i} has {len(d):,} chunks, over the limit of {max_chunks:,} per "
                "document (MAX_DOC_CHUNKS); use longer chunks or split the document"
            )
        longest = max(len(c) for c in d)
        if longest > window:
            raise InputError(
                f"document {i} has a chunk of {longest:,} tokens, longer than the context model's "
                f"window of {window:,}; use shorter chunks"
            )


# ----------------------------------------------------------------------------- API
def _resolve_model(given, name: str | None, roots: Sequence[Path], what: str):
    """(config, params, folder or None) from (config, params), a model (what fetch_model
    takes), or the name the checkpoint records (a folder relative to it, or a known model)."""

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
    decoding helpers (adapter=...). precision: a policy of hyperlora_jax.precision (sets the
    compute dtype and the hypernetwork params' dtype); without it, `dtype` is the compute dtype.
    mesh: a jax Mesh (models/sharding.py, `--mesh data=..,fsdp=..,tensor=..`): the base and
    context weights laid out by the training rules, the hypernetwork's by tree_shardings, and
    chunks, documents and questions split over the batch axes (data, fsdp); one adapter per
    document as on one device.
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
        ctx_vision: tuple[vision.VisionConfig, dict] | None = None,
        precision: str | Precision | None = None,
        mesh: Any = None,
    ):
        check_base_model(config, base_config, "the D2L hypernetwork")
        self.config = config
        self.params = jax.tree.map(jnp.asarray, params)
        if precision is not None:  # a named policy: compute dtype + the hypernet params' dtype
            policy = get_precision(precision, "internalize")
            dtype, self.params = policy.compute, policy.cast_params(self.params)
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
        # (VisionConfig, params) of a Gemma-3 VLM context encoder: images become documents
        self.ctx_vision = ctx_vision
        if ctx_vision is not None and ctx_vision[0].text_hidden_size != self.ctx_config.hidden_size:
            raise CheckpointError(
                f"the vision tower projects to {ctx_vision[0].text_hidden_size} but the context "
                f"encoder has hidden size {self.ctx_config.hidden_size}; load both from one VLM"
            )
        self.mesh = mesh
        if mesh is not None:
            self._to_mesh(mesh)

    def _to_mesh(self, mesh) -> None:
        """Weights onto the mesh: the base and context models by the logical rules, the
        hypernetwork by its path names (big unnamed weights over fsdp)."""
        same = self.ctx_params is self.base_params
        self.base_params = shd.shard_model_params(self.base_params, self.base_config, mesh)
        self.ctx_params = (
            self.base_params
            if same
            else shd.shard_model_params(self.ctx_params, self.ctx_config, mesh)
        )
        self.params = shd.shard_params(self.params, mesh)

    def _rows(self, x) -> jax.Array:
        """Rows (a multiple of the batch axes' size) split over the mesh; as is without one."""
        return jnp.asarray(x) if self.mesh is None else shd.put_rows(x, self.mesh)

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
        path = as_path(path)  # a gs:// folder too
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
        allow_other_base: bool = False,
        **kw,
    ) -> DocToLoRA:
        """A loaded hypernetwork bound to its models.

        base_model / ctx_model: a HF save_pretrained folder, (config, params), or None = the model
        meta names ("base_model" / "ctx_encoder_model": a local path, tried as is and under each
        `search` folder, or a fetchable name). The context encoder defaults to the base model.
        A base model whose fingerprint differs from the one meta records is refused unless
        allow_other_base.
        """
        base_config, base_params, base_dir = _resolve_model(
            base_model, meta.get("base_model"), search, "base model"
        )
        check_base_model(config, base_config, where)
        given = "(config, params)" if isinstance(base_model, tuple) else base_dir or base_model
        check_fingerprint(
            meta,
            base_fingerprint(base_config, base_params),
            given,
            where,
            allow_other_base=allow_other_base,
        )
        check_family(meta, base_config.family, given, where, allow_other_base=allow_other_base)
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
                if "ctx_vision" not in kw:  # a Gemma-3 VLM folder brings its vision tower
                    ctx["ctx_vision"] = vision.load_vision_model(c_dir)
        return cls(
            config, params, base_params, base_config, tokenizer, dtype=dtype, meta=meta, **ctx, **kw
        )

    @functools.cached_property
    def base_fingerprint(self) -> str:
        """Fingerprint of the bound base model (models/load.py), recorded in what we write."""
        return base_fingerprint(self.base_config, self.base_params)

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write our checkpoint format (hypernetwork params + config; no base weights)."""
        meta = {k: self.meta.get(k) for k in ("base_model", "ctx_encoder_model")}
        meta["base_fingerprint"] = self.meta.get("base_fingerprint") or self.base_fingerprint
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

    def chunk_document(
        self, text: str, chunk_size: int | None = None, *, max_chunks: int = MAX_DOC_CHUNKS
    ) -> list[list[int]]:
        """Templated ids of `text` split by the official rule (chunk_size None/<=0: one chunk).

        InputError (naming the chunk size that fits) past `max_chunks` chunks or when a chunk
        would be longer than the context model's window: no silent truncation.
        """
        tok = self.ctx_tokenizer or self._need_tokenizer()
        ids = tokenize_ctx_text(text, tok, self.template_kind)
        prefix, suffix = ctx_affixes(tok, self.template_kind)
        window = self.ctx_config.max_position_embeddings
        fit = window - len(prefix) - len(suffix)  # a chunk is at most chunk_size + affixes
        n, k = len(ids), num_chunks(len(ids), chunk_size)
        need = -(-n // max_chunks)
        if need > fit:
            raise InputError(
                f"the document has {n:,} tokens, over the {max_chunks * fit:,} one adapter takes "
                f"({max_chunks:,} chunks (MAX_DOC_CHUNKS) of {fit:,} tokens); split the document"
            )
        fix = f"use a chunk size (--chunk-size) of {need:,} to {fit:,}"
        if k > max_chunks:
            raise InputError(
                f"the document has {n:,} tokens: {k:,} chunks of {chunk_size:,}, over the limit "
                f"of {max_chunks:,} chunks per document (MAX_DOC_CHUNKS); {fix}"
            )
        chunks = split_ctx_ids(ids, chunk_size, prefix, suffix)
        longest = max(len(c) for c in chunks)
        if longest > window:
            raise InputError(
                f"the document has {n:,} tokens: a chunk of {longest:,} is longer than the "
                f"context model's window of {window:,}; {fix}"
            )
        return chunks

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
        max_chunks: int = MAX_DOC_CHUNKS,
        group: int = CHUNK_GROUP,
        pad_to: int = 0,
    ) -> Adapter:
        """Already-chunked documents (lists of token-id chunks) -> Adapter [n_docs, L, R, d].

        Runs `group` chunks (fewer: the next power of two; iterative: 1) per call of one compiled
        program (all chunks padded to one length, at least `pad_to`) and writes each chunk's LoRA
        into its rank slot of the composed adapter: the same adapter as `compose` of all chunk
        LoRAs at once, with one group's activations alive.
        """
        if not docs_chunks or any(len(d) == 0 for d in docs_chunks):
            raise InputError("every document needs at least one chunk")
        check_chunks(docs_chunks, self.ctx_config.max_position_embeddings, max_chunks)
        n_chunks = [len(d) for d in docs_chunks]
        flat = [c for d in docs_chunks for c in d]
        slot = [(g, j) for g, k in enumerate(n_chunks) for j in range(k)]
        tokens, mask = pad_chunks(flat, multiple=self.pad_multiple, length=pad_to)
        m = shd.batch_multiple(self.mesh)  # a group's chunks split over the batch axes
        # fewer chunks than a group: the next power of two (<= 2x the work, 4 shapes at most);
        # iterative: one chunk per call, so the transient memory does not grow with the document
        group = 1 if iterative else min(group, 1 << (len(flat) - 1).bit_length())
        group = -(-group // m) * m
        kw = dict(config=self.config, ctx_config=self.ctx_config, iterative=iterative)

        def run(start: int):
            # the last group repeats its last chunk: one shape; _write_slots drops those rows
            rows = np.minimum(np.arange(start, start + group), len(flat) - 1)
            return chunk_loras(
                self.params, self.ctx_params, self._rows(tokens[rows]), self._rows(mask[rows]),
                dtype=self.dtype, **kw,
            )  # fmt: skip

        n_docs, slots = len(n_chunks), max(n_chunks) + 1
        # on a mesh the documents' adapters are split over the batch axes (padded, cut below)
        n_out = -(-n_docs // m) * m
        doc = np.array([g for g, _ in slot] + [n_out] * group, np.int32)  # filler rows: dropped
        idx = np.array([j for _, j in slot] + [0] * group, np.int32)
        out, prev = None, None
        for start in range(0, len(flat), group):
            loras = run(start)
            if out is None:  # [n_docs, L, Kmax + 1 slots, r, d]; unused slots stay exact zeros
                out = jax.tree.map(
                    lambda x: jnp.zeros((n_out, x.shape[1], slots, *x.shape[2:]), x.dtype), loras
                )
                if self.mesh is not None:
                    out = jax.tree.map(lambda x: shd.put_rows(x, self.mesh), out)
            out = _write_slots(out, loras, doc[start : start + group], idx[start : start + group])
            # at most two groups in flight (iterative: one), so the activations stay bounded
            if iterative:
                jax.block_until_ready(loras)
            elif prev is not None:
                jax.block_until_ready(prev)
            prev = loras
        a_scale = None
        if scalers is not None:  # A of each document's chunk slots only (official combine_lora)
            a_scale = np.ones((n_out, slots))
            for g, k in enumerate(n_chunks):
                a_scale[g, :k] = scalers[g]
        bias = bias_lora(self.params, self.config) if self.config.use_bias else None
        a, b = _finish_slots(
            out, bias, a_scale, 1.0 if bias_scaler is None else bias_scaler,
            np.asarray(n_chunks + [1] * (n_out - n_docs), np.int32),
        )  # fmt: skip
        if n_out != n_docs:
            a, b = jax.tree.map(lambda x: x[:n_docs], (a, b))
        return Adapter(a, b, float(self.config.lora_alpha))

    def image_document_ids(self, n_images: int, text: str | None = None) -> list[int]:
        """Token ids of a document made of `n_images` images (then `text`), as the official
        Imagenette eval templates it for Gemma-3: a user turn (empty system message) whose
        content is the images, each `\\n\\n<start_of_image>` + placeholders +
        `<end_of_image>\\n\\n` (the Gemma-3 processor's expansion), then the text."""
        vcfg = self.require_vision()
        tok = self.ctx_tokenizer or self._need_tokenizer()
        kind = self.template_kind or template_kind(tok)
        head, tail = turn_affixes(kind, (tok.bos_token or "") if kind != "chatml" else "")
        pieces = [head + "\n\n"] + ["\n\n\n\n"] * (n_images - 1)
        pieces.append("\n\n" + (text or "").strip() + tail)
        ids = _encode(tok, pieces[0])
        for piece in pieces[1:]:  # special tokens split the text anyway: pieces tokenize alike
            ids += vision.image_token_block(vcfg) + _encode(tok, piece)
        return ids

    def require_vision(self) -> vision.VisionConfig:
        """The context encoder's VisionConfig; InputError when it cannot read images."""
        if self.ctx_vision is None:
            raise InputError(
                "the context encoder has no vision tower, so it cannot read images; use a "
                "Gemma-3 vision-language model (e.g. google/gemma-3-4b-it) as the context encoder"
            )
        return self.ctx_vision[0]

    def internalize_images(
        self, images: Sequence[Any], text: str | None = None, *, iterative: bool = False
    ) -> Adapter:
        """Images (paths, PIL images or [H, W, 3] uint8 arrays), then optional text, as ONE
        document (one chunk) -> unbatched Adapter [L, 2r, d] for the (text-only) base model."""
        vcfg = self.require_vision()
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            images = [images]  # one image
        if not images:
            raise InputError("no images to internalize")
        pixels = vision.preprocess_images(images, vcfg)
        ids = self.image_document_ids(len(images), text)
        window = self.ctx_config.max_position_embeddings
        if len(ids) > window:
            raise InputError(
                f"{len(images)} image(s) take {len(ids):,} tokens, over the context model's "
                f"window of {window:,}; internalize fewer images at once"
            )
        tokens, mask = pad_chunks([ids], multiple=self.pad_multiple)
        groups = vision.image_groups(tokens, vcfg)
        window = self.ctx_config.sliding_window
        last = int(np.nonzero(groups[0])[0][-1])
        if window is not None and last >= window:  # see transformer.forward: exact before it
            raise InputError(
                f"the images end at token {last:,}, past the context encoder's sliding window "
                f"of {window:,} (where its image attention is exact); internalize fewer images "
                "at once"
            )
        a, b = image_chunk_loras(
            self.params, self.ctx_params, self.ctx_vision[1], jnp.asarray(tokens),
            jnp.asarray(mask), jnp.asarray(groups), jnp.asarray(pixels), config=self.config,
            ctx_config=self.ctx_config, vision_config=vcfg, iterative=iterative, dtype=self.dtype,
        )  # fmt: skip
        bias = bias_lora(self.params, self.config) if self.config.use_bias else None
        ad = compose(a, b, [1], float(self.config.lora_alpha), bias=bias)
        return Adapter(
            {m: x[0] for m, x in ad.a.items()}, {m: x[0] for m, x in ad.b.items()}, ad.scale
        )

    def internalize(
        self,
        texts: str | Sequence[str] | None = None,
        chunk_size: int | None = None,
        *,
        images: Sequence[Any] | None = None,
        iterative: bool = False,
        scalers: Sequence[float] | None = None,
        bias_scaler: float | None = None,
        combine: bool = False,
        max_chunks: int = MAX_DOC_CHUNKS,
    ) -> Adapter:
        """Documents -> one composed Adapter. A single str gives an unbatched adapter
        [L, (K+1) r, d]; a list gives [n_docs, L, (Kmax+1) r, d] (zero-padded ranks).
        combine=True composes all documents into ONE unbatched adapter: every chunk of every
        document in order, then the bias LoRA once (as if they were one chunked document).
        Limits (InputError): `max_chunks` chunks per document, chunks within the context
        model's window (see chunk_document).
        images: one document of images (then `texts`, one str, if given) through a Gemma-3 VLM
        context encoder (internalize_images); the base model stays text-only.
        iterative: each layer's LoRA made as the context encoder produces that layer's
        activations (the same adapter, far less transient memory; see chunk_loras)."""
        if images is not None:
            if texts is not None and not isinstance(texts, str):
                raise InputError("with images, texts is one str (the text after the images)")
            if chunk_size is not None or scalers is not None or combine:
                raise InputError("an image document is one chunk: no chunk_size, scalers, combine")
            return self.internalize_images(images, texts, iterative=iterative)
        if texts is None:
            raise InputError("nothing to internalize: pass texts or images")
        single = isinstance(texts, str)
        docs = [texts] if single else list(texts)
        if not docs:
            raise InputError("no documents to internalize")
        chunks = [self.chunk_document(t, chunk_size, max_chunks=max_chunks) for t in docs]
        pad_to = 0
        if any(len(d) > 1 for d in chunks):
            # chunked: pad to the longest chunk the size allows, not this document's longest,
            # so every document at this chunk size runs the same compiled program
            prefix, suffix = ctx_affixes(self.ctx_tokenizer, self.template_kind)
            pad_to = min(
                chunk_size + len(prefix) + len(suffix), self.ctx_config.max_position_embeddings
            )
        if combine:
            chunks, single = [[c for d in chunks for c in d]], True
        ad = self.internalize_chunks(
            chunks, iterative=iterative, scalers=scalers, bias_scaler=bias_scaler,
            max_chunks=max_chunks, pad_to=pad_to,
        )  # fmt: skip
        if single:
            ad = Adapter(
                {m: x[0] for m, x in ad.a.items()}, {m: x[0] for m, x in ad.b.items()}, ad.scale
            )
        return ad

    # -- using the adapter
    def logits(self, query_ids: jax.Array, adapter: Adapter | None = None, **kw) -> jax.Array:
        """Base-model logits for token ids [B, T] with `adapter` applied (None = base model)."""
        query_ids = np.asarray(query_ids)
        n = len(query_ids)
        if self.mesh is not None and not kw:  # rows (and per-row adapters) over the batch axes
            m = shd.batch_multiple(self.mesh)
            if adapter is not None and adapter.batch_shape and adapter.batch_shape[0] == n:
                adapter = jax.tree.map(lambda x: self._rows(shd.pad_rows(x, m)), adapter)
            query_ids = shd.pad_rows(query_ids, m)
        out = transformer.forward(
            self.base_params,
            self.base_config,
            self._rows(query_ids) if self.mesh is not None and not kw else jnp.asarray(query_ids),
            adapter=adapter,
            dtype=self.dtype,
            **kw,
        )
        return out.logits[:n]

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
            mesh=self.mesh,
            **kw,
        )
        return out.texts[0] if single else out.texts
