"""From an experiment config (configs/d2l.py, configs/t2l.py) to the pieces of a training run:
base/hypernet configs, loss, optimizer, loop options and the shapes of one batch row.

The config says its family in `kind`; the code reads `config.train.<key>` as the preset writes
it. `Derived` holds only values computed from several keys (steps from epochs, warmup from a
fraction, rows per step) or checked ones (dtype, the loss by name).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import CheckpointError, ConfigError
from hyperlora_jax.hypernet.t2l.model import T2LConfig
from hyperlora_jax.lora import adapter as lora
from hyperlora_jax.models import transformer
from hyperlora_jax.models.config import ModelConfig, get_preset
from hyperlora_jax.train import d2l_loss, optim, t2l_loss
from hyperlora_jax.train import sharding as shd
from hyperlora_jax.train.trainer import TrainOptions

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CHUNK_AFFIX_ROOM = 32  # a chunk is max_ctx_chunk_len ids plus its chat-turn header / trailer


def _d2l_loss(objective: str):
    def make(config, d, base_cfg, hcfg, ctx_cfg=None):
        t = config.train
        return d2l_loss.make_d2l_loss(
            hcfg,
            base_cfg,
            objective=objective,
            l1_coef=t.l1_coef,
            neftune_alpha=t.neftune_alpha,
            max_chunk_len=d.max_chunk_len,
            dtype=d.dtype,
            remat_policy=d.remat_policy,
            max_label_len=d.max_label_len,
            ctx_cfg=ctx_cfg,
        )

    return make


def _t2l_lm_kw(config, d) -> dict:
    t = config.train
    return dict(
        label_smoothing=t.label_smoothing,
        l2_coef=t.l2_reg_generated_w,
        neftune_alpha=t.neftune_alpha,
        dtype=d.dtype,
        remat_policy=d.remat_policy,
        max_label_len=d.max_label_len,
    )


def _t2l_sft_loss(config, d, base_cfg, tcfg):
    noise = config.train.task_emb_noise
    return t2l_loss.make_t2l_sft_loss(tcfg, base_cfg, task_emb_noise=noise, **_t2l_lm_kw(config, d))


# The loss of each family by its config name (d2l: train.loss, t2l: train.objective):
# name -> (objective, teacher top-k of a row, factory(config, derived, base_cfg, hyper_cfg)).
LOSSES = {
    "d2l": {
        "kl_top16": ("distill", 16, _d2l_loss("distill")),  # context distillation
        "ce": ("ce", 0, _d2l_loss("ce")),  # gold answers (NIAH)
    },
    "t2l": {
        "sft": ("sft", 0, _t2l_sft_loss),
        "recon": ("recon", 0, lambda c, d, b, h: t2l_loss.make_t2l_recon_loss(h)),
        # plain LoRAs (a library of num_adapters), no hypernetwork
        "lora": (
            "lora",
            0,
            lambda c, d, b, h: t2l_loss.make_lora_library_loss(h, b, **_t2l_lm_kw(c, d)),
        ),
    },
}
LOSS_KEY = {"d2l": "loss", "t2l": "objective"}


@dataclasses.dataclass(frozen=True)
class Derived:
    kind: str  # "d2l" or "t2l"
    objective: str  # d2l: distill | ce ; t2l: sft | recon | lora
    top_k: int  # teacher log-probs per label position (distill), else 0
    steps: int
    warmup_steps: int
    global_batch: int  # rows per optimizer step (all accumulation micro-batches)
    dtype: Any
    remat_policy: str | None
    max_label_len: int | None  # LM head only at this many label positions per row
    max_chunk_len: int | None = None  # d2l chunk slot length (default: the packed context)


def derive(config) -> Derived:
    """The checked and computed values of an experiment config (see module docstring)."""
    kind = config.get("kind")
    if kind not in LOSSES:
        raise ConfigError(f"config.kind={kind!r}: expected one of {', '.join(LOSSES)}")
    t = config.train
    name = t[LOSS_KEY[kind]]
    if name not in LOSSES[kind]:
        raise ConfigError(
            f"train.{LOSS_KEY[kind]}={name!r}: expected one of {', '.join(LOSSES[kind])}"
        )
    objective, top_k, _ = LOSSES[kind][name]
    if not t.learning_rate > 0:
        raise ConfigError(f"train.learning_rate={t.learning_rate}: must be > 0")
    if kind == "d2l":
        global_batch = t.global_packs_per_step
        # NIAH: epochs over num_train_samples (packs ~ samples here)
        steps = _steps(t, lambda: t.num_train_samples // global_batch)
        warmup = t.warmup_steps
        n = t.max_ctx_chunk_len
        chunk = min(n + CHUNK_AFFIX_ROOM, t.max_packed_ctx_len) if n > 0 else None
    else:
        global_batch = t.n_tasks_per_batch
        steps = _steps(t, lambda: max(t.n_train_ds // global_batch, 1))
        # warmup_frac x steps, or warmup_steps where a preset says it so (smollm2_universe_gpu:
        # a warmup that does not depend on train.steps)
        warmup = t.warmup_steps if "warmup_steps" in t else int(t.warmup_frac * steps)
        chunk = None
        if t.oracle_library and objective != "recon":
            raise ConfigError("train.oracle_library is read only by train.objective=recon")
        if objective == "sft" and t.num_adapters != 1:
            raise ConfigError("train.num_adapters is read only by train.objective=lora")
    if t.compute_dtype not in DTYPES:
        raise ConfigError(
            f"train.compute_dtype={t.compute_dtype!r}: expected one of {', '.join(DTYPES)}"
        )
    return Derived(
        kind=kind,
        objective=objective,
        top_k=top_k,
        steps=steps,
        warmup_steps=int(warmup),
        global_batch=int(global_batch),
        dtype=DTYPES[t.compute_dtype],
        remat_policy=t.remat_policy or None,
        max_label_len=t.max_label_len or None,
        max_chunk_len=chunk,
    )


def _steps(t, per_epoch) -> int:
    """train.steps, or train.epochs x per_epoch() when steps is unset; > 0."""
    steps, epochs = t.get("steps"), t.get("epochs")
    if steps is None:
        if epochs is None:
            raise ConfigError("set train.steps or train.epochs")
        steps = epochs * per_epoch()
    if not steps > 0:
        raise ConfigError(f"train.steps={steps}: must be > 0")
    return int(steps)


def train_options(config, d: Derived, workdir: str, **extra) -> TrainOptions:
    """The loop options of an experiment config (extra: TrainOptions fields not in a config)."""
    t = config.train
    return TrainOptions(
        steps=d.steps,
        workdir=workdir,
        seed=t.seed,
        grad_accum_steps=t.grad_accum_steps,
        log_every=t.log_every,
        save_every=t.save_every,
        max_to_keep=t.max_to_keep,
        max_bad_steps=t.max_bad_steps,
        max_update_ratio=t.max_update_ratio,
        time_budget_s=t.time_budget_s or None,
        lr_time_decay=t.lr_time_decay,
        min_lr_ratio=t.min_learning_rate / t.learning_rate,
        **extra,
    )


def mesh_spec(config, flag: str = "") -> dict[str, int]:
    """{data, fsdp, tensor} sizes: the --mesh flag, else train.mesh (-1 = the rest)."""

    spec = shd.parse_mesh_spec(flag) if flag else dict(config.train.mesh)
    return {k: int(spec.get(k, 1)) for k in ("data", "fsdp", "tensor")}


@dataclasses.dataclass
class Parts:
    hp: Derived
    base_cfg: Any
    hyper_cfg: Any
    loss_fn: Any
    count_fn: Any
    init_params: Any  # rng -> hypernet params (f32)
    rebuild_info: dict
    ctx_cfg: Any = None  # cross-model D2L: the context encoder's ModelConfig (else None)

    def frozen_logical_axes(self):
        """Logical axes of the frozen params the loss reads: the base model's, or {"base": ...,
        "ctx": ...} with a separate context encoder (d2l_loss.frozen_models)."""
        axes = transformer.param_logical_axes(self.base_cfg)
        if self.ctx_cfg is None:
            return axes
        return {"base": axes, "ctx": transformer.param_logical_axes(self.ctx_cfg)}


def t2l_configs(config) -> tuple[Any, Any]:
    """(base ModelConfig, T2LConfig) of a configs/t2l.py experiment: per-module sizes and layer
    count from the base model."""

    if config.base_preset:
        base = get_preset(config.base_preset)
    else:
        base = ModelConfig(**dict(config.base_model_config))
    lo = config.lora
    mods = tuple(lo.target_modules)
    dims = [base.module_dims(m) for m in mods]
    hcfg = T2LConfig(
        modules=mods,
        in_features=tuple(d[0] for d in dims),
        out_features=tuple(d[1] for d in dims),
        num_layers=base.num_layers,
        task_emb_size=int(config.encoder.dim),
        rank=int(lo.r),
        lora_alpha=float(lo.lora_alpha),
        use_rslora=bool(lo.use_rslora),
        **dict(config.hypernet),
    )
    return base, hcfg


def experiment(config, ctx_cfg=None) -> Parts:
    """Base config, hypernetwork config, loss and initializer of an experiment config.

    ctx_cfg: the loaded context encoder's ModelConfig of a cross-model D2L config (default: the
    config's `ctx_preset` / `ctx_model_config`); its width and depth must be the config's."""
    d = derive(config)
    loss_kw = {}
    if d.kind == "d2l":
        from hyperlora_jax.hypernet.d2l.model import (
            configs_from_experiment,
            ctx_config_from_experiment,
        )
        from hyperlora_jax.hypernet.d2l.model import init_params as d2l_init

        base_cfg, hcfg = configs_from_experiment(config)
        ctx_cfg = ctx_cfg or ctx_config_from_experiment(config)
        if ctx_cfg is not None:
            loss_kw["ctx_cfg"] = ctx_cfg
        init = lambda k: d2l_init(hcfg, k)  # noqa: E731
        count = d2l_loss.d2l_count
    else:
        from hyperlora_jax.hypernet.t2l.model import init_params as t2l_init

        base_cfg, hcfg = t2l_configs(config)
        init = lambda k: t2l_init(hcfg, k)  # noqa: E731
        if d.objective == "lora":
            n = config.train.num_adapters
            init = lambda k: lora_library_init(hcfg, base_cfg, n, k)  # noqa: E731
        count = t2l_loss.t2l_count
    loss = LOSSES[d.kind][config.train[LOSS_KEY[d.kind]]][2](config, d, base_cfg, hcfg, **loss_kw)
    if config.train.init_from:  # e.g. stage 2 from stage 1: params only, fresh optimizer
        init = _params_from_checkpoint(config.train.init_from, d.kind, init)
    info = {
        "kind": d.kind,
        "name": config.name,
        "config": config.to_dict(),
        "base_model": config.base_model,
        "ctx_model": config.get("ctx_model"),  # cross-model D2L: the context encoder's id
        "base_model_config": base_cfg.to_json(),
        "hypernet_config": hcfg.to_json(),
    }
    return Parts(d, base_cfg, hcfg, loss, count, init, _jsonable(info), loss_kw.get("ctx_cfg"))


def _params_from_checkpoint(path: str, kind: str, init_params):
    """An initializer returning an exported checkpoint's params (shapes checked against ours)."""

    if kind == "d2l":
        from hyperlora_jax.hypernet.d2l.checkpoint import load_checkpoint
    else:
        from hyperlora_jax.hypernet.t2l.checkpoint import load_checkpoint
    params = load_checkpoint(path).params
    want = jax.eval_shape(init_params, jax.random.key(0))
    got = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), params)
    if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or any(
        a.shape != b.shape
        for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got))
    ):
        raise CheckpointError(f"train.init_from={path}: its parameters do not fit this config")
    return lambda rng: jax.tree_util.tree_map(jnp.asarray, params)


