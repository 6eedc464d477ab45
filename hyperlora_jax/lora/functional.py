"""LoRA for any Flax Linen model, without touching its code: `apply` (deltas added to the mapped
modules' outputs at run time), `merge` / `unmerge` (deltas folded into the weights, for serving).

    from hyperlora_jax import lora
    logits = lora.apply(model.apply, {"params": params}, adapter, lora.presets.gemma(), tokens)

How: the adapter's per-layer factors are placed in the params tree beside each mapped module's
kernel (under the name `hyperlora`), so they travel wherever that module's params go: sliced by
nn.scan / lax.scan over layers, through nn.remat / nn.jit. A `flax.linen.intercept_methods`
interceptor then adds `scale * (x A^T) B` (`hyperlora_jax.models.layers.lora_delta`, f32
accumulation) to the output of every module that holds factors. The model never sees W + dW.

This module is itself callable: `hyperlora_jax.lora.apply(...)` is `apply(...)` below, and
`lora.merge` / `lora.unmerge` are its dense-serving counterparts.

Adapter batch: factors [L, R, d] apply to every example; [B, L, R, d] give example b (the
leading axis of the module's input) its own adapter, in one call. Under `jax.vmap` over adapters
(and inputs), each example's call sees an unbatched adapter. Everything is a pure function of
(variables, adapter, inputs): jit, grad (w.r.t. the adapter, the params, or both) and vmap work.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hyperlora_jax.errors import InputError
from hyperlora_jax.lora.adapter import Adapter, to_dense_delta, validate
from hyperlora_jax.lora.targets import Site, Target, add_to_kernel, get_node, parse_index, resolve
from hyperlora_jax.models.layers import lora_delta

# Name of the injected variable in each mapped module's params scope.
KEY = "hyperlora"


# --------------------------------------------------------------------------- loading


def load(path: str | os.PathLike, *, layout=None, dtype=jnp.float32) -> Adapter:
    """An adapter folder: ours (save_adapter) or a PEFT LoRA folder (layout: a PEFT key layout,
    see hyperlora_jax.lora.peft; None = the standard HF one)."""
    from hyperlora_jax.lora.peft import CONFIG, import_peft
    from hyperlora_jax.lora.storage import load_adapter

    p = Path(path)
    if (p / CONFIG).is_file():
        return import_peft(p, layout=layout, dtype=dtype)
    return load_adapter(p)


# --------------------------------------------------------------------------- helpers


def _split_variables(variables: Mapping) -> tuple[Mapping, Callable[[Mapping], Mapping]]:
    """(the params tree, a function putting a new params tree back): variables may be Flax's
    {"params": ..., other collections} or a bare params tree (our transformer's)."""
    if not isinstance(variables, Mapping):
        raise InputError(
            f"variables must be a params tree (a mapping), got {type(variables).__name__}"
        )
    if "params" in variables and isinstance(variables["params"], Mapping):
        return variables["params"], lambda p: {**variables, "params": p}
    return variables, lambda p: p


def _set_leaf(tree: Mapping, path: Sequence[str], name: str, value: Any) -> dict:
    """A copy of `tree` (dicts copied along `path` only) with tree[path...][name] = value."""
    out = dict(tree)
    if not path:
        out[name] = value
        return out
    out[path[0]] = _set_leaf(tree[path[0]], path[1:], name, value)
    return out


def _tag(site: Site) -> str:
    """Key of one site's factors inside the injected dict: the module name plus a hash of the
    rule, so a trace cached by nn.jit can only be reused for the same rule."""
    h = hashlib.sha1(repr(site.target).encode()).hexdigest()[:8]
    return f"{site.module}.{h}"


def _check_adapter(adapter) -> Adapter:
    if isinstance(adapter, str | os.PathLike):
        adapter = load(adapter)
    adapter = validate(adapter)
    if len(adapter.batch_shape) > 1:
        raise InputError(
            f"adapter batch shape {adapter.batch_shape}: give one adapter [L, R, d] or one per "
            "example [B, L, R, d] (concat_batch folds more axes into the rank)"
        )
    return adapter


def _dims(adapter: Adapter) -> dict[str, tuple[int, int]]:
    return {m: (adapter.a[m].shape[-1], adapter.b[m].shape[-1]) for m in adapter.a}


def _feature_axes(shape: tuple[int, ...], d_in: int) -> int:
    """The fewest trailing axes of `shape` whose sizes multiply to d_in (0 if none do)."""
    size = 1
    for k in range(1, len(shape) + 1):
        size *= shape[-k]
        if size == d_in:
            return k
        if size > d_in:
            break
    return 0


def _input(args: tuple, kwargs: dict, target: Target, where: str):
    sel = target.input
    if isinstance(sel, int) and sel < len(args):
        return args[sel]
    if isinstance(sel, str) and sel in kwargs:
        return kwargs[sel]
    if isinstance(sel, int) and len(kwargs) == 1 and not args:
        return next(iter(kwargs.values()))
    raise InputError(
        f"{where}: cannot find the projection's input (Target.input={sel!r}) among "
        f"{len(args)} positional and keyword arguments {sorted(kwargs)}; set Target.input"
    )


def _add_delta(y, x, a, b, scale, target: Target, where: str):
    """y (+)= scale * (x A^T) B on the target's part of y. x: [*lead, *features_in],
    y[out]: [*lead, *features_out]; a/b: [R, d] or [B, R, d] (B = lead[0])."""
    d_in, d_out = a.shape[-1], b.shape[-1]
    k = _feature_axes(tuple(x.shape), d_in)
    if k == 0:
        raise InputError(
            f"{where}: input shape {tuple(x.shape)} has no trailing axes of total size "
            f"d_in={d_in} ({target.module}); is Target.input right?"
        )
    lead = tuple(x.shape[: x.ndim - k])
    if a.ndim == 3:
        n = a.shape[0]
        if not lead or lead[0] != n:
            raise InputError(
                f"{where}: {n} per-example adapters but the input's leading axis is "
                f"{lead[:1] or 'missing'} (input shape {tuple(x.shape)})"
            )
        x3 = x.reshape(n, -1, d_in)
    else:
        x3 = x.reshape(1, -1, d_in)
    delta = lora_delta(x3, a, b, scale).reshape(*lead, d_out)
    idx = parse_index(target.out) if target.out else None
    part = y[idx] if idx is not None else y
    if part.size != delta.size or tuple(part.shape[: len(lead)]) != lead:
        raise InputError(
            f"{where}: {target.module}'s output part {tuple(part.shape)} (out={target.out!r}) "
            f"does not hold [*{list(lead)}, {d_out}] features; fix Target.out"
        )
    delta = delta.reshape(part.shape).astype(y.dtype)
    return y + delta if idx is None else y.at[idx].add(delta)


def _interceptor(table: dict[str, list[tuple[str, Target]]]):
    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if mod.scope is None:
            return next_fun(*args, **kwargs)
        path = "/".join(mod.path)
        entries = [
            (tag, t)
            for tag, t in table.get(path, ())
            if t.method == context.method_name
            and all(getattr(mod, k, _MISSING) == v for k, v in t.when)
        ]
        if not entries:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        factors = mod.scope.get_variable("params", KEY) or {}
        for tag, t in entries:
            if tag not in factors:
                continue
            f = factors[tag]
            x = _input(args, kwargs, t, path)
            y = _add_delta(y, x, f["a"], f["b"], f["scale"], t, path)
        return y

    return intercept


_MISSING = object()


# --------------------------------------------------------------------------- apply


def inject(variables: Mapping, adapter: Adapter, targets: Sequence[Target]):
    """(variables with the adapter's factors beside each mapped kernel, interceptor table).

    The lower-level half of `apply`, for callers that run the model themselves under
    `flax.linen.intercept_methods(interceptor(table))`.
    """
    adapter = _check_adapter(adapter)
    params, put_back = _split_variables(variables)
    sites = resolve(params, targets, _dims(adapter), adapter.num_layers)
    per_path: dict[tuple[str, ...], dict] = {}
    table: dict[str, list[tuple[str, Target]]] = {}
    scale = jnp.asarray(adapter.scale, jnp.float32)
    for s in sites:
        a, b = adapter.a[s.module], adapter.b[s.module]
        if s.layer is None:  # scanned: layer axis first, sliced by the scan with the kernel
            a, b = jnp.moveaxis(a, -3, 0), jnp.moveaxis(b, -3, 0)
            sc = jnp.broadcast_to(scale, (adapter.num_layers,))
        else:
            a, b, sc = a[..., s.layer, :, :], b[..., s.layer, :, :], scale
        tag = _tag(s)
        per_path.setdefault(s.path, {})[tag] = {"a": a, "b": b, "scale": sc}
        entry = (tag, s.target)
        if entry not in table.setdefault(s.path_str, []):
            table[s.path_str].append(entry)
    for path, factors in per_path.items():
        if KEY in get_node(params, path):
            raise InputError(f"{'/'.join(path)} already holds {KEY!r}: apply one adapter per call")
        params = _set_leaf(params, path, KEY, factors)
    return put_back(params), table


def interceptor(table):
    """The `flax.linen.intercept_methods` interceptor for a table from `inject`."""
    return _interceptor(table)


def apply(
    fn: Callable | nn.Module,
    variables: Mapping,
    adapter: Adapter | str | os.PathLike,
    targets: Sequence[Target],
    *args,
    **kwargs,
):
    """fn(variables, *args, **kwargs) with the adapter's LoRA on the modules `targets` map.

    fn: a Linen model's `apply` (or the module itself, or any function whose first argument is
    the variables, e.g. `hyperlora_jax.models.transformer.forward`). variables: {"params": ...}
    or a bare params tree. adapter: an `Adapter` with a[m] [L, R, d_in] (shared by the batch) or
    [B, L, R, d_in] (example b of the input's leading axis gets adapter b), or a folder (ours or
    PEFT; under jit load it once with `load` instead). targets: `Target` rules (`presets`).
    Returns whatever fn returns. Pure: jit / grad / vmap through it.
    """
    if isinstance(fn, nn.Module):
        fn = fn.apply
    new_vars, table = inject(variables, adapter, targets)
    with nn.intercept_methods(_interceptor(table)):
        return fn(new_vars, *args, **kwargs)


# --------------------------------------------------------------------------- merge


def _merge(variables: Mapping, adapter: Adapter, targets: Sequence[Target], sign: float):
    adapter = _check_adapter(adapter)
    if adapter.batch_shape:
        raise InputError(
            f"merge takes one adapter, got batch shape {adapter.batch_shape}; merging one per "
            "example would copy the weights per example: use apply, or unstack() and merge one"
        )
    params, put_back = _split_variables(variables)
    sites = resolve(params, targets, _dims(adapter), adapter.num_layers)
    deltas = to_dense_delta(adapter)  # [L, d_in, d_out] f32, scale included
    for s in sites:  # sequential: fused targets update one kernel in turn
        node = get_node(params, s.path)
        kernel, d = node[s.target.kernel], sign * deltas[s.module]
        if s.layer is None:
            new = jax.vmap(lambda k, dd, t=s.target: add_to_kernel(k, dd, t))(kernel, d)
        else:
            new = add_to_kernel(kernel, d[s.layer], s.target)
        params = _set_leaf(params, s.path, s.target.kernel, new)
    return put_back(params)


def merge(variables: Mapping, adapter: Adapter, targets: Sequence[Target]):
    """Variables with W + scale * A^T B folded into every mapped kernel (dense serving).

    Same structure as `variables`; kernels keep their dtype (the sum is taken in f32). One
    adapter only ([L, R, d]); fused kernels get each target's part.
    """
    return _merge(variables, adapter, targets, 1.0)


def unmerge(variables: Mapping, adapter: Adapter, targets: Sequence[Target]):
    """The inverse of `merge` (exact up to the rounding of the kernels' dtype)."""
    return _merge(variables, adapter, targets, -1.0)
