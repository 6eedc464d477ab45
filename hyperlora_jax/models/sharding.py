"""Device mesh (data, fsdp, tensor), logical-axis rules -> NamedShardings, multi-host helpers.

Parameters carry logical axis names (`nn.with_logical_partitioning` boxes, or a path-regex table
for plain trees such as loaded HF weights); a rules table maps logical names to mesh axes. A mesh
axis is dropped for a dimension it does not divide, and never used twice in one array, so any
rules table yields a valid sharding on any mesh.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from flax.core import meta
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hyperlora_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (in order of preference). Batch over data+fsdp (FSDP is data
# parallel for activations); weights' embed dim over fsdp; wide dims over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("q_heads", "tensor"),
    ("vocab", "tensor"),
    ("latent", None),
    ("rank", None),
    ("layers", None),
    ("head_dim", None),
    ("length", None),
    ("norm", None),
)

# Plain (unboxed) base-model trees: path regex -> logical axes, by parameter name. Leading
# stacked-layer axes (rank larger than the pattern's) get "layers".
DEFAULT_PATH_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens|embedding|wte", ("vocab", "embed")),
    (r"lm_head", ("embed", "vocab")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj).*(kernel|weight)$", ("embed", "mlp")),
    (r"(o_proj|down_proj).*(kernel|weight)$", ("mlp", "embed")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj).*bias$", ("mlp",)),
    (r"norm|scale$", ("norm",)),
)


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    axis_type: AxisType = AxisType.Auto,
) -> Mesh:
    """A (data, fsdp, tensor) mesh with explicit axis types; -1 in one axis means 'the rest'."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // max(rest, 1)
    if int(np.prod(shape)) != len(devices):
        raise ConfigError(
            f"mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]} needs {int(np.prod(shape))} "
            f"devices but {len(devices)} are visible; change the mesh sizes (or use -1 for one)"
        )
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU / odd topologies: plain reshape is fine
        arr = np.array(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(axis_type,) * 3)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=2,fsdp=4,tensor=1' -> {'data': 2, 'fsdp': 4, 'tensor': 1}."""
    out = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        k, _, v = part.partition("=")
        if k not in out or not v.lstrip("-").isdigit():
            raise ConfigError(f"bad mesh spec {spec!r}; expected e.g. data=2,fsdp=4,tensor=1")
        if int(v) < 1 and int(v) != -1:  # 0 or -2 would reach jax as a device-count traceback
            raise ConfigError(
                f"bad mesh spec {spec!r}: {k}={v}; each axis size must be >= 1 (or -1 for "
                "'the remaining devices'), e.g. data=2,fsdp=4,tensor=1"
            )
        out[k] = int(v)
    return out


def _rules_dict(rules) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, axes in rules:
        if axes is None:
            out[name] = ()
        elif isinstance(axes, str):
            out[name] = (axes,)
        else:
            out[name] = tuple(axes)
    return out


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES
) -> P:
    """One array's logical axes -> PartitionSpec, skipping mesh axes of size 1, axes that do not
    divide the dimension, and axes already used by an earlier dimension."""
    table = _rules_dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        chosen = []
        size = 1
        for ax in table.get(name, ()) if name else ():
            n = mesh.shape[ax]
            if ax in used or n == 1 or dim % (size * n):
                continue
            chosen.append(ax)
            size *= n
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _path_logical(path: str, ndim: int, path_rules) -> tuple[str | None, ...]:
    for pat, axes in path_rules:
        if re.search(pat, path.lower()):
            if len(axes) > ndim:
                axes = axes[len(axes) - ndim :]
            return ("layers",) * (ndim - len(axes)) + tuple(axes)
    return (None,) * ndim


