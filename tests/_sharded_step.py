"""Run one D2L training step on 1 device and on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU
devices; print a JSON summary (losses, max param difference, the shardings chosen).
Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_train_sharding.py)."""

import json
import random

import jax
import numpy as np
from absl import flags

flags.FLAGS.mark_as_parsed()
jax.config.update("jax_default_matmul_precision", "highest")

from hyperlora_jax.data import packing  # noqa: E402
from hyperlora_jax.hypernet.d2l.model import D2LConfig  # noqa: E402
from hyperlora_jax.hypernet.d2l.model import init_params as d2l_init  # noqa: E402
from hyperlora_jax.models import transformer  # noqa: E402
from hyperlora_jax.models.testing import tiny_model  # noqa: E402
from hyperlora_jax.train import d2l_loss, optim  # noqa: E402
from hyperlora_jax.train import sharding as shd  # noqa: E402
from hyperlora_jax.train.trainer import Trainer, TrainOptions  # noqa: E402

assert len(jax.devices()) == 8, jax.devices()
cfg, base = tiny_model(tie_word_embeddings=True)
hcfg = D2LConfig.for_base(cfg, latent_size=32, n_latent_queries=4, num_blocks=1, rank=4)
r = random.Random(0)


def item():
    ctx = [[r.randrange(5, 64) for _ in range(r.randrange(3, 6))] for _ in range(r.randrange(1, 3))]
    qas, labs, lps, lpi = [], [], [], []
    for _ in range(r.randrange(1, 3)):
        q = [r.randrange(5, 64) for _ in range(4)]
        qas.append(q)
        labs.append([-100, -100, q[2], q[3]])
        lpi.append([[r.randrange(64) for _ in range(16)] for _ in range(2)])
        lps.append(
            (np.log(np.random.default_rng(len(lps)).dirichlet(np.ones(40), 2)[:, :16])).tolist()
        )
    return {
        "ctx_chunks": ctx,
        "input_ids": qas,
        "labels": labs,
        "logprobs_vals": lps,
        "logprobs_indices": lpi,
    }


pc = packing.PackConfig(max_inp_len=16, max_ctx_len=16, max_contexts=2, max_chunks=4, max_qas=4)
rows = []
while len(rows) < 8:
    rows += packing.pack_items([item() for _ in range(3)], pc)
batch = {k: np.stack([x[k] for x in rows[:8]]) for k in rows[0]}
loss = d2l_loss.make_d2l_loss(hcfg, cfg, objective="distill", l1_coef=0.1, neftune_alpha=5.0)
init = lambda k: d2l_init(hcfg, k)  # noqa: E731
tx, sched = optim.make_optimizer(jax.eval_shape(init, jax.random.key(0)), lr=1e-3, total_steps=10)


def run(mesh):
    base_sh = shd.shardings_from_logical(transformer.param_logical_axes(cfg), base, mesh)
    tr = Trainer(
        loss_fn=loss,
        count_fn=d2l_loss.d2l_count,
        init_params=init,
        base_params=base,
        tx=tx,
        schedule=sched,
        data=iter([batch]),
        mesh=mesh,
        base_shardings=base_sh,
        options=TrainOptions(
            steps=1,
            workdir=f"/tmp/_sharded_{mesh.size}",
            save_every=99,
            progress=False,
            async_checkpointing=False,
        ),
        fsdp_min_size=4096,
    )
    import shutil

    shutil.rmtree(f"/tmp/_sharded_{mesh.size}", ignore_errors=True)
    out = tr.run()
    return tr, out[0]


single, row1 = run(shd.make_mesh(devices=jax.devices()[:1]))
sharded, row8 = run(shd.make_mesh(data=2, fsdp=2, tensor=2))
diff = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves(single.state.params), jax.tree.leaves(sharded.state.params))
)
spec = lambda x: str(x.sharding.spec)  # noqa: E731
opt_mu = sharded.state.opt_state[1][0].mu["head"]
print(
    "RESULT "
    + json.dumps(
        {
            "loss1": row1["loss"],
            "loss8": row8["loss"],
            "param_diff": diff,
            "embedding": spec(sharded.base_params["embedding"]),
            "down_proj": spec(sharded.base_params["layers"]["mlp"]["down_proj"]["kernel"]),
            "q_proj": spec(sharded.base_params["layers"]["attn"]["q_proj"]["kernel"]),
            "head": spec(sharded.state.params["head"]),
            "head_mu": spec(opt_mu),
            "head_shape": list(sharded.state.params["head"].shape),
            "batch": str(shd.batch_sharding(sharded.mesh, 2).spec),
            "axis_types": [str(t) for t in sharded.mesh.axis_types],
        }
    )
)
