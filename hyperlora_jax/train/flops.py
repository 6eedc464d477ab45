"""Matmul FLOPs of a function, counted from its jaxpr.

XLA's `cost_analysis()` counts the body of a loop once, so for our scanned layers (and scanned
gradient-accumulation micro-batches) it under-reports a step by about the layer count. Here every
`dot_general` is counted as 2 x (output elements) x (contracted size), scan bodies times their
length, `cond` by its most expensive branch. Matmuls are nearly all of a transformer's FLOPs;
element-wise work is left out. Counts are what runs, so recomputation under remat is included.
A `while_loop` body (unknown trip count) is counted once.
"""

from __future__ import annotations

import math

import jax


def count_flops(fn, *args, **kwargs) -> float:
    """Matmul FLOPs of one call of fn(*args, **kwargs); args may be ShapeDtypeStructs."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            mult = eqn.params["length"] if name == "scan" else 1
            total += mult * sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
    return total


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