def lora_library_init(hcfg, base_cfg, n: int, rng) -> dict:
    """n fresh PEFT-initialised LoRAs as {"a": {m: [n, L, r, d]}, "b": ...}: B = 0 and one shared
    A ~ U(+-1/sqrt(d_in)), as n separate official runs with the same seed would start. A shared
    start also keeps what reconstruction must learn in A task-dependent only through training
    (independent random A's would be noise for a T2L to memorise)."""

    ad = lora.init(rng, base_cfg, hcfg.modules, hcfg.rank)
    tile = lambda x: jnp.broadcast_to(x, (n, *x.shape))  # noqa: E731
    return {"a": {m: tile(x) for m, x in ad.a.items()}, "b": {m: tile(x) for m, x in ad.b.items()}}


def make_tx(config, parts: Parts, params_like):
    t = config.train
    no_decay = (
        tuple(t.no_decay) + optim.D2L_NO_DECAY if parts.hp.kind == "d2l" else optim.T2L_NO_DECAY
    )
    return optim.make_optimizer(
        params_like,
        lr=t.learning_rate,
        total_steps=parts.hp.steps,
        schedule=t.schedule,
        warmup_steps=parts.hp.warmup_steps,
        min_lr=t.min_learning_rate,
        weight_decay=t.weight_decay,
        no_decay=no_decay,
        max_grad_norm=t.max_grad_norm,
    )


