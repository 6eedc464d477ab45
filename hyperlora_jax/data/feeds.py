"""Training data feeds: an experiment's data paths -> the infinite stream of packed batch rows.

D2L trains on self-generated QA records (official columns ctx_ids / input_ids /
response_start_end / logprobs_*; JSONL, Parquet, token shards) packed into rows; T2L on the
task suite (SFT) or a library of task LoRAs (reconstruction). Without --data, the tiny presets
get a built-in synthetic task.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from hyperlora_jax.data import packing, pipeline, sni, token_shards
from hyperlora_jax.data.packing import check_label_budget
from hyperlora_jax.data.storage import ErrorLog, iter_raw_records
from hyperlora_jax.errors import ConfigError
from hyperlora_jax.hypernet.t2l import task_encoder as te
from hyperlora_jax.lora.storage import load_adapter, read_adapter_meta
from hyperlora_jax.models.chat import ctx_affixes
from hyperlora_jax.models.load import load_base_tokenizer

log = logging.getLogger(__name__)


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


def _token_shard_items(files, opts, parts, seed: int, tokenizer=None):
    """Token shards -> `token_shards.ShardItems`: the items the text path would build for the
    same records (same chunk draws per record index), held as numpy arrays, built per row."""

    if parts.hp.objective != "ce":
        raise ConfigError("token shards carry no teacher log-probs: use train.loss=ce")
    chunk = opts.chunk
    data = token_shards.TokenData(files)
    if tokenizer is not None:
        prefix, suffix = ctx_affixes(tokenizer)
        if (tuple(prefix), tuple(suffix)) != (data.ctx_prefix, data.ctx_suffix):
            raise ConfigError(
                f"{files[0]}: the token shards were built for another chat format than "
                "--base_model's tokenizer; rebuild them with its tokenizer"
            )
    vocab = parts.base_cfg.vocab_size
    if data.max_id() >= vocab:
        raise ConfigError(f"token shards hold ids >= the base model's vocab_size {vocab}")
    items = token_shards.ShardItems(
        data,
        dataclasses.replace(chunk, prefix=data.ctx_prefix, suffix=data.ctx_suffix),
        seed=seed,
        max_qas_len=opts.max_qas_len,
        max_qas_per_sample=opts.max_qas_per_sample,
    )
    log.info("token shards: %d records -> %d items (%d files)", len(data), len(items), len(files))
    return items


def _record_items(paths, opts, hp, seed: int, tokenizer=None, ctx_tokenizer=None) -> list[dict]:
    """Text QA records (NIAH, facts: tokenized here) or self-gen records -> D2L items.

    ctx_tokenizer: a separate context encoder's tokenizer (cross-model D2L): contexts are
    tokenized (text records) or re-tokenized (self-gen records) with it and chunked with its
    affixes; the QAs and teacher log-probs stay in the base tokenizer."""

    chunk = opts.chunk
    records = [rec for _, _, rec in iter_raw_records(paths, errors=ErrorLog("raise"))]
    text = bool(records) and "ctx_ids" not in records[0] and "context" in records[0]
    if text:  # {context, prompt, response} (NIAH, facts): tokenized here, gold-response CE
        if hp.objective != "ce":
            raise ConfigError("text records carry no teacher log-probs: use train.loss=ce")
        if tokenizer is None:
            raise ConfigError("text records need the base model's tokenizer (--base_model)")
    elif ctx_tokenizer is not None:
        if tokenizer is None:
            raise ConfigError(
                "cross-model records need the base model's tokenizer (--base_model) beside the "
                "context encoder's"
            )
        records = pipeline.retokenize_contexts(
            records, tokenizer, ctx_tokenizer, opts.keep_base_template
        )
    # contexts are chunked with the chat affixes of the tokenizer that wrote them
    chunk_tok = ctx_tokenizer if ctx_tokenizer is not None else tokenizer if text else None
    if chunk_tok is not None:
        chunk = pipeline.ChunkConfig.for_tokenizer(
            chunk_tok,
            max_chunk_len=chunk.max_chunk_len,
            min_chunk_len=chunk.min_chunk_len,
            num_chunk_probs=chunk.num_chunk_probs,
        )
    if text:

        def make_item(rec, rng):
            return pipeline.text_qa_item(rec, rng, tokenizer, chunk, ctx_tokenizer=ctx_tokenizer)
    else:

        def make_item(rec, rng):
            return pipeline.selfgen_item(rec, chunk, rng, hp.top_k)

    return pipeline.build_items(
        records,
        make_item,
        seed=seed,
        max_qas_len=opts.max_qas_len,
        max_qas_per_sample=opts.max_qas_per_sample,
    )


def d2l_data(config, parts, paths: list[str], seed: int, tokenizer=None, ctx_tokenizer=None):
    """Packed D2L rows: token shards, text QA records (NIAH, facts) or self-gen records."""
    items, pc = d2l_items(config, parts, paths, seed, tokenizer, ctx_tokenizer)
    return pack_d2l_items(parts, items, pc, seed)


def pack_d2l_items(parts, items, pc, seed: int):
    """An endless, checkpointable iterator of this process's batches of packed rows, each
    checked against the LM head's label budget (train.max_label_len)."""

    per_process = parts.hp.global_batch // jax.process_count()
    loader = pipeline.LoaderConfig(
        batch_size=per_process,
        seed=seed,
        num_epochs=None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    ds = pipeline.make_packed_dataset(items, pc, loader)
    if parts.hp.max_label_len:

        def checked(batch):
            check_label_budget(batch, parts.hp.max_label_len)
            return batch

        ds = ds.map(checked)
    return iter(ds)


class D2LFeed(NamedTuple):
    """What the D2L data path reads from `config.train`."""

    pack: Any  # packing.PackConfig: row sizes
    chunk: Any  # pipeline.ChunkConfig: context chunking (affixes filled per data source)
    max_qas_len: int  # <= 0: no limit
    max_qas_per_sample: int
    keep_base_template: bool  # cross-model self-gen contexts (pipeline.document_text)


def d2l_feed(config, parts) -> D2LFeed:
    t = config.train
    probs = t.num_chunk_probs
    return D2LFeed(
        pack=packing.PackConfig(
            max_inp_len=t.max_packed_inp_len,
            max_ctx_len=t.max_packed_ctx_len,
            max_contexts=t.max_contexts_per_pack,
            max_chunks=t.max_chunks_per_pack,
            max_qas=t.max_qas_per_pack,
            top_k=parts.hp.top_k,
        ),
        chunk=pipeline.ChunkConfig(
            max_chunk_len=t.max_ctx_chunk_len,
            min_chunk_len=t.min_ctx_chunk_len,
            num_chunk_probs={int(k): float(v) for k, v in dict(probs).items()} if probs else None,
        ),
        max_qas_len=t.max_qas_len,
        max_qas_per_sample=t.max_qas_per_sample,
        keep_base_template=t.ctx_keep_base_template,
    )


def d2l_items(config, parts, paths: list[str], seed: int, tokenizer=None, ctx_tokenizer=None):
    """(items, PackConfig) of the D2L training data (see d2l_data). A cross-model config
    (parts.ctx_cfg) reads its contexts in `ctx_tokenizer`, its context encoder's."""

    hp = parts.hp
    opts = d2l_feed(config, parts)
    pc = opts.pack
    cross = parts.ctx_cfg is not None
    if paths:
        shard_files = token_shards.find_shards(paths)
        if shard_files and cross:
            raise ConfigError(
                f"{shard_files[0]}: token shards hold contexts in the base model's tokenizer but "
                f"config {config.name!r} reads them with its own context encoder; train on the "
                "text records instead (`data niah|facts` without --format tokens)"
            )
        if cross and ctx_tokenizer is None:
            raise ConfigError(
                f"config {config.name!r} reads contexts with its own model: --data needs its "
                "tokenizer, pass --ctx_model DIR_OR_NAME"
            )
        if shard_files:  # `data niah|facts --format tokens`: the text path's items, built lazily
            items = _token_shard_items(shard_files, opts, parts, seed, tokenizer)
            longest = items.longest_chunk
        else:
            items = _record_items(paths, opts, hp, seed, tokenizer, ctx_tokenizer)
            longest = max((len(c) for it in items for c in it["ctx_chunks"]), default=0)
        if hp.max_chunk_len and longest > hp.max_chunk_len:
            raise ConfigError(
                f"a context chunk has {longest} tokens but chunk slots hold {hp.max_chunk_len}: "
                "raise train.max_ctx_chunk_len or give shorter documents"
            )
    elif "base_model_config" in config:
        if hp.objective == "distill":
            raise ConfigError("the synthetic task has no teacher: add --config.train.loss=ce")
        vocab = parts.base_cfg.vocab_size  # the ids must be valid for both models
        if cross:
            vocab = min(vocab, parts.ctx_cfg.vocab_size)
        items = synthetic_d2l_items(vocab, 4096, seed)
        pc = packing.PackConfig(
            max_inp_len=8, max_ctx_len=4, max_contexts=1, max_chunks=1, max_qas=1, top_k=0
        )
    else:
        raise ConfigError("D2L training needs --data (token shards, text or self-gen QA records)")
    return items, pc


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


def _suite_tasks(root: Path, which: str) -> list[str] | None:
    """Task names of a suite folder: splits.yaml "train" (default), "all" (train + held_out),
    or every task folder when there is no splits.yaml."""
    import yaml

    if not (root / "splits.yaml").exists():
        return None
    splits = yaml.safe_load((root / "splits.yaml").read_text())
    if which == "all":
        return list(splits["train"]) + list(splits.get("held_out", []))
    if which != "train":
        raise ConfigError(f"train.tasks={which!r}: expected 'train' or 'all'")
    return list(splits["train"])


class T2LFeed(NamedTuple):
    """What the T2L data paths read from the config."""

    tasks: str  # sft / lora: the suite split ("train" or "all"); recon: always "train"
    n_descs: int  # descriptions kept per task
    inp_len: int  # sft / lora: padded example length
    encoder: dict  # task-encoder spec (lora: unused, the description is never read)
    oracle_library: str  # recon: the oracle LoRA library
    embeddings: str  # train.task_embeddings: precomputed by `encoder` ("" = encode here)


def t2l_feed(config, parts) -> T2LFeed:
    t, recon = config.train, parts.hp.objective == "recon"
    return T2LFeed(
        tasks="train" if recon else t.tasks,
        n_descs=t.n_descs_per_ds,
        inp_len=0 if recon else t.inp_max_len,
        encoder=dict(config.encoder),
        oracle_library=t.oracle_library,
        embeddings=t.get("task_embeddings", ""),
    )


def task_encoder(opts: T2LFeed, base_model: str | None):
    """The config's task encoder, or the precomputed `train.task_embeddings` (.npz with
    `descriptions`, `embeddings` and the `encoder` spec, as JSON, that made them), checked to
    come from that same encoder."""
    if not opts.embeddings:
        return te.from_spec(opts.encoder, base_model)
    path = Path(opts.embeddings)
    if path.suffix != ".npz" or not path.is_file():
        raise ConfigError(f"train.task_embeddings={path}: no such .npz file")
    with np.load(path, allow_pickle=False) as z:
        made = json.loads(str(z["encoder"])) if "encoder" in z else None
    if made != opts.encoder:
        raise ConfigError(
            f"train.task_embeddings={path} was made by encoder {made}, not by this config's "
            f"{opts.encoder}: make it again with this encoder (launch/device/lease.py prepare)"
        )
    return te.PrecomputedEncoder(path)


def t2l_data(config, parts, paths: list[str], seed: int, base_model: str | None):
    """The official hierarchical stream over a Lots-of-LoRAs task folder (e.g. `hyperlora-jax
    data task-suite`): k tasks x 1 example per step, a random description per example, embedded
    once up front by the config's task encoder. Returns (iterator, task names); row field
    task_index is the task's position in that list (the adapter of a LoRA library)."""
    import grain

    if len(paths) != 1 or not Path(paths[0]).is_dir():
        raise ConfigError("T2L training takes one --data folder of tasks (Lots-of-LoRAs layout)")
    if not base_model:
        raise ConfigError("T2L training on task data needs --base_model (tokenizer and weights)")
    root = Path(paths[0])
    hp, opts = parts.hp, t2l_feed(config, parts)
    n_adapters = config.train.num_adapters
    names = _suite_tasks(root, opts.tasks)
    tasks = sni.load_tasks(root, names, split="train")
    names = [x.name for x in tasks]
    if hp.objective == "lora" and n_adapters not in (1, len(tasks)):
        raise ConfigError(
            f"train.num_adapters={n_adapters} but {root} has {len(tasks)} tasks: set it to "
            f"{len(tasks)} (one oracle LoRA per task) or 1 (one multi-task LoRA)"
        )
    n_descs = opts.n_descs
    tok = load_base_tokenizer(base_model)
    pad_to = opts.inp_len
    toks = [sni.tokenize_task(x, tok, max_len=pad_to, n_descs=n_descs) for x in tasks]
    if hp.max_label_len:
        longest = max(sum(v >= 0 for v in y) for x in toks for y in x.labels)
        if longest > hp.max_label_len:
            raise ConfigError(
                f"a response has {longest} label tokens > train.max_label_len="
                f"{hp.max_label_len}; raise it (or 0: the LM head on every position)"
            )
    if hp.objective == "lora":  # plain LoRA: the description is never read
        embs = [
            np.zeros((len(x.descriptions), parts.hyper_cfg.task_emb_size), np.float32) for x in toks
        ]
    else:
        enc = task_encoder(opts, base_model)
        embs = [np.asarray(enc.encode(x.descriptions), np.float32) for x in toks]
    log.info("T2L data: %d tasks, %d descriptions", len(toks), sum(map(len, embs)))
    k = hp.global_batch
    src = sni.HierarchicalSource(toks, k, seed=seed, num_epochs=10**6, pad_to=pad_to)

    def example(row):
        return {
            "task_embs": embs[int(row["task_index"])][int(row["desc_index"])],
            "task_index": row["task_index"],
            "tokens": row["input_ids"],
            "segment_ids": row["segment_ids"],
            "loss_mask": row["labels"] >= 0,
            "sample_valid": np.array(True),
        }

    ds = grain.MapDataset.source(src)[jax.process_index() :: jax.process_count()].map(example)
    return iter(ds.batch(k // jax.process_count()).to_iter_dataset()), names


RECON_STATS = "recon_stats.safetensors"  # in the workdir; export-run ships it as constants


def recon_data(config, parts, seed: int, suite: str | None, workdir: str):
    """T2L reconstruction stream: per step k library tasks, each with a random training
    description (embedded by the config's encoder) and its oracle LoRA as the target.

    With `pred_z_score` the targets are per-element z-scores over the training tasks' oracles
    (torch's unbiased std + 1e-10, as the official code); the mean and std go to
    `workdir/recon_stats.safetensors`, from which generation un-normalises."""
    import grain

    opts = t2l_feed(config, parts)
    library = opts.oracle_library
    if not suite:
        raise ConfigError("T2L reconstruction needs --data SUITE (the task descriptions)")
    lib_names = list(read_adapter_meta(library).get("tasks") or [])
    lib = load_adapter(library)
    root = Path(suite)
    names = [n for n in (_suite_tasks(root, opts.tasks) or lib_names) if n in lib_names]
    if not names:
        raise ConfigError(f"library {library} has none of the training tasks of {suite}")
    h = parts.hyper_cfg
    for m in h.modules:
        want = (h.num_layers, h.rank, h.dims(m)[0])
        if m not in lib.a or tuple(lib.a[m].shape[1:]) != want:
            raise ConfigError(f"library {library}: module {m} is not [N, {want}] like this T2L")
    rows = [lib_names.index(n) for n in names]
    targets = {f"target_a.{m}": np.asarray(lib.a[m])[rows] for m in h.modules}
    targets |= {f"target_b.{m}": np.asarray(lib.b[m])[rows] for m in h.modules}
    if h.pred_z_score:
        from hyperlora_jax.lora.storage import save_safetensors
        from hyperlora_jax.paths import as_path

        stats = {}
        for key, x in targets.items():
            ab, m = key.removeprefix("target_").split(".", 1)
            stats[f"mean.{ab}.{m}"] = x.mean(0)
            stats[f"std.{ab}.{m}"] = x.std(0, ddof=1) if len(x) > 1 else np.zeros_like(x[0])
            targets[key] = (x - stats[f"mean.{ab}.{m}"]) / (stats[f"std.{ab}.{m}"] + 1e-10)
        if jax.process_index() == 0:
            as_path(workdir).mkdir(parents=True, exist_ok=True)
            save_safetensors(stats, as_path(workdir) / RECON_STATS)
    descs = [sni.load_metadata(root / n)["descriptions"][: opts.n_descs] for n in names]
    enc = task_encoder(opts, None)
    embs = [np.asarray(enc.encode(d), np.float32) for d in descs]
    k = min(parts.hp.global_batch, len(names))

    def example(i):
        r = random.Random(f"{seed}-{i}")
        t = r.randrange(len(names))
        out = {key: v[t] for key, v in targets.items()}
        return out | {"task_embs": embs[t][r.randrange(len(embs[t]))], "sample_valid": True}

    ds = grain.MapDataset.source(np.arange(10**9)).map(example)
    ds = ds[jax.process_index() :: jax.process_count()]
    return iter(ds.batch(k // jax.process_count()).to_iter_dataset()), names
