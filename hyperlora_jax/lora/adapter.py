"""The Adapter pytree: LoRA factors for every layer of a base model, and their algebra.

Meaning, in every layer l and for every target module m:  y = x W + scale * (x A[l]^T) B[l]
with A: [*batch, L, R, d_in] and B: [*batch, L, R, d_out] (B is the transpose of PEFT's lora_B).
An optional leading batch axis gives each example its own adapter. The decoder applies the
factors inside each projection (`hyperlora_jax.models.layers.lora_delta`).

Everything here is a pure function of arrays (jit/vmap/grad friendly). Composition rules:
concatenating along R sums the deltas exactly, zero rows add nothing (so ragged ranks pad
exactly), and a scalar on a part multiplies its A only (linear in the delta), as in D2L.

The algebra, by name (delta_i = scale_i * A_i^T B_i per module and layer):
  concat / weighted_sum   sum_i w_i delta_i, exact, rank = sum of ranks
  scale                   w * delta
  truncate                best rank-k approximation by SVD, with its Frobenius error
  from_dense              an adapter from dense deltas [*b, L, d_in, d_out] (SVD, with error)
  merge_into / unmerge    W +- delta in our transformer's params, or in any tree mapped by
                          `hyperlora_jax.lora.targets.Target` rules (hyperlora_jax.lora.functional)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hyperlora_jax.errors import InputError
from hyperlora_jax.models.config import ATTN_MODULES, TARGET_MODULES, ModelConfig


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
        """The largest rank over modules (they are usually all equal)."""
        return max(x.shape[-2] for x in self.a.values())

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return next(iter(self.a.values())).shape[:-3]

    @property
    def dtype(self):
        return next(iter(self.a.values())).dtype

    def layer(self, l: int) -> Adapter:  # noqa: E741
        """The factors of one layer: A [*batch, R, d_in], B [*batch, R, d_out]."""
        return Adapter(
            {m: x[..., l, :, :] for m, x in self.a.items()},
            {m: x[..., l, :, :] for m, x in self.b.items()},
            self.scale,
        )


def module_path(name: str) -> str:
    """'self_attn' or 'mlp': the HF submodule a target module lives in."""
    return "self_attn" if name in ATTN_MODULES else "mlp"


# --------------------------------------------------------------------------- dense delta


def to_dense_delta(adapter: Adapter) -> dict[str, jax.Array]:
    """scale * A^T B per module, [*batch, L, d_in, d_out] in f32 (for tests and merging only)."""
    return {
        m: adapter.scale
        * jnp.einsum(
            "...rd,...ro->...do",
            adapter.a[m].astype(jnp.float32),
            adapter.b[m].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        for m in adapter.a
    }


# --------------------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate(adapter: Adapter, config: ModelConfig | None = None) -> Adapter:
    """Check an adapter against itself and (if given) a model config; return it unchanged.

    Raises InputError naming the module and the mismatch: unknown module, A/B shapes that
    disagree, a layer count or width from another model, NaN/Inf entries.
    """
    if not isinstance(adapter, Adapter):
        raise InputError(f"expected an Adapter, got {type(adapter).__name__}")
    if not adapter.a:
        raise InputError(
            "the adapter has no modules; it must target at least one of "
            f"{', '.join(TARGET_MODULES)}"
        )
    if set(adapter.a) != set(adapter.b):
        raise InputError(
            f"A and B target different modules: A has {sorted(adapter.a)}, "
            f"B has {sorted(adapter.b)}"
        )
    if not math.isfinite(adapter.scale):
        raise InputError(f"adapter scale is {adapter.scale}; it must be a finite number")
    batch = None
    for m in sorted(adapter.a):
        a, b = adapter.a[m], adapter.b[m]
        if m not in TARGET_MODULES:
            raise InputError(
                f"unknown target module {m!r}; an adapter may target {', '.join(TARGET_MODULES)}"
            )
        if a.ndim < 3 or b.ndim < 3:
            raise InputError(
                f"{m}: A {tuple(a.shape)} and B {tuple(b.shape)} must be [*batch, L, R, d]"
            )
        if a.shape[:-1] != b.shape[:-1]:
            raise InputError(
                f"{m}: A {tuple(a.shape)} and B {tuple(b.shape)} disagree on [*batch, L, R]; "
                "A is [*batch, L, R, d_in] and B is [*batch, L, R, d_out]"
            )
        if batch is None:
            batch = a.shape[:-3]
        elif a.shape[:-3] != batch:
            raise InputError(f"{m}: batch shape {a.shape[:-3]} differs from other modules' {batch}")
        if config is not None:
            if a.shape[-3] != config.num_layers:
                raise InputError(
                    f"{m}: the adapter has {a.shape[-3]} layers but the {config.family} model has "
                    f"{config.num_layers}; the adapter was made for a different base model"
                )
            d_in, d_out = config.module_dims(m)
            if (a.shape[-1], b.shape[-1]) != (d_in, d_out):
                raise InputError(
                    f"{m}: adapter widths (d_in={a.shape[-1]}, d_out={b.shape[-1]}) do not match "
                    f"the model's ({d_in}, {d_out}); the adapter was made for a different model"
                )
        for name, x in (("A", a), ("B", b)):
            if _is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
                bad = int(jnp.sum(~jnp.isfinite(x)))
                raise InputError(f"{m}: {name} holds {bad} NaN/Inf entries")
    return adapter


# --------------------------------------------------------------------------- constructors


def zeros(
    config: ModelConfig,
    modules: Sequence[str],
    rank: int,
    *,
    batch_shape: tuple[int, ...] = (),
    scale: float = 1.0,
    dtype=jnp.float32,
) -> Adapter:
    """An adapter that changes nothing (all factors zero)."""
    a, b = {}, {}
    for m in modules:
        d_in, d_out = config.module_dims(m)
        a[m] = jnp.zeros((*batch_shape, config.num_layers, rank, d_in), dtype)
        b[m] = jnp.zeros((*batch_shape, config.num_layers, rank, d_out), dtype)
    return Adapter(a, b, scale)


def init(
    rng: jax.Array,
    config: ModelConfig,
    modules: Sequence[str],
    rank: int,
    *,
    batch_shape: tuple[int, ...] = (),
    scale: float = 1.0,
    dtype=jnp.float32,
) -> Adapter:
    """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(d_in)), B = 0.

    The adapter is therefore a no-op until B is trained, like a fresh PEFT LoRA.
    """
    out = zeros(config, modules, rank, batch_shape=batch_shape, scale=scale, dtype=dtype)
    keys = jax.random.split(rng, len(modules))
    a = {}
    for k, m in zip(keys, modules):
        d_in = out.a[m].shape[-1]
        bound = 1.0 / math.sqrt(d_in)
        a[m] = jax.random.uniform(k, out.a[m].shape, jnp.float32, -bound, bound).astype(dtype)
    return Adapter(a, out.b, scale)


# --------------------------------------------------------------------------- algebra


def scale(adapter: Adapter, factor) -> Adapter:
    """The adapter whose delta is `factor` times this one's (folded into A; may be traced)."""
    return Adapter(
        {m: (x * factor).astype(x.dtype) for m, x in adapter.a.items()},
        dict(adapter.b),
        adapter.scale,
    )


