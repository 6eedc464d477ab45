"""One of N processes of a jax.distributed (gloo, localhost) run of the `tiny` D2L preset for a
few steps; prints this process's losses. usage: _multiproc_train.py PORT N ID WORKDIR STEPS"""

import json
import sys

port, n, pid, workdir, steps = sys.argv[1:6]

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

from hyperlora_jax.train import sharding as shd  # noqa: E402

assert shd.maybe_initialize_distributed(f"127.0.0.1:{port}", int(n), int(pid))
assert jax.process_count() == int(n)

from hyperlora_jax.train.config_file import load_config  # noqa: E402
from hyperlora_jax.train.factory import build_trainer  # noqa: E402

cfg = load_config(
    "configs/d2l.py:tiny",
    [
        f"--config.train.steps={steps}",
        "--config.train.loss=ce",
        "--config.train.global_packs_per_step=4",
    ],
)
tr = build_trainer(cfg, workdir=workdir)
tr.o.progress = False
rows = tr.run()
tr.close()
print(
    "LOSSES "
    + json.dumps(
        {
            "process": jax.process_index(),
            "devices": len(jax.devices()),
            "losses": [r["loss"] for r in rows],
        }
    ),
    flush=True,
)
jax.distributed.shutdown()
