"""Where an adapter's modules live in a Flax model we did not write: `Target` rules and presets.

An `Adapter` is keyed by HF module names (q_proj ... down_proj) and stacks its factors by layer
[*batch, L, R, d]. A `Target` maps one of those names onto another model's params/modules:

* `path`: a regular expression that must fully match the "/"-joined Flax module path
  ("layer_3/attn/q_einsum"); the same string is the path of the module's params subtree.
* `layer`: the name of the regex group holding the layer index, or None when the layers are
  scanned (nn.scan / lax.scan over stacked params: the layer is the leading axis of the params).
* `input`: which call argument is the projection's input (gemma's Einsum is called (eqn, x)).
* fused projections: `out` indexes this module's part of the output (numpy syntax, e.g.
  "...,0:256" for the q part of a fused qkv Dense, "0" for k of a stacked 'CBTKH' einsum) and
  `kernel_index` the same part of the kernel; `kernel_layout` is an einops pattern from that
  (sub-)kernel to the [d_in, d_out] matrix of the delta ("n i h -> i (n h)" for an einsum
  kernel [heads, embed, head_dim]). Only merging into weights reads `kernel_layout`; applying
  flattens the input's and the output's trailing feature axes in row-major order, so the layout
  must flatten them in that same order.
* `when`: module attributes that must hold (modules sharing one scope, as gemma's MLP einsums).

`resolve` turns rules + a params tree into `Site`s (one per matched module), checking that every
(module, layer) of the adapter is covered exactly once and that the kernel shapes fit.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import einops
import jax

from hyperlora_jax.errors import InputError
from hyperlora_jax.models.config import ATTN_MODULES, TARGET_MODULES


@dataclasses.dataclass(frozen=True)
class Target:
    """One rule: our module `module` is the Flax module whose path fully matches `path`."""

    module: str
    path: str
    layer: str | None = "layer"
    kernel: str = "kernel"
    kernel_layout: str = "i o -> i o"
    out: str | None = None
    kernel_index: str | None = None
    input: int | str = 0
    when: tuple[tuple[str, Any], ...] = ()
    method: str = "__call__"

    def __post_init__(self):
        if self.module not in TARGET_MODULES:
            raise InputError(
                f"Target module {self.module!r} is not one of {', '.join(TARGET_MODULES)}"
            )
        try:
            rx = re.compile(self.path)
        except re.error as e:
            raise InputError(
                f"Target {self.module}: path {self.path!r} is not a regex ({e})"
            ) from e
        if self.layer is not None and self.layer not in rx.groupindex:
            raise InputError(
                f"Target {self.module}: path {self.path!r} has no group (?P<{self.layer}>...) for "
                "the layer index; add one, or pass layer=None for scanned (stacked) layers"
            )
        lhs, rhs = _layout_sides(self.kernel_layout)
        if "(" in lhs or sorted(rhs.replace("(", " ").replace(")", " ").split()) != sorted(
            lhs.split()
        ):
            raise InputError(
                f"Target {self.module}: kernel_layout {self.kernel_layout!r} must name the "
                "kernel's axes on the left and group all of them into 'i o' on the right, "
                "e.g. 'n i h -> i (n h)'"
            )
        for spec in (self.out, self.kernel_index):
            if spec is not None:
                parse_index(spec)

    @property
    def regex(self) -> re.Pattern:
        return re.compile(self.path)

    def replace(self, **changes) -> Target:
        return dataclasses.replace(self, **changes)


def fused(module: str, path: str, start: int, stop: int, **kw) -> Target:
    """A Target for features [start, stop) of a fused Dense (kernel [d_in, d_out_total]):
    the output's and the kernel's last axis are sliced alike."""
    part = f"...,{int(start)}:{int(stop)}"
    return Target(module, path, out=part, kernel_index=part, **kw)


@dataclasses.dataclass(frozen=True)
class Site:
    """A resolved Target: the params path it matched and its layer (None: scanned, all)."""

    target: Target
    path: tuple[str, ...]
    layer: int | None

    @property
    def module(self) -> str:
        return self.target.module

    @property
    def path_str(self) -> str:
        return "/".join(self.path)


# --------------------------------------------------------------------------- index / layout


def parse_index(spec: str) -> tuple:
    """numpy-style index text -> tuple: "...,0:32" -> (Ellipsis, slice(0, 32)); "1" -> (1,)."""
    out: list[Any] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if part == "...":
                out.append(Ellipsis)
            elif ":" in part:
                bits = [p.strip() for p in part.split(":")]
                if len(bits) > 3:
                    raise ValueError(part)
                out.append(slice(*(int(b) if b else None for b in bits)))
            else:
                out.append(int(part))
        except ValueError as e:
            raise InputError(
                f"index {spec!r}: cannot read {part!r}; write numpy indices such as "
                "'...,0:64' or '1' or '...,0,:'"
            ) from e
    return tuple(out)


def _layout_sides(layout: str) -> tuple[str, str]:
    if "->" not in layout:
        raise InputError(f"kernel_layout {layout!r} needs '->' (e.g. 'n i h -> i (n h)')")
    lhs, rhs = (s.strip() for s in layout.split("->"))
    return lhs, rhs


def kernel_to_matrix(kernel: jax.Array, target: Target) -> jax.Array:
    """One layer's kernel -> this target's [d_in, d_out] weight matrix (in its dtype)."""
    sub = kernel[parse_index(target.kernel_index)] if target.kernel_index else kernel
    return einops.rearrange(sub, target.kernel_layout)


def add_to_kernel(kernel: jax.Array, delta: jax.Array, target: Target) -> jax.Array:
    """One layer's kernel with delta [d_in, d_out] added to this target's part (f32 sum, cast
    back to the kernel's dtype)."""
    idx = parse_index(target.kernel_index) if target.kernel_index else None
    sub = kernel[idx] if idx is not None else kernel
    lhs, rhs = _layout_sides(target.kernel_layout)
    sizes = einops.parse_shape(sub, lhs)
    w = einops.rearrange(sub, target.kernel_layout).astype(jax.numpy.float32) + delta
    new_sub = einops.rearrange(w, f"{rhs} -> {lhs}", **sizes).astype(kernel.dtype)
    return new_sub if idx is None else kernel.at[idx].set(new_sub)


# --------------------------------------------------------------------------- resolution


def module_nodes(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple, Mapping]]:
    """(path, subtree) of every nested mapping of a params tree, root included."""
    yield prefix, tree
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from module_nodes(v, (*prefix, str(k)))