def with_scale(adapter: Adapter, new_scale: float) -> Adapter:
    """The same delta written with static scale `new_scale` (the ratio is folded into A)."""
    if new_scale == adapter.scale:
        return adapter
    if new_scale == 0:
        raise InputError("cannot rewrite an adapter with scale 0")
    out = scale(adapter, adapter.scale / new_scale)
    return Adapter(out.a, out.b, float(new_scale))


def cast(adapter: Adapter, dtype) -> Adapter:
    """All factors in `dtype`."""
    return Adapter(
        {m: x.astype(dtype) for m, x in adapter.a.items()},
        {m: x.astype(dtype) for m, x in adapter.b.items()},
        adapter.scale,
    )


def pad_rank(adapter: Adapter, rank: int) -> Adapter:
    """Zero-pad every module to rank `rank` along R (exact: zero rows add nothing)."""

    def pad(x):
        r = x.shape[-2]
        if r > rank:
            raise InputError(f"cannot pad rank {r} down to {rank}; pad_rank only grows the rank")
        widths = [(0, 0)] * x.ndim
        widths[-2] = (0, rank - r)
        return jnp.pad(x, widths)

    return Adapter(
        {m: pad(x) for m, x in adapter.a.items()},
        {m: pad(x) for m, x in adapter.b.items()},
        adapter.scale,
    )


