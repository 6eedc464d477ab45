"""Optimizer of the hypernetwork: AdamW with the official weight-decay exclusions, warmup +
cosine/linear schedules (the HF Trainer's formulas), global-norm gradient clipping."""

from __future__ import annotations

import re
from collections.abc import Sequence

import optax
from flax import traverse_util
from flax.core import meta

from hyperlora_jax.errors import ConfigError

# D2L (`get_decay_parameter_names`, trainer.py): no decay for names containing these (lower-cased),
# nor for LayerNorm / Embedding parameters. In Flax those are modules named *norm* / *embed*
# (LayerNorm_0, input_latents_layernorm, ...), whose leaves are `scale`/`bias`/`embedding`.
D2L_NO_DECAY = ("scaler", "bias", "layernorm", "rmsnorm", "norm", "latents_q", "embed", r"(^|/)ln")
# T2L (`train_custom_sft.py`): torch AdamW over all hypernetwork parameters, no exclusions.
T2L_NO_DECAY: tuple[str, ...] = ()


def decay_mask(params, no_decay: Sequence[str]) -> dict:
    """Pytree of bools: True where weight decay applies (path matches none of `no_decay`)."""
    pats = [re.compile(p) for p in no_decay]
    flat = traverse_util.flatten_dict(meta.unbox(params), sep="/")
    mask = {k: not any(p.search(k.lower()) for p in pats) for k in flat}
    return traverse_util.unflatten_dict(mask, sep="/")


def make_schedule(
    name: str, lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0
) -> optax.Schedule:
    """lr(step) for step = number of updates already applied (the first update uses lr(0)).

    linear: 0 -> lr over warmup, then linear to 0 at total_steps (HF `linear`).
    cosine: 0 -> lr over warmup, then cosine to min_lr at total_steps (HF `cosine_with_min_lr`).
    constant: warmup then constant.
    """
    warmup_steps = int(warmup_steps)
    total_steps = max(int(total_steps), warmup_steps + 1)
    if name == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, max(warmup_steps, 1)),
                optax.linear_schedule(lr, 0.0, total_steps - warmup_steps),
            ],
            [warmup_steps],
        )
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps, total_steps, end_value=min_lr
        )
    if name == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
            [warmup_steps],
        )
    raise ConfigError(f"unknown lr schedule {name!r}; use 'linear', 'cosine' or 'constant'")


def make_optimizer(
    params,
    *,
    lr: float,
    total_steps: int,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    min_lr: float = 0.0,
    weight_decay: float = 0.01,
    no_decay: Sequence[str] = D2L_NO_DECAY,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip (global norm) -> AdamW (torch defaults) with decay masked by parameter name."""
    sched = make_schedule(schedule, lr, total_steps, warmup_steps, min_lr)
    mask = decay_mask(params, no_decay)
    parts = []
    if max_grad_norm:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask))
    return optax.chain(*parts), sched
