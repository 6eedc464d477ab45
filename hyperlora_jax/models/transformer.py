"""The base decoder: one Linen model for every family, layers scanned over stacked params.

Public entry points are plain functions of a params tree (no 'params' collection wrapper):
`init_params`, `forward`, `init_cache`, `param_logical_axes`. LoRAs enter as an `Adapter`
whose layer axis is scanned along with the layer params; `adapter=None` is the base model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import ConfigError, InputError
from hyperlora_jax.models.config import TARGET_MODULES, ModelConfig
from hyperlora_jax.models.layers import (
    F32,
    MLP,
    Attention,
    MaskInputs,
    RMSNorm,
    _param,
    layer_rope_table,
)
from hyperlora_jax.precision import matmul

if TYPE_CHECKING:  # hints only: models sit below lora (forward reads .a, .b, .scale)
    from hyperlora_jax.lora.adapter import Adapter

Params = dict[str, Any]
Cache = dict[str, jax.Array]


class ForwardOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] f32 (final soft-cap applied)
    hidden_states: jax.Array | None  # [B, k+1, T, H]; last entry has the final norm applied
    cache: Cache | None
    # layer_fn's outputs for the same k+1 entries as hidden_states, stacked [k+1, ...]
    layer_outputs: Any = None


class LayerInputs(NamedTuple):
    """Inputs every layer sees alike (broadcast by the layer scan)."""

    positions: jax.Array  # [B, T] RoPE positions
    q_idx: jax.Array  # [B, T] query slots
    q_seg: jax.Array  # [B, T] segment ids (0 = padding)
    k_idx: jax.Array  # [B, S] key slots (S = T without a cache, the cache length with one)
    k_seg: jax.Array  # [B, S]
    adapter_index: jax.Array | None  # [B, T] ints or [B, T, N] weights (see layers.lora_delta)
    # {"k", "v": [L, B, kv_heads, S, head_dim], "end": [B]}: read by each layer at its index; the
    # new K/V come back as the scan's output and are written once after it (no per-layer copy).
    cache: Cache | None


class PerLayer(NamedTuple):
    """Inputs with a leading layer axis [k, ...] (k layers run), scanned with the layer params."""

    inv_freq: jax.Array  # [k, head_dim/2]
    sliding: jax.Array  # [k] bool
    lora: dict | None  # {"a", "b": {module: [k, ...]}}
    index: jax.Array  # [k] the layer's index (into LayerInputs.cache)


class DecoderLayer(nn.Module):
    """Pre-norm block; Gemma adds post-attention / post-MLP norms (the "sandwich")."""

    config: ModelConfig
    param_dtype: jnp.dtype = F32
    lora_scale: float = 1.0
    collect_hidden: bool = False
    prefill: bool = False
    full_keys: bool = False
    layer_fn: Callable | None = None  # forward(layer_fn=...)

    @nn.compact
    def __call__(self, carry, shared: LayerInputs, per_layer: PerLayer):
        """carry: x, or (x, hidden [k+1, B, T, H]) with collect_hidden."""
        c = self.config
        x, hidden = carry if self.collect_hidden else (carry, None)
        consumed = None if self.layer_fn is None else self.layer_fn(x, per_layer.index)
        lora = per_layer.lora
        norm = dict(dim=c.hidden_size, eps=c.rms_norm_eps, plus_one=c.norm_plus_one)
        kw = dict(param_dtype=self.param_dtype)
        cache = shared.cache
        if cache is not None:
            i = per_layer.index
            cache = {"k": cache["k"][i], "v": cache["v"][i], "end": cache["end"]}
        attn = Attention(c, prefill=self.prefill, full_keys=self.full_keys, name="attn", **kw)
        h, new_kv = attn(
            RMSNorm(**norm, **kw, name="attn_norm")(x),
            shared.positions,
            per_layer.inv_freq,
            MaskInputs(shared.q_idx, shared.q_seg, shared.k_idx, shared.k_seg, per_layer.sliding),
            lora,
            self.lora_scale,
            shared.adapter_index,
            cache,
        )
        if c.sandwich_norm:
            h = RMSNorm(**norm, **kw, name="post_attn_norm")(h)
        x = x + h
        h = MLP(c, name="mlp", **kw)(
            RMSNorm(**norm, **kw, name="mlp_norm")(x), lora, self.lora_scale, shared.adapter_index
        )
        if c.sandwich_norm:
            h = RMSNorm(**norm, **kw, name="post_mlp_norm")(h)
        x = x + h
        out = new_kv if consumed is None else (new_kv, consumed)
        if hidden is None:
            return x, out
        # written in place into the carried stack (slot 0: the embeddings) rather than stacked as
        # the scan's output and concatenated after it, which held two copies of the stack. Only
        # for encoders that are never differentiated: a gradient would keep the stack per layer.
        hidden = jax.lax.dynamic_update_index_in_dim(hidden, x, per_layer.index + 1, 0)
        return (x, hidden), out


class Decoder(nn.Module):
    """Embedding -> scanned layers -> final norm -> (tied) LM head."""

    config: ModelConfig
    num_layers: int
    param_dtype: jnp.dtype = F32
    dtype: jnp.dtype = F32
    lora_scale: float = 1.0
    collect_hidden: bool = False
    return_logits: bool = True
    remat_policy: str | None = None
    prefill: bool = False
    full_keys: bool = False
    # num_layers < the stored layers (early exit): each step reads its layer's weights from the
    # whole stack (a "layer" variable collection holds the step's index) instead of a sliced copy
    # of the first num_layers layers' weights, which cost a copy of them per call.
    exit_early: bool = False
    layer_fn: Callable | None = None  # forward(layer_fn=...)

    @nn.compact
    def __call__(
        self,
        tokens,
        shared: LayerInputs,
        per_layer: PerLayer,
        embeddings_noise=None,
        logits_at=None,
        image_embeddings=None,
        image_groups=None,
    ):
        c = self.config
        emb = _param(
            self,
            "embedding",
            nn.initializers.normal(0.02),
            (c.vocab_size, c.hidden_size),
            ("vocab", "embed"),
            self.param_dtype,
        )
        x = jnp.take(emb, tokens, axis=0).astype(self.dtype)
        if embeddings_noise is not None:  # NEFTune: added to embed_tokens' output, before sqrt(H)
            x = x + embeddings_noise.astype(self.dtype)
        if c.embed_scale:  # HF multiplies by sqrt(H) rounded to the weights' dtype
            x = x * jnp.asarray(c.hidden_size**0.5, dtype=self.dtype)
        if image_groups is not None:  # Gemma-3: soft tokens replace image placeholders, unscaled
            x = jnp.where(image_groups[..., None] > 0, image_embeddings.astype(self.dtype), x)

        layer_cls = DecoderLayer
        if self.remat_policy is not None:
            policy = None
            if self.remat_policy not in ("full", "nothing_saveable"):
                policy = getattr(jax.checkpoint_policies, self.remat_policy, None)
                if policy is None:
                    raise ConfigError(
                        f"unknown remat_policy {self.remat_policy!r}; use 'full' or a "
                        "jax.checkpoint_policies name such as 'dots_saveable'"
                    )
            layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=False)
        if self.exit_early:
            scan = nn.scan(
                nn.map_variables(layer_cls, ["params", "layer"], _pick_layer, mutable=False),
                variable_broadcast="params",
                variable_axes={"layer": 0},
                split_rngs={"params": False},
                in_axes=(nn.broadcast, 0),
                length=self.num_layers,
            )
        else:
            scan = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, 0),
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
        carry = x
        if self.collect_hidden:
            hidden = jnp.zeros((self.num_layers + 1, *x.shape), x.dtype)
            carry = (x, jax.lax.dynamic_update_index_in_dim(hidden, x, 0, 0))
        carry, new_kv = scan(
            c,
            self.param_dtype,
            self.lora_scale,
            self.collect_hidden,
            self.prefill,
            self.full_keys,
            self.layer_fn,
            name="layers",
        )(carry, shared, per_layer)
        x, hidden = carry if self.collect_hidden else (carry, None)
        consumed = None
        if self.layer_fn is not None:
            new_kv, consumed = new_kv

        x = RMSNorm(
            c.hidden_size,
            c.rms_norm_eps,
            c.norm_plus_one,
            param_dtype=self.param_dtype,
            name="final_norm",
        )(x)
        hs = None
        if self.collect_hidden:  # the last layer's output final-normed, as HF's hidden_states
            hs = jax.lax.dynamic_update_index_in_dim(hidden, x, self.num_layers, 0).swapaxes(0, 1)
        if consumed is not None:  # the last entry: the final-normed output
            last = self.layer_fn(x, jnp.asarray(self.num_layers, jnp.int32))
            consumed = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), consumed, last)
        logits = None
        if self.return_logits:
            if c.tie_word_embeddings:
                w = emb.T
            else:
                w = _param(
                    self,
                    "lm_head",
                    nn.initializers.normal(0.02),
                    (c.hidden_size, c.vocab_size),
                    ("embed", "vocab"),
                    self.param_dtype,
                )
            if logits_at is not None:  # only the rows asked for: the LM head is a big matmul
                x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
            with jax.named_scope("lm_head"):  # FLOP accounting finds the head by this name
                logits = matmul(x, w, x.dtype)  # f32 accumulation; fast bf16 backward
            if c.final_logit_softcap is not None:
                logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
        return logits, hs, new_kv, consumed


def _pick_layer(variables: dict) -> dict:
    """Decoder.exit_early: this scan step's layer out of the stacked weights."""
    i = variables["layer"]["index"]
    return {"params": jax.tree.map(lambda w: w[i], variables["params"])}


