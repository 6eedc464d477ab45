"""Matmul FLOPs of a function, counted from its jaxpr.

XLA's `cost_analysis()` counts the body of a loop once, so for our scanned layers (and scanned
gradient-accumulation micro-batches) it under-reports a step by about the layer count. Here every
`dot_general` is counted as 2 x (output elements) x (contracted size), scan bodies times their
length, `cond` by its most expensive branch. Matmuls are nearly all of a transformer's FLOPs;
element-wise work is left out. Counts are what runs, so recomputation under remat is included.
A `while_loop` body (unknown trip count) is counted once.
`count_flops_by_scope` splits the same count by name stack (Flax module paths, jax.named_scope;
backward matmuls carry `transpose(...)`), to see where a step's FLOPs go.
"""

from __future__ import annotations

import collections
import math

import jax


def count_flops(fn, *args, **kwargs) -> float:
    """Matmul FLOPs of one call of fn(*args, **kwargs); args may be ShapeDtypeStructs."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def count_flops_by_scope(fn, *args, **kwargs) -> dict[str, float]:
    """count_flops split by the name stack of each matmul ("outer/inner/..."); sums to it."""
    return _scoped_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr, "")


def jaxpr_flops(jaxpr) -> float:
    return sum(_scoped_flops(jaxpr, "").values())


def _scoped_flops(jaxpr, prefix: str) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        scope = "/".join(x for x in (prefix, str(eqn.source_info.name_stack)) if x)
        if name == "dot_general":
            out[scope] += _dot_flops(eqn)
            continue
        if name == "cond":  # the most expensive branch
            parts = [_scoped_flops(b.jaxpr, scope) for b in eqn.params["branches"]]
            parts = [max(parts, key=lambda d: sum(d.values()))]
        else:
            parts = [_scoped_flops(j, scope) for j in _sub_jaxprs(eqn.params)]
        mult = eqn.params["length"] if name == "scan" else 1
        for part in parts:
            for k, v in part.items():
                out[k] += mult * v
    return dict(out)


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _sub_jaxprs(params: dict):
    for v in params.values():
        for x in v if isinstance(v, tuple | list) else (v,):
            if hasattr(x, "eqns"):  # Jaxpr
                yield x
            elif hasattr(getattr(x, "jaxpr", None), "eqns"):  # ClosedJaxpr
                yield x.jaxpr
