"""`hyperlora-jax train`: experiment config + flags -> base params, data, Trainer -> run.

Data: D2L trains on self-generated QA records (official columns ctx_ids / input_ids /
response_start_end / logprobs_*; JSONL, Parquet) packed into rows; the `tiny` presets (random
base model from `base_model_config`) train on a built-in synthetic task when no --data is given,
so the whole path runs on a laptop CPU.
"""

from __future__ import annotations

import logging
import random

import jax
import numpy as np

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


def synthetic_d2l_items(vocab: int, n: int, seed: int) -> list[dict]:
    """Key -> value facts in 4-token documents, asked back without the document."""
    nk = nv = max(2, min(64, (vocab - 8) // 2))
    k0, v0 = 8, 8 + nk
    r = random.Random(seed)
    out = []
    for _ in range(n):
        k, v = k0 + r.randrange(nk), v0 + r.randrange(nv)
        out.append(
            {
                "ctx_chunks": [[1, k, v, 2]],
                "input_ids": [[1, k, 3, v]],
                "labels": [[-100, -100, -100, v]],
            }
        )
    return out


def d2l_data(config, parts, paths: list[str], seed: int):
    from hyperlora_jax.data import packing, pipeline
    from hyperlora_jax.data.storage import ErrorLog, iter_raw_records

    hp = parts.hp
    pc = packing.PackConfig(
        max_inp_len=hp.inp_len,
        max_ctx_len=hp.ctx_len,
        max_contexts=hp.max_contexts,
        max_chunks=hp.max_chunks,
        max_qas=hp.max_qas,
        top_k=hp.top_k if hp.objective == "distill" else 0,
    )
    if paths:
        t = config.train
        chunk = pipeline.ChunkConfig(
            max_chunk_len=int(t.get("max_ctx_chunk_len") or -1),
            min_chunk_len=t.get("min_ctx_chunk_len"),
            num_chunk_probs=(
                {int(k): float(v) for k, v in dict(t.num_chunk_probs).items()}
                if t.get("num_chunk_probs")
                else None
            ),
        )
        records = [rec for _, _, rec in iter_raw_records(paths, errors=ErrorLog("raise"))]
        items = pipeline.build_items(
            records,
            lambda rec, rng: pipeline.selfgen_item(rec, chunk, rng, hp.top_k),
            seed=seed,
            max_qas_len=int(t.get("max_qas_len") or -1),
            max_qas_per_sample=int(t.get("max_qas_per_sample") or -1),
        )
    elif config.get("base_model_config"):
        items = synthetic_d2l_items(parts.base_cfg.vocab_size, 4096, seed)
        pc = packing.PackConfig(
            max_inp_len=8, max_ctx_len=4, max_contexts=1, max_chunks=1, max_qas=1, top_k=0
        )
        if hp.objective == "distill":
            raise ConfigError("the synthetic task has no teacher: add --config.train.loss=ce")
    else:
        raise ConfigError("D2L training needs --data (self-generated QA records)")
    per_process = hp.global_batch // jax.process_count()
    loader = pipeline.LoaderConfig(
        batch_size=per_process,
        seed=seed,
        num_epochs=None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return iter(pipeline.make_packed_dataset(items, pc, loader))


def synthetic_t2l_data(parts, batch: int, seed: int):
    """Three token tasks (copy, +1, reverse) chosen by noisy description embeddings."""
    import grain

    h, n = parts.hyper_cfg, max(2, min(32, parts.base_cfg.vocab_size - 4))
    e = h.task_emb_size
    centers = np.random.default_rng(5).normal(size=(3, e)).astype(np.float32)
    tasks = [lambda x: x, lambda x: (x + 1) % n, lambda x: n - 1 - x]

    def example(i):
        rng = np.random.default_rng(int(i))
        t, x = int(rng.integers(3)), int(rng.integers(n))
        v = centers[t] + 0.3 * rng.normal(size=e).astype(np.float32)
        return {
            "task_embs": (v / np.linalg.norm(v) * np.sqrt(e)).astype(np.float32),
            "tokens": np.array([1, 4 + x, 2, 4 + tasks[t](x)], np.int32),
            "segment_ids": np.ones(4, np.int32),
            "loss_mask": np.array([0, 0, 0, 1], bool),
            "sample_valid": np.array(True),
        }

    ds = grain.MapDataset.source(np.arange(10**7)).shuffle(seed=seed).map(example)
    ds = ds[jax.process_index() :: jax.process_count()]
    return iter(ds.batch(batch // jax.process_count()).to_iter_dataset())


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
    base = _base_params(config, parts, base_model)
    if hp.kind == "d2l":
        it = d2l_data(config, parts, list(data or []), seed)
    elif config.get("base_model_config") and not data:
        if hp.objective != "sft":
            raise ConfigError("the synthetic T2L task supports objective=sft only")
        it = synthetic_t2l_data(parts, hp.global_batch, seed)
    else:
        raise ConfigError(
            "T2L training on real task data is not wired into the CLI yet; use the Python API "
            "(hyperlora_jax.train.steps.make_t2l_sft_loss + Trainer) with your own iterator"
        )
    spec = shd.parse_mesh_spec(mesh) if mesh else dict(t.get("mesh", {"data": -1}))
    spec = {k: int(spec.get(k, 1)) for k in ("data", "fsdp", "tensor")}
    if spec["data"] * spec["fsdp"] * spec["tensor"] == 1 and len(jax.devices()) > 1:
        spec["data"] = -1
    m = shd.make_mesh(**spec)
    from hyperlora_jax.models import transformer

    base_sh = shd.shardings_from_logical(transformer.param_logical_axes(parts.base_cfg), base, m)
    tx, sched = build.make_tx(parts, jax.eval_shape(parts.init_params, jax.random.key(0)))
    opts = TrainOptions(
        steps=hp.steps,
        workdir=workdir,
        seed=seed,
        grad_accum_steps=hp.grad_accum_steps,
        log_every=int(t.get("log_every", 1) or 1),
        save_every=int(t.get("save_every", 1000)),
        max_to_keep=int(t.get("max_to_keep", 3)),
        max_bad_steps=int(t.get("max_bad_steps", 10)),
    )
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
    shd.maybe_initialize_distributed(fv.coordinator, fv.num_processes, fv.process_id)
    workdir = fv.workdir or f"runs/{fv.config.get('name', 'run')}"
    tr = build_trainer(
        fv.config, workdir=workdir, data=fv.data, base_model=fv.base_model, mesh=fv.mesh
    )
    try:
        rows = tr.run()
    finally:
        tr.close()
    if rows and jax.process_index() == 0:
        last = rows[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f} ({workdir})")
    return rows
