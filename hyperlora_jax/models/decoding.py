"""Batched text generation with a KV cache: one jitted program = prefill + lax.while_loop of steps.

The prefill attends over the prompt's own keys in causal blocks (`forward(prefill=True)`) and
writes its K/V into the cache once; each step then attends over the cache slots.

Prompts are left-padded (segment id 0 = padding, so pads are never attended and positions start
at 0 on each row's first real token, as in HF generate with an attention mask). Greedy when
temperature == 0, else temperature + top-p sampling with jax.random. A row stops after emitting a
stop token; the loop ends when every row stopped or after max_new_tokens. An `adapter` (shared or
one per row) is passed to every forward call, so generation runs with a LoRA applied.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import InputError
from hyperlora_jax.models.config import ModelConfig
from hyperlora_jax.models.tokenizer import apply_chat, stop_token_ids
from hyperlora_jax.models.transformer import forward, init_cache
from hyperlora_jax.precision import Precision, get_precision

if TYPE_CHECKING:  # hints only: models sit below lora (forward reads .a, .b, .scale)
    from hyperlora_jax.lora.adapter import Adapter


@dataclasses.dataclass
class GenerationOutput:
    tokens: np.ndarray  # [B, max_new_tokens] generated ids; pad_id after a row's stop token
    lengths: np.ndarray  # [B] generated tokens per row, the stop token included
    texts: list[str] | None  # decoded answers without special tokens (when a tokenizer is given)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, T], segment_ids [B, T]) left-padded; T rounded up to `multiple` so prompts of
    similar length share one compiled program."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    t = max(len(p) for p in prompts)
    t = -(-t // multiple) * multiple
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    seg = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p) :] = np.asarray(p, np.int32)
        seg[i, t - len(p) :] = 1
    return tokens, seg


def _sample(logits: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
    """Next token ids [B] from logits [B, V]: argmax when temperature == 0, else a sample from the
    top-p nucleus at `temperature`. Both may be traced (one compiled program for all settings)."""

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        x = logits.astype(jnp.float32) / temperature
        srt = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # smallest prefix reaching top_p
        thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where((x < thresh) & (top_p < 1.0), -jnp.inf, x)
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.asarray(temperature) == 0.0, greedy, sample, None)


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new_tokens", "pad_id", "dtype", "decode_dtype"),
)
def _generate(
    params,
    tokens,
    segment_ids,
    adapter,
    key,
    stops,
    temperature,
    top_p,
    *,
    config,
    max_new_tokens,
    pad_id,
    dtype,
    decode_dtype,
):
    """Token ids [B, max_new_tokens]. stops: [S] stop ids (-1 = unused slot). The prompt runs in
    `dtype`, each new token in `decode_dtype` (the KV cache's dtype)."""
    b, t = tokens.shape
    cache = init_cache(config, b, t + max_new_tokens, decode_dtype)
    last = jnp.full((b, 1), t - 1, jnp.int32)  # prompts are left-padded: the LM head only there
    out = forward(
        params,
        config,
        tokens,
        segment_ids=segment_ids,
        adapter=adapter,
        cache=cache,
        dtype=dtype,
        logits_at=last,
        prefill=True,
    )
    key, sub = jax.random.split(key)
    tok = _sample(out.logits[:, -1], sub, temperature, top_p)
    done = jnp.isin(tok, stops)
    buf = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)

    def cond(state):
        step, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tok, done, buf, cache, key = state
        o = forward(params, config, tok[:, None], adapter=adapter, cache=cache, dtype=decode_dtype)
        key, sub = jax.random.split(key)
        nxt = _sample(o.logits[:, -1], sub, temperature, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], step, axis=1)
        return step + 1, nxt, done | jnp.isin(nxt, stops), buf, o.cache, key

    state = (jnp.int32(1), tok, done, buf, out.cache, key)
    return jax.lax.while_loop(cond, body, state)[3]


def _default_pad(config: ModelConfig, tokenizer: Any) -> int:
    for v in (config.pad_token_id, getattr(tokenizer, "pad_token_id", None)):
        if v is not None:
            return int(v)
    return 0