def batch_spec(config, parts: Parts, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract global batch of `rows` rows (shapes of the data pipeline's output)."""
    hp, t = parts.hp, config.train
    i32, f32 = jnp.int32, jnp.float32
    sd = lambda *s, d=i32: jax.ShapeDtypeStruct((rows, *s), d)  # noqa: E731
    if hp.kind == "d2l":
        n, nc = t.max_packed_inp_len, t.max_packed_ctx_len
        row = ("input_ids", "positions", "segment_ids", "labels", "qa_index", "adapter_index")
        out = {k: sd(n) for k in row}
        out.update({k: sd(nc) for k in ("ctx_ids", "ctx_positions", "ctx_segment_ids")})
        out.update(
            chunk_context=sd(t.max_chunks_per_pack),
            n_ctx_chunks=sd(t.max_contexts_per_pack),
            n_queries=sd(t.max_contexts_per_pack),
            qa_context=sd(t.max_qas_per_pack),
            num_contexts=sd(),
        )
        if hp.top_k:
            out["logprobs_vals"] = sd(n, hp.top_k, d=f32)
            out["logprobs_indices"] = sd(n, hp.top_k)
        return out
    h = parts.hyper_cfg
    if hp.objective == "recon":
        out = {"task_embs": sd(h.task_emb_size, d=f32), "sample_valid": sd(d=jnp.bool_)}
        for m in h.modules:
            d_in, d_out = h.dims(m)
            out[f"target_a.{m}"] = sd(h.num_layers, h.rank, d_in, d=f32)
            out[f"target_b.{m}"] = sd(h.num_layers, h.rank, d_out, d=f32)
        return out
    n = t.inp_max_len
    return {
        "task_embs": sd(h.task_emb_size, d=f32),
        "task_index": sd(),
        "tokens": sd(n),
        "segment_ids": sd(n),
        "loss_mask": sd(n, d=jnp.bool_),
        "sample_valid": sd(d=jnp.bool_),
    }


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    return str(x)
