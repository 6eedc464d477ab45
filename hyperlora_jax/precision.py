"""Named precision policies: the dtype of matmul / attention inputs and of the stored params.

Every policy accumulates matmuls and attention in f32 (`preferred_element_type`) and runs
softmax and norms in f32; a policy only picks the input and storage dtypes.

  f32          exact: f32 inputs and params (parity tests against the official fixtures)
  bf16         bf16 matmul / attention inputs, f32 accumulation, params kept in f32
  bf16-params  the same compute with params stored in bf16 (half the weight memory; with
               iterative internalize, the least transient memory of all)
  bf16-prefill generation: bf16 inputs for the prompt (matrix-matrix products), f32 for every
               decode step (matrix-vector products, faster in f32 on CPU), params in f32

"auto" picks `DEFAULTS[path]`, the policy measured fastest for that path on this project's
2-core Zen 4 CPU (issue 22, benchmarks/vs_official.py): internalize bf16 (official hypernetwork,
1,024 tokens: 4.3 -> 2.3 s); training bf16 (the D2L step, official hypernetwork, 512 ctx + 128
QA: 6.27 s / 11.9 CPU-s per step in f32, 4.09 s / 7.55 CPU-s in bf16 at load 1.7, once `matmul`
gave bf16 a fast backward and the Perceiver projection lost its gradient scan; before, bf16 was
1.7x slower than f32); generation bf16-prefill: the prompt's matrix-matrix products are faster
with bf16 inputs, but a decode step (matrix-vector products) is not, so the new tokens run in f32
(2026-12-05, idle: a 4,115-token prompt + 32 tokens 11.5 s f32, 8.6 s bf16, 7.5 s bf16-prefill; a
40-token prompt + 64 tokens 2.87 / 2.94 / 2.89 s). The library functions stay exact (f32) unless
asked.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from hyperlora_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    compute: Any  # dtype of activations and matmul / attention inputs
    params: Any  # dtype the params are stored in
    decode: Any = None  # compute dtype of generation's decode steps (None: `compute`)

    @property
    def decode_dtype(self) -> Any:
        return self.compute if self.decode is None else self.decode

    def cast_params(self, tree: Any) -> Any:
        """Floating leaves of a params tree in `self.params` (a no-op when already so)."""

        def cast(x):
            if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != self.params:
                return x.astype(self.params)
            return x

        return jax.tree.map(cast, tree)


POLICIES = {
    "f32": Precision("f32", jnp.dtype(jnp.float32), jnp.dtype(jnp.float32)),
    "bf16": Precision("bf16", jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)),
    "bf16-params": Precision("bf16-params", jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16)),
    "bf16-prefill": Precision(
        "bf16-prefill", jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float32)
    ),
}

# The policy "auto" resolves to, per path (measured, see the module docstring).
DEFAULTS = {"internalize": "bf16", "generate": "bf16-prefill", "train": "bf16"}


def get_precision(policy: str | Precision | None, path: str = "generate") -> Precision:
    """The named policy; None = "f32" (exact), "auto" = DEFAULTS[path]."""
    if isinstance(policy, Precision):
        return policy
    if policy == "auto":
        if path not in DEFAULTS:
            raise ConfigError(f"unknown path {path!r}; expected one of {', '.join(DEFAULTS)}")
        policy = DEFAULTS[path]
    policy = "f32" if policy is None else policy
    if policy not in POLICIES:
        raise ConfigError(f"precision {policy!r}; use one of {', '.join(POLICIES)} or auto")
    return POLICIES[policy]


def matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x [..., K] @ w [K, N] with inputs in `dtype`, f32 accumulation, an f32 result.

    f32 is a plain matmul. bf16 gets a custom backward, because JAX's own one is slow on CPU:
    the cotangent of the f32 result is f32, and a mixed f32 x bf16 dot runs at the f32 rate;
    and the weight gradient contracts the leading (token) axis of x, a bf16 layout XLA:CPU's
    fast dot kernel (YNNPACK) does not take, so it falls back to f32 at ~1/4 the bf16 rate
    (measured on this project's Zen 4 CPU, issue 22). Gradients come back in the inputs' dtypes.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return _low_matmul(x, w, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_matmul(x, w, dtype):
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _low_matmul_fwd(x, w, dtype):
    # symbolic_zeros: x / w arrive as CustomVJPPrimal (value, perturbed); a frozen weight (the
    # base model's) gets no weight-gradient dot, so jaxpr FLOP counts stay the real work.
    xl, wl = x.value.astype(dtype), w.value.astype(dtype)
    y = jnp.matmul(xl, wl, preferred_element_type=jnp.float32)
    dts = (jnp.zeros((0,), x.value.dtype), jnp.zeros((0,), w.value.dtype))
    return y, (xl, wl, *dts, x.perturbed, w.perturbed)


def _low_matmul_bwd(dtype, res, g):
    xl, wl, x_dt, w_dt, need_dx, need_dw = res
    g = g.astype(dtype)
    dx = dw = None
    if need_dx:
        dx = jnp.einsum("...n,kn->...k", g, wl, preferred_element_type=jnp.float32)
        dx = dx.astype(x_dt.dtype)
    if need_dw:
        # Tokens as a second contracted axis (a unit one): XLA then transposes x into
        # [K, tokens] before the dot, the layout the fast kernel takes, instead of running it
        # in f32.
        x3, g3 = xl.reshape(1, -1, xl.shape[-1]), g.reshape(1, -1, g.shape[-1])
        dw = jnp.einsum("bmk,bmn->kn", x3, g3, preferred_element_type=jnp.float32)
        dw = dw.astype(w_dt.dtype)
    return dx, dw


_low_matmul.defvjp(_low_matmul_fwd, _low_matmul_bwd, symbolic_zeros=True)
