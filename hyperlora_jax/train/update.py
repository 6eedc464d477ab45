"""One optimizer step for any objective: gradients w.r.t. the hypernetwork params only, a
divergence guard (non-finite or oversized updates are skipped), optional gradient accumulation.
The frozen base params are an argument and never get a gradient.

A loss function (train/d2l_loss.py, train/t2l_loss.py) has the signature
    loss_fn(params, base_params, batch, rng, num_items) -> (loss, aux: dict of scalars)
where `num_items` is the count its sums are divided by (contexts for D2L, samples for T2L),
computed over the whole (accumulated) batch by `count_fn(batch)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

LossFn = Callable[..., tuple[jax.Array, dict]]


@struct.dataclass
class TrainState:
    """What a checkpoint restores: hypernet params, optimizer state, step, RNG, guard counters."""

    step: jax.Array  # int32, steps taken (including skipped ones)
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data [2]
    bad_in_a_row: jax.Array  # int32, consecutive skipped (non-finite or diverging) steps
    bad_total: jax.Array  # int32, steps skipped so far

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
        z = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 - distinct buffers (donation)
        rng = jax.random.key_data(jax.random.key(seed))
        return cls(z(), params, tx.init(params), rng, z(), z())


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    count_fn: Callable[[dict], jax.Array],
    *,
    grad_accum_steps: int = 1,
    schedule: optax.Schedule | None = None,
    inject_nan_at: int | None = None,
    micro_batch_axes=None,
    max_update_ratio: float = 0.0,
):
    """step(state, base_params, batch, lr_scale=1.0) -> (state, metrics).

    With grad_accum_steps = k the batch's leading axis is split into k micro-batches whose
    gradients are summed; every loss sum is divided by the count of the whole batch, so the
    result equals one big batch (the official per-context normalisation across accumulation).
    The divergence guard skips the update (params and optimizer state unchanged) and counts it
    when the loss or the gradient is non-finite, or when the update would move the parameters
    by more than `max_update_ratio` x their norm (global L2 norms; 0 = off; all-zero params are
    exempt). A healthy step moves them by a small fraction (Adam: about lr / rms(param)); a
    runaway learning rate or an exploding update moves them by orders of magnitude more, and
    rejecting it before it lands keeps the params at the last good values (nothing diverged
    can be saved). `inject_nan_at` (tests only) poisons the gradient at that step.
    micro_batch_axes: mesh axes of the batch (e.g. ("data", "fsdp")), to keep accumulation
    micro-batches sharded (run under jax.set_mesh).
    lr_scale (a traced scalar): multiplies the update, i.e. the learning rate, weight decay
    included; the trainer's wall-clock decay (`TrainOptions.lr_time_decay`) sets it per step, so
    one compiled program serves any run length.
    """

    def grads_of(params, base_params, batch, rng, num_items):
        return jax.value_and_grad(loss_fn, has_aux=True)(params, base_params, batch, rng, num_items)

    def step(state: TrainState, base_params, batch, lr_scale=1.0):
        rng = jax.random.wrap_key_data(state.rng)
        rng, step_rng = jax.random.split(rng)
        step_rng = jax.random.fold_in(step_rng, state.step)
        num_items = jnp.maximum(count_fn(batch).astype(jnp.float32), 1.0)
        base_params = jax.lax.stop_gradient(base_params)
        if grad_accum_steps == 1:
            (loss, aux), grads = grads_of(state.params, base_params, batch, step_rng, num_items)
        else:
            k = grad_accum_steps
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch
            )
            if micro_batch_axes is not None:  # keep each micro-batch split over the batch axes
                micro = jax.tree_util.tree_map(
                    lambda x: jax.lax.with_sharding_constraint(
                        x, jax.sharding.PartitionSpec(None, micro_batch_axes)
                    ),
                    micro,
                )

            def body(carry, xs):
                mb, i = xs
                (lo, a), g = grads_of(
                    state.params, base_params, mb, jax.random.fold_in(step_rng, i), num_items
                )
                acc_g, acc_l, acc_a = carry
                acc_g = jax.tree_util.tree_map(jnp.add, acc_g, g)
                acc_a = jax.tree_util.tree_map(jnp.add, acc_a, a)
                return (acc_g, acc_l + lo, acc_a), None

            zero_g = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            _, aux0 = jax.eval_shape(
                loss_fn,
                state.params,
                base_params,
                jax.tree_util.tree_map(lambda x: x[0], micro),
                step_rng,
                num_items,
            )
            zero_a = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
            (grads, loss, aux), _ = jax.lax.scan(
                body, (zero_g, jnp.zeros((), jnp.float32), zero_a), (micro, jnp.arange(k))
            )
        if inject_nan_at is not None:
            poison = jnp.where(state.step == inject_nan_at, jnp.nan, 0.0)
            grads = jax.tree_util.tree_map(lambda g: g + poison.astype(g.dtype), grads)
        gnorm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        updates = jax.tree_util.tree_map(lambda u: u * lr_scale, updates)
        unorm = optax.global_norm(updates)
        pnorm = optax.global_norm(state.params)
        # Scalars decide: a NaN or inf anywhere makes a global norm non-finite (so does an f32
        # overflow of its square, which clipping could not rescue either). A cond rather than a
        # per-leaf select keeps the compiled step small (fewer kernels).
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm) & jnp.isfinite(unorm)
        if max_update_ratio > 0:
            ok &= (unorm <= max_update_ratio * pnorm) | (pnorm == 0)

        new_params, new_opt = jax.lax.cond(
            ok,
            lambda _: (optax.apply_updates(state.params, updates), new_opt),
            lambda _: (state.params, state.opt_state),
            None,
        )
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt,
            rng=jax.random.key_data(rng),
            bad_in_a_row=jnp.where(ok, 0, state.bad_in_a_row + 1),
            bad_total=state.bad_total + jnp.where(ok, 0, 1),
        )
        metrics = {
            "loss": loss,
            "grad_norm": gnorm,
            "update_ratio": unorm / jnp.maximum(pnorm, jnp.finfo(jnp.float32).tiny),
            "finite": ok,  # the step was applied (finite and within the divergence guard)
            "num_items": num_items,
            **aux,
        }
        if schedule is not None:
            metrics["lr"] = schedule(optax_count(state.opt_state)) * lr_scale
        return new_state, metrics

    return step


def optax_count(opt_state) -> jax.Array:
    """The update count of the (first) schedule inside an optax state (0 if none)."""
    for leaf in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
    ):
        if isinstance(leaf, optax.ScaleByScheduleState):
            return leaf.count
    for s in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
    ):
        if isinstance(s, optax.ScaleByAdamState):
            return s.count
    return jnp.zeros((), jnp.int32)
