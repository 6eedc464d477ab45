"""`hyperlora-jax train`: experiment config + flags -> base params, data feed, Trainer -> run.

The data feeds are in hyperlora_jax/data/feeds.py; the `tiny` presets (random base model from
`base_model_config`) train on a built-in synthetic task when no --data is given, so the whole
path runs on a laptop CPU. A cross-model D2L config (`ctx_preset` / `ctx_model_config`) also
loads its context encoder (--ctx_model, default the config's `ctx_model`; the tiny preset's is a
random `ctx_model_config` model): the frozen params are then {"base": ..., "ctx": ...}.
"""

from __future__ import annotations

import logging
import time

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
from hyperlora_jax.hypernet.d2l.model import ctx_config_from_experiment
from hyperlora_jax.models import transformer
from hyperlora_jax.models.load import base_fingerprint, load_base
from hyperlora_jax.train import build
from hyperlora_jax.train import sharding as shd
from hyperlora_jax.train.trainer import Trainer

log = logging.getLogger(__name__)


def _base(config, parts, base_model: str | None):
    """(params, tokenizer or None, folder or None, fingerprint or None) of the base model:
    --base_model (any name `load_base` takes), else the random `base_model_config` model of the
    tiny presets."""

    if not base_model:
        if "base_model_config" not in config:
            raise ConfigError(
                f"config {config.name!r} needs its base model weights: pass --base_model "
                f"{config.base_model or 'NAME_OR_DIR'}"
            )
        return transformer.init_params(parts.base_cfg, jax.random.key(0)), None, None, None

    dtype = np.float32 if parts.hp.dtype == np.float32 else None
    cfg, params, tok, path = load_base(base_model, dtype=dtype)
    if cfg.num_layers != parts.base_cfg.num_layers or cfg.hidden_size != parts.base_cfg.hidden_size:
        raise ConfigError(
            f"--base_model {base_model} ({cfg.family}, {cfg.num_layers} layers, "
            f"H={cfg.hidden_size})"
            f" does not match the config's base model {config.base_model!r}"
        )
    return params, tok, str(path), base_fingerprint(cfg, params)


def _ctx_encoder(config, hp, ctx_model: str | None):
    """(config, params, tokenizer or None, name to record or None) of a cross-model D2L
    config's context encoder: --ctx_model (any name `load_base` takes), else the config's
    `ctx_model`, else a random `ctx_model_config` model (tiny preset); None when the base model
    reads its own contexts. A loaded encoder must have the config's depth and width."""

    want = ctx_config_from_experiment(config) if hp.kind == "d2l" else None
    if want is None:
        if ctx_model:
            raise ConfigError(
                f"--ctx_model {ctx_model}: config {config.name!r} reads contexts with its base "
                "model; a separate context encoder needs a cross-model preset (e.g. "
                "configs/d2l.py:gemma2_2b_vlm_ctx)"
            )
        return None
    name = ctx_model or config.get("ctx_model")
    if not name:
        return want, transformer.init_params(want, jax.random.key(1)), None, None
    dtype = np.float32 if hp.dtype == np.float32 else None
    cfg, params, tok, _ = load_base(name, dtype=dtype)
    if cfg.num_layers != want.num_layers or cfg.hidden_size != want.hidden_size:
        raise ConfigError(
            f"--ctx_model {name} ({cfg.family}, {cfg.num_layers} layers, H={cfg.hidden_size}) "
            f"does not match the context encoder of config {config.name!r} "
            f"({want.num_layers} layers, H={want.hidden_size}); pass "
            f"{config.get('ctx_model') or 'a model of that shape'}"
        )
    return cfg, params, tok, config.get("ctx_model") or str(name)


def build_trainer(
    config,
    *,
    workdir: str,
    data: list[str] | None = None,
    base_model: str | None = None,
    ctx_model: str | None = None,
    mesh: str = "",
) -> Trainer:
    ctx = _ctx_encoder(config, build.derive(config), ctx_model)
    # the loaded encoder's own config (sliding window, RoPE, ...) runs it, as inference does
    parts = build.experiment(config, ctx_cfg=ctx[0] if ctx else None)
    hp = parts.hp
    t = config.train
    seed = t.seed
    base, tok, base_model, fingerprint = _base(config, parts, base_model)
    if fingerprint:  # export-run records it: the hypernetwork is checked against its base
        parts.rebuild_info["base_fingerprint"] = fingerprint
    ctx_tok = None
    if ctx:  # the frozen params of a cross-model run (d2l_loss.frozen_models)
        _, ctx_params, ctx_tok, parts.rebuild_info["ctx_model"] = ctx
        base = {"base": base, "ctx": ctx_params}
    names = floor = None
    if hp.kind == "d2l":
        from hyperlora_jax.data.floor import items_floor

        items, pc = d2l_items(config, parts, list(data or []), seed, tok, ctx_tok)
        floor = items_floor(items)
        it = pack_d2l_items(parts, items, pc, seed)
    elif hp.objective == "recon":
        if not t.oracle_library:
            raise ConfigError(
                "T2L reconstruction needs train.oracle_library: the folder `export-run` wrote "
                "for an oracle LoRA run (configs/t2l.py:smollm2_oracles)"
            )
        it, names = recon_data(config, parts, seed, (data or [None])[0], workdir)
    elif "base_model_config" in config and not data:
        it = synthetic_t2l_data(parts, hp.global_batch, seed)
    else:
        it, names = t2l_data(config, parts, list(data or []), seed, base_model)
    spec = build.mesh_spec(config, mesh)
    if spec["data"] * spec["fsdp"] * spec["tensor"] == 1 and len(jax.devices()) > 1:
        spec["data"] = -1
    m = shd.make_mesh(**spec)

    base_sh = shd.shardings_from_logical(parts.frozen_logical_axes(), base, m)
    tx, sched = build.make_tx(config, parts, jax.eval_shape(parts.init_params, jax.random.key(0)))
    opts = build.train_options(config, hp, workdir, context_blind_floor=floor)
    if names is not None:  # which task each library adapter / training task is
        parts.rebuild_info["tasks"] = names
    return Trainer(
        loss_fn=parts.loss_fn,
        count_fn=parts.count_fn,
        init_params=parts.init_params,
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
    started = time.perf_counter()  # train.time_budget_s counts from here
    shd.maybe_initialize_distributed(fv.coordinator, fv.num_processes, fv.process_id)
    workdir = fv.workdir or f"runs/{fv.config.name}"
    tr = build_trainer(
        fv.config,
        workdir=workdir,
        data=fv.data,
        base_model=fv.base_model,
        ctx_model=fv.ctx_model,
        mesh=fv.mesh,
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
