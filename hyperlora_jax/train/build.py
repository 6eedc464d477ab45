"""From an experiment config (configs/d2l.py, configs/t2l.py) to the pieces of a training run:
base/hypernet configs, loss, optimizer, loop options and the shapes of one batch row.

The two config families name a few hyperparameters differently (learning_rate vs lr, steps vs
epochs); `hparams` normalises them so the trainer and `plan` read one schema.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import ConfigError
from hyperlora_jax.train import d2l_loss, optim, t2l_loss

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "f32": jnp.float32,
    "bf16": jnp.bfloat16,
}


def _get(t, *names, default=None):
    for n in names:
        if n in t and t[n] is not None:
            return t[n]
    return default


@dataclasses.dataclass
class HParams:
    kind: str  # "d2l" or "t2l"
    objective: str  # d2l: distill | ce ; t2l: sft | recon | lora (plain LoRA library)
    steps: int
    lr: float
    schedule: str
    warmup_steps: int
    min_lr: float
    weight_decay: float
    no_decay: tuple[str, ...]
    max_grad_norm: float
    grad_accum_steps: int
    global_batch: int  # rows per optimizer step (all accumulation micro-batches)
    dtype: Any
    seed: int
    l1_coef: float = 0.0
    l2_coef: float = 0.0
    label_smoothing: float = 0.0
    neftune_alpha: float = 0.0
    remat_policy: str | None = None
    # packed-row sizes (D2L) / sequence length (T2L)
    inp_len: int = 512
    ctx_len: int = 512
    max_contexts: int = 16
    max_chunks: int = 16
    max_qas: int = 64
    top_k: int = 16
    max_chunk_len: int | None = None  # longest chunk (default: the packed context length)
    max_label_len: int | None = None  # LM head only at this many label positions per row
    num_adapters: int = 1  # objective lora: adapters in the library (1 = one multi-task LoRA)


def kind_of(config) -> str:
    h = config.get("hypernet", {})
    if "ctx_encoder_type" in h:
        return "d2l"
    if "encoder" in config or "lora" in config:
        return "t2l"
    raise ConfigError("config is neither a D2L (configs/d2l.py) nor a T2L (configs/t2l.py) one")


def hparams(config) -> HParams:
    t = config.train
    kind = kind_of(config)
    if kind == "d2l":
        loss = _get(t, "loss", default="kl_top16")
        objective = "ce" if loss == "ce" else "distill"
        steps = _get(t, "steps")
        if steps is None:  # NIAH: one epoch over num_train_samples (packs ~ samples here)
            steps = int(_get(t, "num_train_samples", default=640_000)) // int(
                _get(t, "global_packs_per_step", default=16)
            )
        global_batch = int(_get(t, "global_packs_per_step", "batch_size", default=8))
        no_decay = tuple(_get(t, "no_decay", default=())) + optim.D2L_NO_DECAY
    else:
        objective = _get(t, "objective", default="sft")
        per_epoch = int(_get(t, "n_train_ds", default=479)) // int(
            _get(t, "n_tasks_per_batch", default=8)
        )
        steps = _get(t, "steps") or int(_get(t, "epochs", default=1)) * max(per_epoch, 1)
        global_batch = int(_get(t, "n_tasks_per_batch", default=8)) * int(
            _get(t, "n_points_per_task", "n_embs_per_sampled_task", default=1)
        )
        no_decay = optim.T2L_NO_DECAY
    steps = int(steps)
    warmup = _get(t, "warmup_steps")
    if warmup is None:
        warmup = int(float(_get(t, "warmup_frac", default=0.0)) * steps)
    sched = str(_get(t, "schedule", default="cosine"))
    sched = {"cosine_with_min_lr": "cosine"}.get(sched, sched)
    dtype = DTYPES[str(_get(t, "compute_dtype", default=config.get("compute_dtype", "float32")))]
    remat = _get(t, "remat_policy", default=None) or None
    return HParams(
        kind=kind,
        objective=objective,
        steps=steps,
        lr=float(_get(t, "learning_rate", "lr")),
        schedule=sched,
        warmup_steps=int(warmup),
        min_lr=float(_get(t, "min_learning_rate", "min_lr", default=0.0)),
        weight_decay=float(_get(t, "weight_decay", default=0.01)),
        no_decay=no_decay,
        max_grad_norm=float(_get(t, "max_grad_norm", default=1.0)),
        grad_accum_steps=int(_get(t, "grad_accum_steps", default=1)),
        global_batch=global_batch,
        dtype=dtype,
        seed=int(_get(t, "seed", default=0)),
        l1_coef=float(_get(t, "l1_coef", default=0.0)),
        l2_coef=float(_get(t, "l2_reg_generated_w", default=0.0)),
        label_smoothing=float(_get(t, "label_smoothing", default=0.0)),
        neftune_alpha=float(_get(t, "neftune_alpha", "neftune_noise_alpha", default=0.0)),
        remat_policy=remat,
        inp_len=int(_get(t, "max_packed_inp_len", "inp_max_len", default=512)),
        ctx_len=int(_get(t, "max_packed_ctx_len", default=512)),
        max_contexts=int(_get(t, "max_contexts_per_pack", default=16)),
        max_chunks=int(_get(t, "max_chunks_per_pack", default=16)),
        max_qas=int(_get(t, "max_qas_per_pack", default=64)),
        top_k=int(_get(t, "top_k_teacher", default=16)),
        max_chunk_len=_chunk_len(t),
        max_label_len=int(_get(t, "max_label_len", default=0)) or None,
        num_adapters=int(_get(t, "num_adapters", default=1)),
    )


CHUNK_AFFIX_ROOM = 32  # a chunk is max_ctx_chunk_len ids plus its chat-turn header / trailer


def _chunk_len(t) -> int | None:
    """Static chunk slot length of the hypernetwork input (the training data is checked to fit)."""
    n = _get(t, "max_chunk_len", "max_ctx_chunk_len", default=None)
    if n is None or int(n) <= 0:
        return None
    return min(int(n) + CHUNK_AFFIX_ROOM, int(_get(t, "max_packed_ctx_len", default=int(n))))


@dataclasses.dataclass
class Parts:
    hp: HParams
    base_cfg: Any
    hyper_cfg: Any
    loss_fn: Any
    count_fn: Any
    init_params: Any  # rng -> hypernet params (f32)
    rebuild_info: dict


def experiment(config) -> Parts:
    """Base config, hypernetwork config, loss and initializer of an experiment config."""
    hp = hparams(config)
    if hp.kind == "d2l":
        from hyperlora_jax.hypernet.d2l.model import configs_from_experiment
        from hyperlora_jax.hypernet.d2l.model import init_params as d2l_init

        base_cfg, hcfg = configs_from_experiment(config)
        loss = d2l_loss.make_d2l_loss(
            hcfg,
            base_cfg,
            objective=hp.objective,
            l1_coef=hp.l1_coef,
            neftune_alpha=hp.neftune_alpha,
            max_chunk_len=hp.max_chunk_len,
            dtype=hp.dtype,
            remat_policy=hp.remat_policy,
            max_label_len=hp.max_label_len,
        )
        init = lambda k: d2l_init(hcfg, k)  # noqa: E731
        count = d2l_loss.d2l_count
        hyper_json = hcfg.to_json()
    else:
        import importlib.util
        import sys
        from pathlib import Path

        from hyperlora_jax.hypernet.t2l.model import init_params as t2l_init

        spec = importlib.util.spec_from_file_location(
            "_t2l_configs", Path(__file__).parents[2] / "configs" / "t2l.py"
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules.setdefault("_t2l_configs", mod)
        spec.loader.exec_module(mod)
        base_cfg = mod.model_config(config)
        hcfg = mod.hypernet_config(config, base_cfg)
        sft = dict(
            label_smoothing=hp.label_smoothing,
            l2_coef=hp.l2_coef,
            neftune_alpha=hp.neftune_alpha,
            dtype=hp.dtype,
            remat_policy=hp.remat_policy,
            max_label_len=hp.max_label_len,
        )
        init = lambda k: t2l_init(hcfg, k)  # noqa: E731
        if hp.objective == "recon":
            loss = t2l_loss.make_t2l_recon_loss(hcfg)
        elif hp.objective == "lora":
            loss = t2l_loss.make_lora_library_loss(hcfg, base_cfg, **sft)
            init = lambda k: lora_library_init(hcfg, base_cfg, hp.num_adapters, k)  # noqa: E731
        elif hp.objective == "sft":
            loss = t2l_loss.make_t2l_sft_loss(hcfg, base_cfg, **sft)
        else:
            raise ConfigError(f"train.objective={hp.objective!r}: expected sft, recon or lora")
        count = t2l_loss.t2l_count
        hyper_json = hcfg.to_json()
    info = {
        "kind": hp.kind,
        "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
        "base_model": config.get("base_model"),
        "base_model_config": base_cfg.to_json(),
        "hypernet_config": hyper_json,
    }
    return Parts(hp, base_cfg, hcfg, loss, count, init, _jsonable(info))


def lora_library_init(hcfg, base_cfg, n: int, rng) -> dict:
    """n fresh PEFT-initialised LoRAs as {"a": {m: [n, L, r, d]}, "b": ...}: B = 0 and one shared
    A ~ U(+-1/sqrt(d_in)), as n separate official runs with the same seed would start. A shared
    start also keeps what reconstruction must learn in A task-dependent only through training
    (independent random A's would be noise for a T2L to memorise)."""
    from hyperlora_jax.lora import adapter as lora

    ad = lora.init(rng, base_cfg, hcfg.modules, hcfg.rank)
    tile = lambda x: jnp.broadcast_to(x, (n, *x.shape))  # noqa: E731
    return {"a": {m: tile(x) for m, x in ad.a.items()}, "b": {m: tile(x) for m, x in ad.b.items()}}


def make_tx(parts: Parts, params_like):
    hp = parts.hp
    return optim.make_optimizer(
        params_like,
        lr=hp.lr,
        total_steps=hp.steps,
        schedule=hp.schedule,
        warmup_steps=hp.warmup_steps,
        min_lr=hp.min_lr,
        weight_decay=hp.weight_decay,
        no_decay=hp.no_decay,
        max_grad_norm=hp.max_grad_norm,
    )


def batch_spec(parts: Parts, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract global batch of `rows` rows (shapes of the data pipeline's output)."""
    hp = parts.hp
    i32, f32 = jnp.int32, jnp.float32
    sd = lambda *s, d=i32: jax.ShapeDtypeStruct((rows, *s), d)  # noqa: E731
    if hp.kind == "d2l":
        t, tc = hp.inp_len, hp.ctx_len
        out = {
            k: sd(t)
            for k in (
                "input_ids",
                "positions",
                "segment_ids",
                "labels",
                "qa_index",
                "adapter_index",
            )
        }
        out.update({k: sd(tc) for k in ("ctx_ids", "ctx_positions", "ctx_segment_ids")})
        out.update(
            chunk_context=sd(hp.max_chunks),
            n_ctx_chunks=sd(hp.max_contexts),
            n_queries=sd(hp.max_contexts),
            qa_context=sd(hp.max_qas),
            num_contexts=sd(),
        )
        if hp.objective == "distill":
            out["logprobs_vals"] = sd(t, hp.top_k, d=f32)
            out["logprobs_indices"] = sd(t, hp.top_k)
        return out
    h = parts.hyper_cfg
    if hp.objective == "recon":
        out = {"task_embs": sd(h.task_emb_size, d=f32), "sample_valid": sd(d=jnp.bool_)}
        for m in h.modules:
            d_in, d_out = h.dims(m)
            out[f"target_a.{m}"] = sd(h.num_layers, h.rank, d_in, d=f32)
            out[f"target_b.{m}"] = sd(h.num_layers, h.rank, d_out, d=f32)
        return out
    return {
        "task_embs": sd(h.task_emb_size, d=f32),
        "task_index": sd(),
        "tokens": sd(hp.inp_len),
        "segment_ids": sd(hp.inp_len),
        "loss_mask": sd(hp.inp_len, d=jnp.bool_),
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
