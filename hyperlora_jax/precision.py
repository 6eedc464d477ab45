"""Named precision policies: the dtype of matmul / attention inputs and of the stored params.

Every policy accumulates matmuls and attention in f32 (`preferred_element_type`) and runs
softmax and norms in f32; a policy only picks the input and storage dtypes.

  f32          exact: f32 inputs and params (parity tests against the official fixtures)
  bf16         bf16 matmul / attention inputs, f32 accumulation, params kept in f32
  bf16-params  the same compute with params stored in bf16 (half the weight memory)

"auto" picks `DEFAULTS[path]`, the policy measured fastest for that path on this project's
2-core Zen 4 CPU (issue 22, benchmarks/README.md: bf16-input matmuls with f32 accumulation run
~1.85x the f32 rate; a 4,120-token prefill 8.1 -> 4.4 CPU-s, the context encoder on 4 x 1,030
tokens 5.3 -> 2.7 CPU-s). The library functions stay exact (f32) unless asked.
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

# The policy "auto" resolves to, per path (measured, see the module docstring). Training stays
# f32 until its bf16 step is measured faster (benchmarks/vs_official.py).
DEFAULTS = {"internalize": "bf16", "generate": "bf16", "train": "f32"}


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