def get_node(tree: Mapping, path: Sequence[str]) -> Mapping:
    node = tree
    for p in path:
        node = node[p]
    return node


def _kernel_shape_ok(kernel, target: Target, scanned: bool, dims: tuple[int, int]) -> str | None:
    """None if the kernel's target part rearranges to `dims`, else a description of the shape."""
    shape = tuple(kernel.shape[1:] if scanned else kernel.shape)
    try:
        got = jax.eval_shape(
            lambda k: kernel_to_matrix(k, target), jax.ShapeDtypeStruct(shape, kernel.dtype)
        ).shape
    except Exception as e:  # einops / indexing errors: the layout does not fit the kernel
        return (
            f"kernel {shape} does not fit kernel_index={target.kernel_index!r} and "
            f"kernel_layout={target.kernel_layout!r} ({type(e).__name__}: {e})"
        )
    if tuple(got) != tuple(dims):
        return (
            f"kernel {shape} gives a [d_in, d_out] = {list(got)} matrix under "
            f"kernel_index={target.kernel_index!r}, kernel_layout={target.kernel_layout!r}; "
            f"the adapter's is {list(dims)}"
        )
    return None


def resolve(
    params: Mapping,
    targets: Sequence[Target],
    dims: Mapping[str, tuple[int, int]],
    num_layers: int,
) -> list[Site]:
    """Match `targets` against a params tree for an adapter with modules `dims` {m: (d_in, d_out)}
    and `num_layers` layers. Every (module, layer) must be covered by exactly one site and every
    matched kernel must fit; otherwise an InputError names the module, the path and the fix."""
    targets = list(targets)
    nodes = list(module_nodes(params))
    sites: list[Site] = []
    for m in sorted(dims):
        rules = [t for t in targets if t.module == m]
        if not rules:
            raise InputError(
                f"the adapter targets {m} but the mapping has no Target for it; add one "
                f"(mapping covers {sorted({t.module for t in targets})})"
            )
        found: list[Site] = []
        for t in rules:
            rx = t.regex
            for path, node in nodes:
                mt = rx.fullmatch("/".join(path))
                if mt is None or t.kernel not in node or isinstance(node[t.kernel], Mapping):
                    continue
                kernel = node[t.kernel]
                layer = None if t.layer is None else int(mt.group(t.layer))
                if t.layer is None and (kernel.ndim < 1 or kernel.shape[0] != num_layers):
                    raise InputError(
                        f"{m}: {'/'.join(path)}/{t.kernel} has shape {tuple(kernel.shape)}; a "
                        f"scanned target (layer=None) needs the layer axis first, of size "
                        f"{num_layers} (the adapter's layer count)"
                    )
                bad = _kernel_shape_ok(kernel, t, t.layer is None, dims[m])
                if bad:
                    raise InputError(f"{m} at {'/'.join(path)}: {bad}")
                found.append(Site(t, path, layer))
        if not found:
            sample = ", ".join("/".join(p) for p, _ in nodes[1:7])
            raise InputError(
                f"{m}: no module path matches {[t.path for t in rules]} with a "
                f"{'/'.join(sorted({t.kernel for t in rules}))!r} param; module paths in these "
                f"params look like: {sample}"
            )
        scanned = [s for s in found if s.layer is None]
        if scanned and len(found) > 1:
            raise InputError(
                f"{m}: matched {[s.path_str for s in found]}; a scanned (layer=None) target "
                "must be the only match"
            )
        if not scanned:
            layers = sorted(s.layer for s in found)
            dup = sorted({x for x in layers if layers.count(x) > 1})
            if dup:
                where = [s.path_str for s in found if s.layer in dup]
                raise InputError(f"{m}: layer(s) {dup} matched more than once: {where}")
            extra = [x for x in layers if x >= num_layers]
            if extra:
                raise InputError(
                    f"{m}: the model has layer(s) {extra} but the adapter has {num_layers} "
                    f"layers (0-{num_layers - 1}); it was made for a different model"
                )
            missing = sorted(set(range(num_layers)) - set(layers))
            if missing:
                raise InputError(
                    f"{m}: the adapter has {num_layers} layers but no module matched layer(s) "
                    f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; check the path regex"
                )
        sites += found
    return sites


