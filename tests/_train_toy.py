"""A toy training run for the trainer tests: linear regression through the real Trainer (grain
data, Orbax checkpoints, RNG use). Importable (`build`) and runnable as a subprocess:

python tests/_train_toy.py WORKDIR STEPS [--kill-at N] [--term-at N] [--nan-at N] [--save-every N]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

W_TRUE_SEED = 0


def build(
    workdir,
    steps,
    *,
    kill_at=None,
    term_at=None,
    nan_at=None,
    save_every=1,
    max_bad=10,
    time_budget_s=None,
    floor=None,
    lr_time_decay=False,
):
    import grain
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hyperlora_jax.train import optim
    from hyperlora_jax.train.trainer import Trainer, TrainOptions

    w_true = np.random.default_rng(W_TRUE_SEED).normal(size=(6, 3)).astype(np.float32)

    def example(i):
        x = np.random.default_rng(int(i)).normal(size=(6,)).astype(np.float32)
        return {"x": x, "y": x @ w_true}

    data = iter(
        grain.MapDataset.source(np.arange(10_000))
        .shuffle(seed=1)
        .repeat()  # endless: the time-budget tests run for seconds
        .map(example)
        .batch(8)
        .to_iter_dataset()
    )

    def init_params(rng):
        return {"dense": {"kernel": jax.random.normal(rng, (6, 3)) * 0.1, "bias": jnp.zeros(3)}}

    def loss_fn(params, base, batch, rng, n):
        pred = batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"]
        noise = 0.01 * jax.random.normal(rng, pred.shape)  # RNG use: resume must restore it
        err = jnp.sum((pred + noise - batch["y"]) ** 2) / n
        return err, {"err": err}

    tx, sched = optim.make_optimizer(
        init_params(jax.random.key(0)),
        lr=0.05,
        total_steps=steps,
        schedule="cosine",
        warmup_steps=2,
    )

    def hook(trainer, step, row):
        if kill_at == step:
            trainer.manager.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)
        if term_at == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return Trainer(
        loss_fn=loss_fn,
        count_fn=lambda b: jnp.asarray(b["x"].shape[0]),
        init_params=init_params,
        base_params={},
        tx=tx,
        schedule=sched,
        data=data,
        options=TrainOptions(
            steps=steps,
            workdir=str(workdir),
            save_every=save_every,
            progress=False,
            inject_nan_at=nan_at,
            max_bad_steps=max_bad,
            time_budget_s=time_budget_s,
            context_blind_floor=floor,
            lr_time_decay=lr_time_decay,
        ),
        rebuild_info={"kind": "toy"},
        hooks=[hook],
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("steps", type=int)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--term-at", type=int)
    p.add_argument("--nan-at", type=int)
    p.add_argument("--save-every", type=int, default=1)
    a = p.parse_args()
    import jax
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    jax.config.update("jax_default_matmul_precision", "highest")
    tr = build(
        a.workdir,
        a.steps,
        kill_at=a.kill_at,
        term_at=a.term_at,
        nan_at=a.nan_at,
        save_every=a.save_every,
    )
    try:
        tr.run()
    finally:
        tr.close()
    sys.exit(0)