def _module_dims(adapters: Sequence[Adapter]) -> dict[str, tuple[int, int, int]]:
    """(L, d_in, d_out) for every module in any of the adapters, checking they agree."""
    dims: dict[str, tuple[int, int, int]] = {}
    for ad in adapters:
        for m in ad.a:
            d = (ad.a[m].shape[-3], ad.a[m].shape[-1], ad.b[m].shape[-1])
            if dims.setdefault(m, d) != d:
                raise InputError(
                    f"{m}: adapters disagree on (layers, d_in, d_out): {dims[m]} vs {d}"
                )
    return dims


def concat(adapters: Sequence[Adapter], scalars: Sequence | None = None) -> Adapter:
    """One adapter whose delta is sum_i scalars[i] * delta_i, by concatenating along R.

    Per-part scalars and differing static scales are folded into each part's A (so the result
    is linear in every scalar, as D2L's chunk scalers). Modules missing from a part count as
    zero there; batch shapes broadcast (a shared bias LoRA joins per-example chunk LoRAs).
    The result has the first adapter's static scale.
    """
    adapters = list(adapters)
    if not adapters:
        raise InputError("concat needs at least one adapter")
    if scalars is not None and len(scalars) != len(adapters):
        raise InputError(f"concat got {len(scalars)} scalars for {len(adapters)} adapters")
    out_scale = adapters[0].scale if adapters[0].scale != 0 else 1.0
    dims = _module_dims(adapters)
    try:
        batch = jnp.broadcast_shapes(*(ad.batch_shape for ad in adapters))
    except ValueError as e:
        raise InputError(
            f"adapter batch shapes {[ad.batch_shape for ad in adapters]} do not broadcast"
        ) from e
    dtype = jnp.result_type(*(ad.dtype for ad in adapters))
    a_out, b_out = {}, {}
    for m in sorted(dims):
        layers, d_in, d_out = dims[m]
        a_parts, b_parts = [], []
        for i, ad in enumerate(adapters):
            factor = ad.scale / out_scale
            if scalars is not None:
                factor = factor * scalars[i]
            if m in ad.a:
                a_m, b_m = ad.a[m].astype(dtype), ad.b[m].astype(dtype)
                if not (isinstance(factor, float | int) and factor == 1):
                    a_m = (a_m * factor).astype(dtype)
            else:
                r = ad.rank
                a_m = jnp.zeros((layers, r, d_in), dtype)
                b_m = jnp.zeros((layers, r, d_out), dtype)
            a_parts.append(jnp.broadcast_to(a_m, (*batch, *a_m.shape[-3:])))
            b_parts.append(jnp.broadcast_to(b_m, (*batch, *b_m.shape[-3:])))
        a_out[m] = jnp.concatenate(a_parts, axis=-2)
        b_out[m] = jnp.concatenate(b_parts, axis=-2)
    return Adapter(a_out, b_out, out_scale)


def weighted_sum(adapters: Sequence[Adapter], weights: Sequence) -> Adapter:
    """The adapter whose delta is sum_i weights[i] * delta_i, exactly (rank concatenation).

    a[m]: [*batch, L, sum_i R_i, d_in]; weights may be traced (the result is linear in each).
    To bring the rank back down, `truncate` the result (approximate, error reported).
    """
    return concat(adapters, weights)


def concat_batch(adapter: Adapter, scalars: jax.Array | None = None) -> Adapter:
    """Concatenate the last batch axis into R, in order: [..., K, L, r, d] -> [..., L, K*r, d].

    The D2L chunk composition: the result's delta is sum_k scalars[..., k] * delta_k (scalars
    multiply A only). Zero scalars (or zero-padded chunks) drop a chunk exactly, so contexts with
    fewer chunks pad to a common K.
    """
    if not adapter.batch_shape:
        raise InputError("concat_batch needs an adapter with a batch axis [..., K, L, r, d]")

    def fold(x, s=None):
        if s is not None:
            x = (x * jnp.asarray(s)[..., None, None, None]).astype(x.dtype)
        x = jnp.moveaxis(x, -4, -3)  # [..., L, K, r, d]
        return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])

    return Adapter(
        {m: fold(x, scalars) for m, x in adapter.a.items()},
        {m: fold(x) for m, x in adapter.b.items()},
        adapter.scale,
    )