# --------------------------------------------------------------------------- presets


def hyperlora(modules: Sequence[str] = TARGET_MODULES) -> tuple[Target, ...]:
    """Our decoder (hyperlora_jax.models.transformer): Proj kernels [L, d_in, d_out] under the
    scanned `layers/{attn|mlp}/{module}`."""
    return tuple(
        Target(m, f"layers/{'attn' if m in ATTN_MODULES else 'mlp'}/{m}", layer=None)
        for m in modules
    )


def gemma(*, transpose_gating_einsum: bool = True) -> tuple[Target, ...]:
    """google-deepmind/gemma's Linen `Transformer` (gm.nn.Gemma2_*, Gemma3_*): blocks
    `layer_{i}`, `gemma.gm.nn._layers.Einsum` modules called (eqn, x) with param `w`:
    attn/q_einsum [N, D, H] ('BTD,NDH->BTNH'), attn/kv_einsum [2, K, D, H] ('BSD,CKDH->CBSKH'),
    attn/qkv_einsum [3, N, D, H] when num_heads == num_kv_heads, attn/attn_vec_einsum [N, H, D],
    and the MLP's two einsums sharing the `mlp` scope: gating_einsum [2, F, D] with
    transpose_gating_einsum (Gemma 2 and 3 checkpoints; else [2, D, F]) and linear [F, D].

    Written from that library's module layout; tests/test_lora_apply.py checks it on a model
    built with the same layout (not on the library itself, which is not a dependency).
    """
    blk = r"layer_(?P<layer>\d+)"
    e = dict(kernel="w", input=1)
    out = [
        Target("q_proj", rf"{blk}/attn/q_einsum", kernel_layout="n i h -> i (n h)", **e),
        Target("o_proj", rf"{blk}/attn/attn_vec_einsum", kernel_layout="n h o -> (n h) o", **e),
    ]
    for j, m in enumerate(("k_proj", "v_proj")):
        out.append(
            Target(m, rf"{blk}/attn/kv_einsum", out=str(j), kernel_index=str(j),
                   kernel_layout="k i h -> i (k h)", **e)
        )  # fmt: skip
    for j, m in enumerate(("q_proj", "k_proj", "v_proj")):
        out.append(
            Target(m, rf"{blk}/attn/qkv_einsum", out=str(j), kernel_index=str(j),
                   kernel_layout="n i h -> i (n h)", **e)
        )  # fmt: skip
    gate_layout = "o i -> i o" if transpose_gating_einsum else "i o -> i o"
    for j, m in enumerate(("gate_proj", "up_proj")):
        out.append(
            Target(m, rf"{blk}/mlp", kernel="gating_einsum", input=1, out=f"...,{j},:",
                   kernel_index=str(j), kernel_layout=gate_layout,
                   when=(("weight_name", "gating_einsum"),))
        )  # fmt: skip
    out.append(
        Target("down_proj", rf"{blk}/mlp", kernel="linear", input=1,
               when=(("weight_name", "linear"),))
    )  # fmt: skip
    return tuple(out)


PRESETS = {"hyperlora": hyperlora, "gemma": gemma}
