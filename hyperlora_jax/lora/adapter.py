"""The Adapter pytree: LoRA factors for every layer of a base model, and how they are applied.

Meaning, in every layer l and for every target module m:  y = x W + scale * (x A[l]^T) B[l]
with A: [*batch, L, R, d_in] and B: [*batch, L, R, d_out] (B is the transpose of PEFT's lora_B).
An optional leading batch axis gives each example its own adapter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Adapter:
    """LoRA factors keyed by HF module name ("q_proj", ..., "down_proj").

    `scale` is static (part of the treedef), so adapters with different scales are different types
    to jit; `concat` folds scales into A to compose them.
    """

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    scale: float = struct.field(pytree_node=False, default=1.0)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(sorted(self.a))

    @property
    def num_layers(self) -> int:
        return next(iter(self.a.values())).shape[-3]

    @property
    def rank(self) -> int:
        return next(iter(self.a.values())).shape[-2]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return next(iter(self.a.values())).shape[:-3]

    def layer(self, l: int) -> Adapter:  # noqa: E741
        """The factors of one layer: A [*batch, R, d_in], B [*batch, R, d_out]."""
        return Adapter(
            {m: x[..., l, :, :] for m, x in self.a.items()},
            {m: x[..., l, :, :] for m, x in self.b.items()},
            self.scale,
        )


def lora_delta(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    adapter_index: jax.Array | None = None,
) -> jax.Array:
    """scale * (x A^T) B for one layer's factors, accumulated in f32, cast back to x.dtype.

    x: [B, T, d_in]. a/b: [R, d] (one adapter for all), [B, R, d] (one per sequence), or, with
    `adapter_index` [B, T] of ints, [N, R, d] (each token uses adapter adapter_index[b, t]; used for
    packed rows where each segment has its own adapter). Never forms W + dW.
    """
    f32 = jnp.float32
    xa_dtype = jnp.promote_types(x.dtype, a.dtype)
    x_ = x.astype(xa_dtype)
    if adapter_index is not None:
        # [B, T, N, R] scores for every adapter, then keep the token's own adapter (N is small).
        xa = jnp.einsum("btd,nrd->btnr", x_, a.astype(xa_dtype), preferred_element_type=f32)
        onehot = jax.nn.one_hot(adapter_index, a.shape[0], dtype=f32)
        xa = xa * onehot[..., None]
        out = jnp.einsum("btnr,nro->bto", xa, b.astype(f32), preferred_element_type=f32)
    elif a.ndim == 2:
        xa = jnp.einsum("btd,rd->btr", x_, a.astype(xa_dtype), preferred_element_type=f32)
        out = jnp.einsum("btr,ro->bto", xa, b.astype(f32), preferred_element_type=f32)
    else:
        xa = jnp.einsum("btd,brd->btr", x_, a.astype(xa_dtype), preferred_element_type=f32)
        out = jnp.einsum("btr,bro->bto", xa, b.astype(f32), preferred_element_type=f32)
    return (scale * out).astype(x.dtype)