def generate(
    params: Any,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | jax.Array = 0,
    stop_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    adapter: Adapter | None = None,
    tokenizer: Any = None,
    dtype: jnp.dtype | None = None,
    pad_to_multiple: int = 8,
    precision: str | Precision | None = None,
    mesh: Any = None,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` for each prompt (token id lists, or strings + tokenizer).

    stop_ids default: the tokenizer's EOS and end-of-turn tokens plus config.eos_token_id.
    seed: an int or a jax.random key; the same seed gives the same samples.
    precision: a policy of `hyperlora_jax.precision` ("f32" = the default, "bf16", "bf16-params",
    "bf16-prefill", "auto" = the one measured fastest for generation); params are cast to its
    param dtype.
    `dtype` alone sets the compute dtype and leaves the params as they are.
    mesh: a jax Mesh (models/sharding.py): the weights laid out by the training rules, the
    prompts (and a per-row adapter) split over its batch axes; same tokens as on one device.
    """

    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if precision is not None and dtype is not None:
        raise InputError("pass dtype or precision, not both")
    if temperature < 0 or not 0 < top_p <= 1:
        raise InputError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if prompts and isinstance(prompts[0], str):
        if tokenizer is None:
            raise InputError("text prompts need a tokenizer; pass tokenizer= or token ids")
        prompts = [tokenizer(p)["input_ids"] for p in prompts]
    if stop_ids is None:
        stop_ids = stop_token_ids(tokenizer, config.eos_token_id)
    pad = _default_pad(config, tokenizer) if pad_id is None else int(pad_id)
    tokens, seg = left_pad(prompts, pad, pad_to_multiple)
    decode_dtype = dtype
    if dtype is None:  # a policy: params cast once per call (load them in its dtype to skip it)
        policy = get_precision(precision, "generate")
        params, dtype, decode_dtype = (
            policy.cast_params(params),
            policy.compute,
            policy.decode_dtype,
        )
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    n_rows = len(tokens)
    if mesh is not None:
        params, tokens, seg, adapter = _on_mesh(mesh, config, params, tokens, seg, adapter)
    # stop ids padded to a multiple of 8 with -1, so different stop sets share one program
    stops = np.full((max(8, -(-len(stop_ids) // 8) * 8),), -1, np.int32)
    stops[: len(stop_ids)] = np.asarray(list(stop_ids), np.int32)
    out = _generate(
        params,
        jnp.asarray(tokens),
        jnp.asarray(seg),
        adapter,
        key,
        jnp.asarray(stops),
        jnp.float32(temperature),
        jnp.float32(top_p),
        config=config,
        max_new_tokens=int(max_new_tokens),
        pad_id=pad,
        dtype=jnp.dtype(dtype),
        decode_dtype=jnp.dtype(decode_dtype),
    )
    out = np.asarray(out)[:n_rows]
    is_stop = np.isin(out, np.asarray(list(stop_ids) or [-1]))
    lengths = np.where(is_stop.any(1), is_stop.argmax(1) + 1, max_new_tokens)
    texts = None
    if tokenizer is not None:
        texts = [
            tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
            for row, n in zip(out, lengths)
        ]
    return GenerationOutput(out, lengths, texts)


def _on_mesh(mesh, config, params, tokens, seg, adapter):
    """generate's inputs onto `mesh`: weights by the logical rules, rows padded to the batch
    axes' size (the last row repeated; dropped from the output) and split over them."""
    from hyperlora_jax.models import sharding as shd

    m = shd.batch_multiple(mesh)
    n = len(tokens)
    if adapter is not None and adapter.batch_shape and adapter.batch_shape[0] == n:
        adapter = jax.tree.map(lambda x: shd.put_rows(shd.pad_rows(x, m), mesh), adapter)
    tokens, seg = (shd.put_rows(shd.pad_rows(x, m), mesh) for x in (tokens, seg))
    return shd.shard_model_params(params, config, mesh), tokens, seg, adapter


def chat(
    params: Any,
    config: ModelConfig,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[list[dict[str, str]]],
    **kwargs: Any,
) -> GenerationOutput:
    """`generate` on chat-formatted prompts: each a user message string or a message list."""

    ids = [
        apply_chat(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p)
        for p in prompts
    ]
    return generate(params, config, ids, tokenizer=tokenizer, **kwargs)