def stack(adapters: Sequence[Adapter]) -> Adapter:
    """Stack adapters along a new leading batch axis; ranks are zero-padded to the largest.

    Different static scales are folded into A (the result has the first one's scale); modules
    missing from some adapters are zeros there.
    """
    adapters = list(adapters)
    if not adapters:
        raise InputError("stack needs at least one adapter")
    shapes = {ad.batch_shape for ad in adapters}
    if len(shapes) != 1:
        raise InputError(f"stack needs equal batch shapes, got {sorted(shapes)}")
    # Each part through concat([part]) gets the union of modules and the common scale.
    dims = _module_dims(adapters)
    s = adapters[0].scale if adapters[0].scale != 0 else 1.0
    full = []
    for ad in adapters:
        missing = [m for m in dims if m not in ad.a]
        ad = with_scale(ad, s)
        if missing:
            r = ad.rank
            a = dict(ad.a)
            b = dict(ad.b)
            for m in missing:
                layers, d_in, d_out = dims[m]
                a[m] = jnp.zeros((*ad.batch_shape, layers, r, d_in), ad.dtype)
                b[m] = jnp.zeros((*ad.batch_shape, layers, r, d_out), ad.dtype)
            ad = Adapter(a, b, s)
        full.append(ad)
    rank = max(ad.rank for ad in full)
    full = [pad_rank(ad, rank) for ad in full]
    return Adapter(
        {m: jnp.stack([ad.a[m] for ad in full]) for m in dims},
        {m: jnp.stack([ad.b[m] for ad in full]) for m in dims},
        s,
    )


def unstack(adapter: Adapter) -> list[Adapter]:
    """Split the leading batch axis into a list of adapters."""
    if not adapter.batch_shape:
        raise InputError("unstack needs an adapter with a leading batch axis")
    n = adapter.batch_shape[0]
    return [
        Adapter(
            {m: x[i] for m, x in adapter.a.items()},
            {m: x[i] for m, x in adapter.b.items()},
            adapter.scale,
        )
        for i in range(n)
    ]


# --------------------------------------------------------------------------- SVD


def _hi(subscripts, *xs):
    return jnp.einsum(subscripts, *xs, precision=jax.lax.Precision.HIGHEST)


def _factor_svd(a: jax.Array, b: jax.Array):
    """SVD of A^T B without forming it: A [..., R, d_in], B [..., R, d_out] ->
    U [..., d_in, k], S [..., k], Vt [..., k, d_out] with k = min(R, d_in, d_out), in f32."""
    qa, ra = jnp.linalg.qr(jnp.swapaxes(a.astype(jnp.float32), -1, -2))  # A^T = Qa Ra
    qb, rb = jnp.linalg.qr(jnp.swapaxes(b.astype(jnp.float32), -1, -2))  # B^T = Qb Rb
    core = _hi("...ir,...jr->...ij", ra, rb)  # Ra Rb^T: A^T B = Qa (Ra Rb^T) Qb^T
    u, s, vt = jnp.linalg.svd(core, full_matrices=False)
    return _hi("...di,...ik->...dk", qa, u), s, _hi("...kj,...oj->...ko", vt, qb)


def _from_svd(u, s, vt, rank: int, scale: float):
    """Rank-`rank` factors of (1/scale) * U S Vt (balanced: sqrt(S) on each side), zero-padded
    when fewer singular values exist; and the discarded part's Frobenius norm (times scale)."""
    k = min(rank, s.shape[-1])
    root = jnp.sqrt(s[..., :k])
    a = jnp.swapaxes(u[..., :k] * root[..., None, :], -1, -2)  # [..., k, d_in]
    b = vt[..., :k, :] * root[..., :, None]  # [..., k, d_out]
    if k < rank:
        pad = [(0, 0)] * (a.ndim - 2) + [(0, rank - k), (0, 0)]
        a, b = jnp.pad(a, pad), jnp.pad(b, pad)
    err = jnp.abs(scale) * jnp.sqrt(jnp.sum(jnp.square(s[..., k:]), axis=-1))
    return a, b, err


def truncate(adapter: Adapter, rank: int) -> tuple[Adapter, dict[str, jax.Array]]:
    """The best rank-`rank` adapter (Frobenius, per module and layer; Eckart-Young) and its error.

    A [*batch, L, R, d_in] -> [*batch, L, rank, d_in] (B likewise, same static scale, f32).
    error[m]: [*batch, L], ||delta - delta_truncated||_F = scale * sqrt(sum of the discarded
    squared singular values of A^T B). Computed from QR of the factors (never the d_in x d_out
    matrix); rank >= R is exact (error 0, zero-padded). Jit-able with `rank` static.
    """
    if rank < 1:
        raise InputError(f"truncate needs rank >= 1, got {rank}")
    a_out, b_out, errors = {}, {}, {}
    for m in adapter.a:
        u, s, vt = _factor_svd(adapter.a[m], adapter.b[m])
        a_out[m], b_out[m], errors[m] = _from_svd(u, s, vt, rank, adapter.scale)
    return Adapter(a_out, b_out, adapter.scale), errors