def _segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its contiguous segment run (restarts at every change)."""
    t = jnp.arange(segment_ids.shape[1])[None, :]
    start = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    seg_start = jax.lax.cummax(jnp.where(start, t, 0), axis=1)
    return t - seg_start


def _image_block_ends(q_idx: jax.Array, groups: jax.Array) -> jax.Array:
    """Query slots with each image placeholder moved to its image's last slot, so the causal test
    `key <= query` lets an image's tokens see one another (HF Gemma-3's blockwise overlay)."""
    t = groups.shape[1]
    last = jnp.concatenate([groups[:, 1:] != groups[:, :-1], jnp.ones_like(groups[:, :1], bool)], 1)
    ends = jax.lax.cummin(jnp.where(last, jnp.arange(t, dtype=jnp.int32), t), axis=1, reverse=True)
    return jnp.where(groups > 0, ends, q_idx)


def _prepare_adapter(config, adapter, adapter_index, batch, k):
    """Validate an Adapter and move its layer axis first: {a, b: {m: [k, ...]}}."""
    if adapter is None:
        if adapter_index is not None:
            raise InputError("adapter_index was given without an adapter; pass both or neither")
        return None
    unknown = [m for m in adapter.a if m not in TARGET_MODULES]
    if unknown or set(adapter.a) != set(adapter.b):
        raise InputError(
            f"adapter modules {sorted(adapter.a)} / {sorted(adapter.b)} must match and be among "
            f"{TARGET_MODULES}; unknown: {unknown}"
        )
    out = {"a": {}, "b": {}}
    for m in adapter.a:
        a, b = adapter.a[m], adapter.b[m]
        d_in, d_out = config.module_dims(m)
        if (
            a.ndim not in (3, 4, 5)
            or a.ndim != b.ndim
            or a.shape[-1] != d_in
            or b.shape[-1] != d_out
        ):
            raise InputError(
                f"adapter {m}: A {a.shape} / B {b.shape} do not fit [*, L, R, {d_in}] / "
                f"[*, L, R, {d_out}] for this model"
            )
        n_layers = a.shape[-3]
        if n_layers != config.num_layers:
            raise InputError(
                f"adapter {m} has {n_layers} layers but the model has {config.num_layers}; "
                "generate the adapter for this base model"
            )
        if a.ndim == 5 and (adapter_index is None or a.shape[0] != batch):
            raise InputError(
                f"adapter {m} is [B, N, L, R, d] (N adapters per row): it needs adapter_index and "
                f"B={a.shape[0]} must equal the batch {batch}"
            )
        if a.ndim >= 4:
            if adapter_index is None and a.shape[0] != batch:
                raise InputError(
                    f"adapter {m} has a batch of {a.shape[0]} adapters for {batch} sequences; "
                    "pass adapter_index to select among N adapters per token"
                )
            a, b = jnp.moveaxis(a, -3, 0), jnp.moveaxis(b, -3, 0)
        elif adapter_index is not None:
            raise InputError("adapter_index needs adapters with a leading N axis: [N, L, R, d]")
        out["a"][m], out["b"][m] = a[:k], b[:k]
    return out


def init_cache(
    config: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32
) -> Cache:
    """An empty KV cache: k/v [L, B, kv_heads, S, head_dim], slot segment ids, per-row end index
    (slots written so far) and next position."""
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "end": jnp.zeros((batch,), jnp.int32),
        "next_position": jnp.zeros((batch,), jnp.int32),
    }


def _model(
    config,
    k,
    param_dtype,
    dtype=F32,
    scale=1.0,
    hidden=False,
    logits=True,
    remat=None,
    pre=False,
    full_keys=False,
    exit_early=False,
    layer_fn=None,
):
    return Decoder(
        config, k, param_dtype, dtype, scale, hidden, logits, remat, pre, full_keys, exit_early,
        layer_fn,
    )  # fmt: skip


def _dummy_inputs(config: ModelConfig, k: int):
    b, t = 1, 1
    z = jnp.zeros((b, t), jnp.int32)
    shared = LayerInputs(z, z, z + 1, z, z + 1, None, None)
    per_layer = PerLayer(
        jnp.zeros((k, config.head_dim // 2), F32), jnp.zeros((k,), bool), None, jnp.arange(k)
    )
    return z, shared, per_layer


def init_params(config: ModelConfig, rng: jax.Array, dtype: jnp.dtype = jnp.float32) -> Params:
    """Random params (normal(0.02) kernels, HF-style norm init) as a plain tree of arrays."""
    variables = _model(config, config.num_layers, dtype).init(
        rng, *_dummy_inputs(config, config.num_layers)
    )
    return nn.unbox(variables["params"])


def param_logical_axes(config: ModelConfig) -> Any:
    """Tree of PartitionSpecs of logical axis names (layers, vocab, embed, ...) matching params."""
    boxed = jax.eval_shape(
        lambda r: _model(config, config.num_layers, F32).init(
            r, *_dummy_inputs(config, config.num_layers)
        ),
        jax.random.key(0),
    )
    return nn.get_partition_spec(boxed)["params"]


@functools.lru_cache(maxsize=64)
def _rope_table(config: ModelConfig) -> np.ndarray:
    return layer_rope_table(config)


def forward(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    adapter: Adapter | None = None,
    adapter_index: jax.Array | None = None,
    num_layers: int | None = None,
    return_hidden_states: bool = False,
    return_logits: bool = True,
    cache: Cache | None = None,
    dtype: jnp.dtype = jnp.float32,
    remat_policy: str | None = None,
    embeddings_noise: jax.Array | None = None,
    logits_at: jax.Array | None = None,
    prefill: bool = False,
    image_embeddings: jax.Array | None = None,
    image_groups: jax.Array | None = None,
    layer_fn: Callable[[jax.Array, jax.Array], Any] | None = None,
) -> ForwardOutput:
    """Run the decoder on tokens [B, T].

    segment_ids [B, T] (0 = padding): attention is causal and never crosses segments. Without a
    cache, positions default to the index inside each contiguous segment (correct for left/right
    padding and packing). With a cache (decoding: one segment per row), the T tokens are written at
    slots [end, end+T) and positions default to next_position + running count of non-pad tokens.
    `num_layers=k` runs the first k layers only (then the final norm and, if asked, the LM head).
    remat_policy: None, "full", or a jax.checkpoint_policies name such as "dots_saveable".
    embeddings_noise [B, T, H]: added to the embeddings before Gemma's sqrt(H) scale (NEFTune).
    logits_at [B, P] (ints): logits only at these positions, [B, P, V] (cheaper when few matter).
    prefill=True promises a fresh cache (init_cache, nothing written): attention then runs over
    the T tokens only, in causal blocks, and their K/V are written into the cache once.
    adapter_index: ints [B, T] (one of the adapter's N adapters per token) or weights [B, T, N]
    (see `hyperlora_jax.models.layers.lora_delta`).
    image_groups [B, T] ints (k > 0: a placeholder of image k, models/vision.py) with
    image_embeddings [B, T, H]: Gemma-3 images, their soft tokens in place of the placeholders'
    embeddings and bidirectional attention within each image (no KV cache).
    layer_fn(h, i): called on each of the k+1 hidden states of return_hidden_states as the layer
    scan produces it (h [B, T, H] in `dtype`, i its entry as an int32 scalar); its outputs,
    stacked [k+1, ...], come back as ForwardOutput.layer_outputs: a consumer of every layer's
    activations (D2L's iterative mode) for which the [B, k+1, T, H] stack never exists.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise InputError(f"tokens must be [batch, length], got shape {tokens.shape}")
    b, t = tokens.shape
    k = config.num_layers if num_layers is None else int(num_layers)
    if not 1 <= k <= config.num_layers:
        raise InputError(f"num_layers={num_layers} must be in [1, {config.num_layers}]")
    if cache is not None and k != config.num_layers:
        raise InputError("early exit (num_layers) cannot be combined with a KV cache")
    if prefill and cache is None:
        raise InputError("prefill=True needs a fresh cache (init_cache)")
    seg = (
        jnp.ones((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    )
    if seg.shape != (b, t):
        raise InputError(f"segment_ids shape {seg.shape} != tokens shape {tokens.shape}")
    if adapter_index is not None and adapter_index.shape[:2] != (b, t):
        raise InputError(f"adapter_index shape {adapter_index.shape} != tokens shape {(b, t)}")

    steps = jnp.arange(t, dtype=jnp.int32)[None, :]
    if cache is None:
        if positions is None:
            positions = _segment_positions(seg)
        q_idx = jnp.broadcast_to(steps, (b, t))
        k_idx, k_seg = q_idx, seg
        k_seg_attn = k_seg
    else:
        end = cache["end"]
        if positions is None:
            count = jnp.cumsum(seg != 0, axis=1, dtype=jnp.int32) - 1
            positions = cache["next_position"][:, None] + jnp.maximum(count, 0)
        q_idx = end[:, None] + steps
        k_seg = jax.vmap(lambda s, n, e: jax.lax.dynamic_update_slice_in_dim(s, n, e, 0))(
            cache["segment_ids"], seg, end
        )
        k_idx = jnp.broadcast_to(jnp.arange(k_seg.shape[1], dtype=jnp.int32)[None], k_seg.shape)
        k_seg_attn = k_seg
        if prefill:  # keys = these T tokens at slots [0, T)
            k_idx, k_seg_attn = q_idx, seg
    positions = jnp.asarray(positions, jnp.int32)
    if image_groups is not None:
        image_groups = jnp.asarray(image_groups, jnp.int32)
        if cache is not None or image_embeddings is None or image_groups.shape != (b, t):
            raise InputError(
                f"image_groups must be [batch, length] = {(b, t)} with image_embeddings "
                f"[{b}, {t}, H], without a KV cache"
            )
        # Keys may now lie after their query, which the blockwise path never visits: the layers
        # take the full-mask path (`full_keys`).
        q_idx = _image_block_ends(q_idx, image_groups)

    lora = _prepare_adapter(config, adapter, adapter_index, b, k)
    scale = adapter.scale if adapter is not None else 1.0
    layer_params = params["layers"]
    encoder = return_hidden_states or layer_fn is not None
    if cache is None and not encoder and jnp.dtype(dtype) != F32:
        # Weight matrices [L, in, out] cast once, before the layer scan: cast inside it, a
        # differentiated scan (the training student) stacks a low-precision copy of every
        # layer's weights as residuals, rewriting the whole stack each layer (issue 22). Not for
        # the context encoder (hidden states or layer_fn; never differentiated): there the
        # per-layer cast keeps no whole-model copy alive. Norm vectors keep their dtype.
        layer_params = jax.tree.map(
            lambda x: x.astype(dtype) if x.ndim >= 3 and x.dtype == F32 else x, layer_params
        )
    run_params = {**params, "layers": layer_params}
    sliding = jnp.asarray(np.asarray(config.sliding_layers[:k]))
    inv_freq = jnp.asarray(_rope_table(config)[:k])

    model = _model(
        config,
        k,
        F32,
        dtype,
        scale,
        return_hidden_states,
        return_logits,
        remat_policy,
        prefill,
        full_keys=image_groups is not None,
        exit_early=k < config.num_layers,
        layer_fn=layer_fn,
    )
    variables = {"params": run_params}
    if k < config.num_layers:
        variables["layer"] = {"layers": {"index": jnp.arange(k)}}
    logits, hs, new_kv, consumed = model.apply(
        variables,
        tokens,
        LayerInputs(positions, q_idx, seg, k_idx, k_seg_attn, adapter_index, cache),
        PerLayer(inv_freq, sliding, lora, jnp.arange(k)),
        embeddings_noise,
        None if logits_at is None else jnp.asarray(logits_at, jnp.int32),
        image_embeddings,
        image_groups,
    )
    new_cache = None
    if cache is not None:  # the T new keys/values [k, B, kv, T, d] at slots [end, end + T)
        write = jax.vmap(  # over the batch (axis 1), each row at its own end
            lambda buf, new, e: jax.lax.dynamic_update_slice_in_dim(buf, new, e, 2),
            in_axes=(1, 1, 0),
            out_axes=1,
        )
        new_cache = {
            "k": write(cache["k"], new_kv[0], cache["end"]),
            "v": write(cache["v"], new_kv[1], cache["end"]),
            "segment_ids": k_seg,
            "end": cache["end"] + t,
            "next_position": cache["next_position"] + jnp.sum(seg != 0, axis=1, dtype=jnp.int32),
        }
    return ForwardOutput(logits, hs, new_cache, consumed)


# `forward` under jit, with the config and the shape-changing flags static.
forward_jit = jax.jit(
    forward,
    static_argnums=(1,),
    static_argnames=(
        "num_layers",
        "return_hidden_states",
        "return_logits",
        "dtype",
        "remat_policy",
        "prefill",
        "layer_fn",
    ),
)
