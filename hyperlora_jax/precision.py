"""Named precision policies: the dtype of matmul / attention inputs and of the stored params.

Every policy accumulates matmuls and attention in f32 (`preferred_element_type`) and runs
softmax and norms in f32; a policy only picks the input and storage dtypes.

  f32          exact: f32 inputs and params (parity tests against the official fixtures)
  bf16         bf16 matmul / attention inputs, f32 accumulation, params kept in f32
  bf16-params  the same compute with params stored in bf16 (half the weight memory)

"auto" picks `DEFAULTS[path]`, the policy measured fastest for that path on this project's
2-core Zen 4 CPU (issue 22, benchmarks/vs_official.py): internalize bf16 (official hypernetwork,
1,024 tokens: 4.3 -> 2.3 s); training f32 (the bf16 step was 1.7x slower: its backward matmuls do
not reach the bf16 rate); generation f32 (the bf16 prefill is ~1.8x faster but each decode step,
a matrix-vector product, is ~1.6x slower, and end to end the 4K-token in-prompt query was slower).
The library functions stay exact (f32) unless asked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from hyperlora_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    compute: Any  # dtype of activations and matmul / attention inputs
    params: Any  # dtype the params are stored in

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
}

# The policy "auto" resolves to, per path (measured, see the module docstring).
DEFAULTS = {"internalize": "bf16", "generate": "f32", "train": "f32"}


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
