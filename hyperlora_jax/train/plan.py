"""`hyperlora-jax plan`: lower and compile the real-size training step for a mesh, on fake CPU
devices with abstract (ShapeDtypeStruct) inputs, and report per-device memory and FLOPs per step
(matmul FLOPs counted from the jaxpr, train/flops.py: XLA's cost analysis counts loop bodies once),
next to the analytic per-device memory and its fit on named chips (train/memory.py). With
compile_step=False only the analytic plan is made (shapes only: seconds, even for a 7B base).

Nothing is allocated: base and hypernetwork params, optimizer state and the batch are abstract.
The device count is fixed when JAX starts, so the CLI runs the work in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from hyperlora_jax.models import transformer
from hyperlora_jax.models.fetch import progress
from hyperlora_jax.train import build, memory
from hyperlora_jax.train import sharding as shd
from hyperlora_jax.train.config_file import load_config
from hyperlora_jax.train.flops import jaxpr_flops
from hyperlora_jax.train.trainer import state_shardings
from hyperlora_jax.train.update import TrainState, make_train_step

GiB = 1024**3


def plan(config, mesh: dict[str, int], rows: int | None = None, compile_step: bool = True) -> dict:
    """Compile one optimizer step of `config` on the current devices; return the measurements
    and the analytic memory plan (compile_step=False: the analytic plan only)."""

    _say(f"building {config.name}: abstract params, optimizer state and batch")
    parts = build.experiment(config)
    hp = parts.hp
    m = shd.make_mesh(**mesh)
    base_dtype = jnp.bfloat16 if hp.dtype == jnp.bfloat16 else jnp.float32
    key = jax.random.key(0)
    model_abs = lambda c: jax.eval_shape(  # noqa: E731
        lambda k: transformer.init_params(c, k, base_dtype), key
    )
    base_abs = model_abs(parts.base_cfg)
    if parts.ctx_cfg is not None:  # cross-model D2L: the context encoder's weights too
        base_abs = {"base": base_abs, "ctx": model_abs(parts.ctx_cfg)}
    base_sh = shd.shardings_from_logical(parts.frozen_logical_axes(), base_abs, m)
    hyper_abs = jax.eval_shape(parts.init_params, key)
    hyper_sh = shd.tree_shardings(hyper_abs, m)
    tx, sched = build.make_tx(config, parts, hyper_abs)
    state_abs = jax.eval_shape(lambda p: TrainState.create(p, tx, 0), hyper_abs)
    st_sh = state_shardings(state_abs, hyper_sh, m)
    rows = rows or hp.global_batch
    batch = build.batch_spec(config, parts, rows)
    batch_sh = {k: shd.batch_sharding(m, len(v.shape)) for k, v in batch.items()}
    axes = tuple(a for a in ("data", "fsdp") if m.shape[a] > 1) or None
    step = make_train_step(
        parts.loss_fn,
        tx,
        parts.count_fn,
        grad_accum_steps=config.train.grad_accum_steps,
        schedule=sched,
        micro_batch_axes=axes,
    )
    count = lambda t: int(sum(math.prod(x.shape) for x in jax.tree.leaves(t)))  # noqa: E731
    out = {
        "config": config.name,
        "mesh": dict(m.shape),
        "devices": m.size,
        "global_rows_per_step": rows,
        "grad_accum_steps": config.train.grad_accum_steps,
        "row_shape": {
            k: list(v.shape[1:])
            for k, v in batch.items()
            if k in ("input_ids", "ctx_ids", "tokens")
        },
        "compute_dtype": jnp.dtype(hp.dtype).name,
        "remat_policy": hp.remat_policy,
        "base_params": count(base_abs),
        "hypernet_params": count(hyper_abs),
        "analytic": memory.analytic(
            config,
            parts,
            dict(m.shape),
            rows,
            base_abs=base_abs,
            base_sh=base_sh,
            state_abs=state_abs,
            state_sh=st_sh,
            batch=batch,
            batch_sh=batch_sh,
        ),
    }
    if not compile_step:
        return out
    jitted = jax.jit(
        step,
        in_shardings=(st_sh, base_sh, batch_sh),
        out_shardings=(st_sh, shd.replicated(m)),
        donate_argnums=(0,),
        # every input stays an argument (the batch arrays the step does not read still sit on
        # the device), so the compiled argument size is the analytic one exactly
        keep_unused=True,
    )
    t0 = time.perf_counter()
    with jax.set_mesh(m):
        _say("tracing and lowering the step")
        traced = jitted.trace(state_abs, base_abs, batch)
        lowered = traced.lower()
        t1 = time.perf_counter()
        _say(f"lowered in {t1 - t0:.1f} s; compiling (XLA; the longest part)")
        compiled = lowered.compile()
    t2 = time.perf_counter()
    _say(f"compiled in {t2 - t1:.1f} s")
    mem = compiled.memory_analysis()
    flops = jaxpr_flops(traced.jaxpr.jaxpr)  # global matmul FLOPs
    n_dev = m.size
    out.update(lower_s=round(t1 - t0, 1), compile_s=round(t2 - t1, 1))
    if mem is not None:
        per = {
            "arguments": mem.argument_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "aliased": mem.alias_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes,
            "code": mem.generated_code_size_in_bytes,
        }
        per["total"] = per["arguments"] + per["outputs"] - per["aliased"] + per["temporaries"]
        out["per_device_GiB"] = {k: round(v / GiB, 3) for k, v in per.items()}
        out["per_device_bytes"] = per
    out["flops_per_step_total"] = flops
    out["flops_per_device_per_step"] = flops / n_dev
    return out


def format_plan(p: dict, chip: str | None = None) -> str:
    lines = [
        f"config {p['config']}  mesh {p['mesh']} ({p['devices']} devices)",
        f"  base params {p['base_params'] / 1e9:.3f}B, hypernet params "
        f"{p['hypernet_params'] / 1e6:.1f}M, compute {p['compute_dtype']}, "
        f"remat {p['remat_policy'] or 'none'}",
        f"  {p['global_rows_per_step']} rows/step ({p['grad_accum_steps']} accumulation "
        f"micro-batches), row shapes {p['row_shape']}",
    ]
    if "compile_s" in p:
        lines.append(f"  lowered in {p['lower_s']} s, compiled in {p['compile_s']} s")
    if "per_device_GiB" in p:
        g = p["per_device_GiB"]
        lines.append(
            "  compiled per-device memory, XLA:CPU (GiB): "
            + ", ".join(f"{k} {v}" for k, v in g.items())
        )
    lines.append(memory.format_analytic(p["analytic"], chip))
    if "flops_per_step_total" in p:
        lines.append(
            f"  matmul FLOPs per step: {p['flops_per_step_total']:.3e} total, "
            f"{p['flops_per_device_per_step']:.3e} per device"
        )
    return "\n".join(lines)


PROGRESS = "plan: "  # the subprocess's stderr lines the CLI passes on (the rest: error tail)
HEARTBEAT_S = 30.0


def _say(message: str) -> None:
    progress(PROGRESS + message)


def run_subprocess(
    config_arg: str,
    overrides: list[str],
    mesh: dict[str, int],
    rows: int | None,
    timeout: int = 3600,
    compile_step: bool = True,
) -> dict:
    """Run `plan` in a fresh process with the mesh's device count faked on the CPU. Its progress
    lines are passed on as they come, and one line every HEARTBEAT_S seconds says it still works."""
    import collections
    import threading

    n = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
        f"--xla_force_host_platform_device_count={n}".strip(),
        "JAX_PLATFORMS": "cpu",
    }
    cmd = [
        sys.executable,
        "-m",
        "hyperlora_jax.train.plan",
        config_arg,
        json.dumps(mesh),
        json.dumps(rows),
        json.dumps(compile_step),
        *overrides,
    ]
    if compile_step:
        _say(f"compiling one training step on {n} fake CPU devices (minutes for a real model)")
    else:
        _say(f"analytic plan on {n} fake CPU devices (shapes only, no compilation)")
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    tail: collections.deque[str] = collections.deque(maxlen=200)
    out: list[str] = []

    def pump_stderr() -> None:
        for line in proc.stderr:
            if line.startswith(PROGRESS):
                progress(line.rstrip("\n"))
            else:
                tail.append(line)

    readers = [
        threading.Thread(target=pump_stderr, daemon=True),
        threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True),
    ]
    for t in readers:
        t.start()
    t0 = time.perf_counter()
    while True:
        try:
            proc.wait(timeout=HEARTBEAT_S)
            break
        except subprocess.TimeoutExpired:
            waited = time.perf_counter() - t0
            if waited > timeout:
                proc.kill()
                proc.wait()
                break
            _say(f"still working ({waited:.0f} s so far)")
    for t in readers:
        t.join()
    stdout, stderr = "".join(out), "".join(tail)
    if proc.returncode != 0 or "PLAN " not in stdout:
        from hyperlora_jax.errors import ConfigError

        why = f"timed out after {timeout} s" if proc.returncode == -9 else f"exit {proc.returncode}"
        raise ConfigError(f"plan failed ({why}):\n{stderr[-3000:]}")
    return json.loads(stdout.split("PLAN ", 1)[1])


def _main(argv):
    from absl import flags

    flags.FLAGS.mark_as_parsed()

    config = load_config(argv[0], argv[4:])
    mesh = json.loads(argv[1])
    rows = json.loads(argv[2])
    print("PLAN " + json.dumps(plan(config, mesh, rows, compile_step=json.loads(argv[3]))))


if __name__ == "__main__":
    _main(sys.argv[1:])