def from_dense(
    deltas: dict[str, jax.Array], rank: int, scale: float = 1.0
) -> tuple[Adapter, dict[str, jax.Array]]:
    """An adapter approximating dense deltas {m: [*batch, L, d_in, d_out]} (e.g. a fine-tune's
    W_tuned - W) at rank `rank` by SVD, with static `scale`; and the Frobenius error
    [*batch, L] per module (0 when the delta's rank is at most `rank`)."""
    if rank < 1:
        raise InputError(f"from_dense needs rank >= 1, got {rank}")
    if scale == 0:
        raise InputError("from_dense needs a non-zero scale")
    a_out, b_out, errors = {}, {}, {}
    for m, d in deltas.items():
        if d.ndim < 3:
            raise InputError(f"{m}: dense delta {tuple(d.shape)} must be [*batch, L, d_in, d_out]")
        u, s, vt = jnp.linalg.svd(d.astype(jnp.float32) / scale, full_matrices=False)
        a_out[m], b_out[m], errors[m] = _from_svd(u, s, vt, rank, scale)
    return Adapter(a_out, b_out, float(scale)), errors


# --------------------------------------------------------------------------- dense merge


def _kernel_path(m: str) -> tuple[str, str]:
    return ("attn" if m in ATTN_MODULES else "mlp", m)


def _layer_params(params: dict) -> dict:
    """The stacked per-layer params subtree of the decoder (kernels are [L, d_in, d_out])."""
    for key in ("layers",):
        if key in params:
            return params[key]
    raise InputError(
        f"params have no stacked 'layers' subtree (top-level keys {sorted(params)}); pass the "
        "params of hyperlora_jax.models.transformer.init_params / load_hf_model"
    )


def _apply_dense(params: dict, adapter: Adapter, config: ModelConfig, sign: float) -> dict:
    validate(adapter, config)
    if adapter.batch_shape:
        raise InputError(
            f"merge_into takes one adapter, got batch shape {adapter.batch_shape}; "
            "use unstack() and merge one"
        )
    layers = _layer_params(params)
    new_layers = jax.tree_util.tree_map(lambda x: x, layers)  # shallow-ish copy of dicts
    for m, delta in to_dense_delta(adapter).items():
        group, name = _kernel_path(m)
        try:
            kernel = layers[group][name]["kernel"]
        except KeyError as e:
            raise InputError(
                f"params have no layers/{group}/{name}/kernel to merge {m} into"
            ) from e
        if kernel.shape != delta.shape:
            raise InputError(f"{m}: kernel {kernel.shape} vs delta {delta.shape}")
        merged = (kernel.astype(jnp.float32) + sign * delta).astype(kernel.dtype)
        new_layers[group][name] = {**layers[group][name], "kernel": merged}
    return {**params, "layers": new_layers}


def merge_into(params: dict, adapter: Adapter, config) -> dict:
    """Params with W + scale * A^T B folded into every targeted kernel (dense serving).

    config: our transformer's ModelConfig (params from transformer.init_params / load_hf_model),
    or `Target` rules for any other Flax params tree (see hyperlora_jax.lora.functional.merge).
    """
    if not isinstance(config, ModelConfig):
        from hyperlora_jax.lora.functional import merge

        return merge(params, adapter, config)
    return _apply_dense(params, adapter, config, 1.0)


def unmerge(params: dict, adapter: Adapter, config) -> dict:
    """Inverse of merge_into (exact up to float rounding of the kernel dtype)."""
    if not isinstance(config, ModelConfig):
        from hyperlora_jax.lora.functional import unmerge as unmerge_mapped

        return unmerge_mapped(params, adapter, config)
    return _apply_dense(params, adapter, config, -1.0)


def to_numpy(adapter: Adapter) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A and B as host numpy arrays."""
    return (
        {m: np.asarray(x) for m, x in adapter.a.items()},
        {m: np.asarray(x) for m, x in adapter.b.items()},
    )