def logical_axes(tree, path_rules=DEFAULT_PATH_RULES):
    """Logical axes of every leaf: from LogicallyPartitioned boxes, else from `path_rules`."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    boxed = jax.tree_util.tree_leaves(tree, is_leaf=is_box)
    if any(is_box(x) for x in boxed):
        return jax.tree_util.tree_map(
            lambda x: tuple(x.names) if is_box(x) else (None,) * np.ndim(x), tree, is_leaf=is_box
        )
    flat = traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, Mapping) else None
    if flat is None:
        return jax.tree_util.tree_map(lambda x: (None,) * np.ndim(x), tree)
    names = {k: _path_logical(k, len(np.shape(v)), path_rules) for k, v in flat.items()}
    return traverse_util.unflatten_dict(names, sep="/")


def tree_shardings(
    tree, mesh: Mesh, rules=DEFAULT_RULES, path_rules=DEFAULT_PATH_RULES, fsdp_fallback_min=2**18
):
    """NamedSharding for every leaf of a (possibly boxed or abstract) params tree.

    Leaves without logical names and with >= `fsdp_fallback_min` elements are FSDP-sharded on
    their largest dimension the fsdp axis divides (so unannotated big weights never replicate).
    """
    axes = logical_axes(tree, path_rules)
    plain = meta.unbox(tree)
    fsdp = mesh.shape["fsdp"]

    def one(x, names):
        shape = np.shape(x)
        spec = logical_to_spec(names, shape, mesh, rules)
        if not any(names) and fsdp > 1 and int(np.prod(shape, dtype=np.int64)) >= fsdp_fallback_min:
            dims = sorted(range(len(shape)), key=lambda d: -shape[d])
            for d in dims:
                if shape[d] % fsdp == 0:
                    parts = [None] * len(shape)
                    parts[d] = "fsdp"
                    spec = P(*parts)
                    break
        return NamedSharding(mesh, spec)

    return _map2(one, plain, axes)


def _map2(fn, tree, axes):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    ax_leaves = treedef.flatten_up_to(axes)
    return treedef.unflatten([fn(x, a) for x, a in zip(leaves, ax_leaves)])


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension over the batch mesh axes, the rest replicated."""
    axes = tuple(a for a in _rules_dict(rules).get("batch", ()) if mesh.shape[a] > 1)
    first = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_tree(tree, shardings):
    """device_put every leaf onto its sharding (host arrays or jax arrays)."""
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), meta.unbox(tree), shardings)


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES):
    """Host-local numpy batch (this process's rows) -> global jax arrays sharded over batch axes."""
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, rules), v)
    return out


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Call jax.distributed.initialize() once when running multi-process; no-op on one host.

    Explicit arguments win; otherwise a multi-host environment is detected from JAX's own
    variables (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), SLURM with more than
    one task, or a multi-worker TPU VM (TPU_WORKER_HOSTNAMES with a comma); initialize() then
    auto-detects the rest. Returns True if it initialized.
    """
    if coordinator_address is None:
        coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    multi = (
        coordinator_address is not None
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    )
    if not multi:
        return False
    if jax.distributed.is_initialized():
        return False
    kw = {}
    if coordinator_address is not None:
        kw = dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    jax.distributed.initialize(**kw)
    return True


def shardings_from_logical(logical_specs, tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings from a tree of logical PartitionSpecs (e.g. transformer.param_logical_axes)
    matching `tree` (arrays or ShapeDtypeStructs)."""
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    specs, treedef = jax.tree_util.tree_flatten(logical_specs, is_leaf=is_spec)
    leaves = treedef.flatten_up_to(meta.unbox(tree))
    out = [
        NamedSharding(mesh, logical_to_spec(tuple(s), np.shape(x), mesh, rules))
        for s, x in zip(specs, leaves)
    ]
    return treedef.unflatten(out)


# ----------------------------------------------------------------------------- inference
# Inference on a mesh (DocToLoRA, TextToLoRA, decoding, the selfgen teacher): the base weights are
# laid out by the same logical rules as in training, the hypernetwork's by tree_shardings, and the
# example rows (chunks, prompts, task embeddings) split over the batch axes (data, fsdp); each row
# keeps its own adapter. Rows are padded to a multiple of the batch axes' size by repeating the
# last one, and the padding is dropped from the results.
def mesh_from_spec(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`--mesh data=N,fsdp=N,tensor=N` (the training flag) -> a Mesh over `devices` (default: all
    of this process's devices); ConfigError naming the fix when the sizes do not fit them."""
    devices = list(devices if devices is not None else jax.local_devices())
    return make_mesh(**parse_mesh_spec(spec), devices=devices)


def batch_multiple(mesh: Mesh | None, rules=DEFAULT_RULES) -> int:
    """How many devices the batch (row) dimension is split over: rows come in multiples of it."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in _rules_dict(rules).get("batch", ())]))


def pad_rows(x, multiple: int):
    """Leading dimension padded up to a multiple of `multiple` by repeating the last row."""
    n = np.shape(x)[0]
    extra = -n % multiple
    if not extra:
        return x
    xp = jax.numpy if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)], axis=0)


def put_rows(x, mesh: Mesh, rules=DEFAULT_RULES):
    """Rows (already padded to batch_multiple) onto the mesh, split over the batch axes."""
    return jax.device_put(x, batch_sharding(mesh, np.ndim(x), rules))


@functools.lru_cache(maxsize=16)
def _logical_axes_of(config):
    from hyperlora_jax.models import transformer

    return transformer.param_logical_axes(config)


def shard_model_params(params, config, mesh: Mesh, rules=DEFAULT_RULES):
    """A base (or context) model's weights onto the mesh by transformer.param_logical_axes, the
    layout training gives them; a tree of another layout (e.g. a vision tower) by its path
    names (tree_shardings)."""
    try:
        shardings = shardings_from_logical(_logical_axes_of(config), params, mesh, rules)
    except (ValueError, TypeError, KeyError):  # not the transformer's tree
        shardings = tree_shardings(params, mesh, rules)
    return shard_tree(params, shardings)


def shard_params(params, mesh: Mesh, rules=DEFAULT_RULES):
    """A hypernetwork's (plain) params onto the mesh: named dims by the path rules, big
    unnamed ones over fsdp, the rest replicated."""
    return shard_tree(params, tree_shardings(params, mesh, rules))
