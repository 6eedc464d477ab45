"""LoRA adapters: the `Adapter` pytree and its algebra, applying one to any Flax model, PEFT I/O.

    from hyperlora_jax import lora
    logits = lora.apply(model.apply, {"params": params}, adapter, lora.presets.gemma(), tokens)
    merged = lora.merge({"params": params}, adapter, lora.presets.gemma())

`lora.apply` and its companions live in hyperlora_jax/lora/functional.py.
Guide with runnable examples: docs/lora.md.
"""

from types import SimpleNamespace

from hyperlora_jax.lora.adapter import (
    Adapter,
    cast,
    concat,
    concat_batch,
    from_dense,
    merge_into,
    pad_rank,
    scale,
    stack,
    to_dense_delta,
    truncate,
    unmerge,
    unstack,
    weighted_sum,
    with_scale,
)
from hyperlora_jax.lora.functional import apply, inject, interceptor, load
from hyperlora_jax.lora.peft import PeftTarget, export_peft, fused_layout, hf_layout, import_peft
from hyperlora_jax.lora.storage import load_adapter, save_adapter
from hyperlora_jax.lora.targets import PRESETS, Site, Target, fused, resolve

presets = SimpleNamespace(**PRESETS)
# merge / unmerge take `Target` rules (any Flax tree) or our ModelConfig (our transformer).
merge = merge_into

__all__ = [
    "Adapter",
    "PeftTarget",
    "Site",
    "Target",
    "apply",
    "cast",
    "concat",
    "concat_batch",
    "export_peft",
    "from_dense",
    "fused",
    "fused_layout",
    "hf_layout",
    "import_peft",
    "inject",
    "interceptor",
    "load",
    "load_adapter",
    "merge",
    "merge_into",
    "pad_rank",
    "presets",
    "resolve",
    "save_adapter",
    "scale",
    "stack",
    "to_dense_delta",
    "truncate",
    "unmerge",
    "unstack",
    "weighted_sum",
    "with_scale",
]
