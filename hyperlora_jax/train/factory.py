"""`hyperlora-jax train`: experiment config + flags -> base params, data feed, Trainer -> run.

The data feeds are in hyperlora_jax/data/feeds.py; the `tiny` presets (random base model from
`base_model_config`) train on a built-in synthetic task when no --data is given, so the whole
path runs on a laptop CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np

from hyperlora_jax.data.feeds import (
    d2l_items,
    pack_d2l_items,
    recon_data,
    synthetic_t2l_data,
    t2l_data,
)
from hyperlora_jax.errors import ConfigError
from hyperlora_jax.train import build
from hyperlora_jax.train import sharding as shd
from hyperlora_jax.train.trainer import Trainer, TrainOptions

log = logging.getLogger(__name__)


def _base_params(config, parts, base_model: str | None):
    from hyperlora_jax.models import transformer

    if config.get("base_model_config") and not base_model:
        return transformer.init_params(parts.base_cfg, jax.random.key(0))
    if not base_model:
        raise ConfigError(
            f"config {config.get('name')!r} needs its base model weights: pass --base_model DIR "
            "(a save_pretrained folder, e.g. from `hyperlora-jax fetch-model`)"
        )
    from hyperlora_jax.models.hf import load_hf_model

    dtype = np.float32 if parts.hp.dtype == np.float32 else None
    cfg, params = load_hf_model(base_model, dtype=dtype)
    if cfg.num_layers != parts.base_cfg.num_layers or cfg.hidden_size != parts.base_cfg.hidden_size:
        raise ConfigError(
            f"--base_model {base_model} ({cfg.family}, {cfg.num_layers} layers, "
            f"H={cfg.hidden_size})"
            f" does not match the config's base model {config.get('base_model')!r}"
        )
    return params


def _params_from_checkpoint(path: str, kind: str, init_params):
    """An initializer returning an exported checkpoint's params (shapes checked against ours)."""
    from hyperlora_jax.errors import CheckpointError

    if kind == "d2l":
        from hyperlora_jax.hypernet.d2l.checkpoint import load_checkpoint

        params = load_checkpoint(path)[0]
    else:
        from hyperlora_jax.hypernet.t2l.api import load_t2l_checkpoint

        params = load_t2l_checkpoint(path)[1]
    want = jax.eval_shape(init_params, jax.random.key(0))
    got = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), params)
    if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or any(
        a.shape != b.shape
        for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got))
    ):
        raise CheckpointError(f"train.init_from={path}: its parameters do not fit this config")
    return lambda rng: jax.tree_util.tree_map(jax.numpy.asarray, params)


def build_trainer(
    config,
    *,
    workdir: str,
    data: list[str] | None = None,
    base_model: str | None = None,
    mesh: str = "",
) -> Trainer:
    parts = build.experiment(config)
    hp = parts.hp
    t = config.train
    seed = hp.seed
    if base_model and not (Path(base_model) / "config.json").is_file():  # a known model name
        from hyperlora_jax.models.fetch import fetch_model

        base_model = str(fetch_model(base_model))
    base = _base_params(config, parts, base_model)
    names = floor = None
    if hp.kind == "d2l":
        from hyperlora_jax.data.floor import items_floor

        tok = None
        if base_model:
            from hyperlora_jax.models.tokenizer import load_tokenizer

            tok = load_tokenizer(base_model)
        items, pc = d2l_items(config, parts, list(data or []), seed, tok)
        floor = items_floor(items)
        it = pack_d2l_items(parts, items, pc, seed)
    elif hp.objective == "recon":
        if not t.get("oracle_library"):
            raise ConfigError(
                "T2L reconstruction needs train.oracle_library: the folder `export-run` wrote "
                "for an oracle LoRA run (configs/t2l.py:smollm2_oracles)"
            )
        it, names = recon_data(
            config, parts, str(t.oracle_library), seed, (data or [None])[0], workdir
        )
    elif config.get("base_model_config") and not data:
        it = synthetic_t2l_data(parts, hp.global_batch, seed)
    else:
        it, names = t2l_data(config, parts, list(data or []), seed, base_model)
    spec = shd.parse_mesh_spec(mesh) if mesh else dict(t.get("mesh", {"data": -1}))
    spec = {k: int(spec.get(k, 1)) for k in ("data", "fsdp", "tensor")}
    if spec["data"] * spec["fsdp"] * spec["tensor"] == 1 and len(jax.devices()) > 1:
        spec["data"] = -1
    m = shd.make_mesh(**spec)
    from hyperlora_jax.models import transformer

    base_sh = shd.shardings_from_logical(transformer.param_logical_axes(parts.base_cfg), base, m)
    init_params = parts.init_params
    if t.get("init_from"):  # e.g. stage 2 from stage 1: params only, fresh optimizer and schedule
        init_params = _params_from_checkpoint(str(t.init_from), hp.kind, init_params)
    tx, sched = build.make_tx(parts, jax.eval_shape(init_params, jax.random.key(0)))
    opts = TrainOptions(
        steps=hp.steps,
        workdir=workdir,
        seed=seed,
        grad_accum_steps=hp.grad_accum_steps,
        log_every=int(t.get("log_every", 1) or 1),
        save_every=int(t.get("save_every", 1000)),
        max_to_keep=int(t.get("max_to_keep", 3)),
        max_bad_steps=int(t.get("max_bad_steps", 10)),
        time_budget_s=float(t.time_budget_s) if t.get("time_budget_s") else None,
        lr_time_decay=bool(t.get("lr_time_decay", False)),
        min_lr_ratio=hp.min_lr / hp.lr if hp.lr else 0.0,
        context_blind_floor=floor,
    )
    if names is not None:  # which task each library adapter / training task is
        parts.rebuild_info["tasks"] = names
    return Trainer(
        loss_fn=parts.loss_fn,
        count_fn=parts.count_fn,
        init_params=init_params,
        base_params=base,
        tx=tx,
        schedule=sched,
        data=it,
        options=opts,
        mesh=m,
        base_shardings=base_sh,
        rebuild_info=parts.rebuild_info,
    )


def train_from_flags(fv) -> list[dict]:
    import time

    started = time.perf_counter()  # train.time_budget_s counts from here
    shd.maybe_initialize_distributed(fv.coordinator, fv.num_processes, fv.process_id)
    workdir = fv.workdir or f"runs/{fv.config.get('name', 'run')}"
    tr = build_trainer(
        fv.config, workdir=workdir, data=fv.data, base_model=fv.base_model, mesh=fv.mesh
    )
    tr.o.clock_start = started
    try:
        rows = tr.run()
    finally:
        tr.close()
    if rows and jax.process_index() == 0:
        last = rows[-1]
        why = {"time_budget": ", stopped by train.time_budget_s", "data": ", data exhausted"}
        print(
            f"step {last['step']}: loss {last['loss']:.4f} ({workdir}{why.get(tr.stopped_by, '')})"
        )
    return rows
