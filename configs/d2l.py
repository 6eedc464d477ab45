"""Doc-to-LoRA experiment presets (ml_collections). `get_config("gemma2_2b_qa")` etc.

Official setups (reference/d2l.md §1, §3.4) and CPU-scale ones:
  gemma2_2b_qa     l2l, 8 latents, 9 blocks (315,237,792 params), stage-1 training
  gemma2_2b_qa_chunks  its stage 2: chunked contexts, from the stage-1 weights (train.init_from)
  gemma2_2b_niah   early exit (L//4 layers), 208 latents, 8 blocks (309,672,864 params)
  mistral7b_qa     l2l, 9 blocks (574.2M)          qwen3_4b_qa   l2l, 9 blocks (421.0M)
  smollm2_qa       SmolLM2-135M-Instruct, l2l, latent 32, 2 blocks (6.04M params, 24.2 MB f32)
  smollm2_niah     SmolLM2-135M-Instruct, early exit, 240 latents, latent 32 (6.06M, 24.2 MB)
  smollm2_embedded smollm2_niah trained on NIAH + fact documents (the shipped default)
  smollm2_gpu      smollm2_niah at the official NIAH scale on one lent GPU (launch/device/README.md)
  tiny             random 2-layer base, latent 16, 1 block (tests, seconds on a CPU)
  gemma2_2b_vlm_ctx  cross-model (official train-cross-enc-slurm.sh): Gemma-3-4b-it's language
                   model reads the context (26 of its 34 layers), Gemma-2-2b-it is the base; the
                   Imagenette eval (`eval d2l-images`) feeds it images (training: below)
  tiny_vlm_ctx     its tiny twin: a 4-layer Gemma-3 text tower (H=48) over the tiny Gemma-2
                   fixture base (tests/test_d2l_images.py, tests/test_train_cross_model.py, the
                   images notebook's TINY mode)

Launch:
  hyperlora-jax train --config configs/d2l.py:smollm2_niah --workdir runs/d2l_niah \
      --data NIAH_SHARDS --base_model smollm2-135m-instruct
  hyperlora-jax train --config configs/d2l.py:gemma2_2b_qa_chunks \
      --config.train.init_from=STAGE1_EXPORT ...   # stage 2 from `export-run` of stage 1
  hyperlora-jax train --config configs/d2l.py:gemma2_2b_vlm_ctx --workdir runs/d2l_vlm_ctx \
      --data SELFGEN_RECORDS --base_model google/gemma-2-2b-it --ctx_model google/gemma-3-4b-it

Fields: `kind` ("d2l"), `base_model` (the base model's Hugging Face id: what `hyperlora-jax
fetch-model`, `--base_model` and exported checkpoints name), `base_preset` (its architecture in
hyperlora_jax.models.config; None for the inline `base_model_config` of `tiny`), `hypernet`
(D2LConfig fields) and `train`, read as written by hyperlora_jax/train/build.py, factory.py and
data/feeds.py. `train.steps`, when set, wins over `train.epochs` (x num_train_samples packs).
Cross-model presets add `ctx_model` (the context encoder's id) and `ctx_preset` (its text
architecture) or an inline `ctx_model_config`; the hypernetwork reads features of the context
encoder's width and `hypernet.ctx_encoder_last_layer` = the base's depth keeps as many maps as
the base has layers. Training loads the encoder (--ctx_model, default `ctx_model`; tiny_vlm_ctx
without it: a random `ctx_model_config` model) beside the base and reads the contexts of the data
in its tokenizer (docs/images.md, "Training a cross-model hypernetwork").
"""

from __future__ import annotations

import ml_collections as mlc
from ml_collections.config_dict import placeholder

from hyperlora_jax.errors import ConfigError

ALPHA_R8 = 2 * 8**1.5  # official lora_alpha = 2 r^1.5, used directly (not alpha / r)


def _hypernet(**kw) -> mlc.ConfigDict:
    h = dict(
        modules=("down_proj",),
        rank=8,
        lora_alpha=ALPHA_R8,
        latent_size=512,
        n_latent_queries=8,
        num_blocks=9,
        num_self_attn_per_block=0,
        num_pre_head_layers=1,
        per_layer_processing=True,
        use_bias=True,
        ctx_encoder_type="per_layer_activations",
        early_exit_layer=placeholder(int),
        ctx_encoder_last_layer=placeholder(int),
        scaler_b_init=0.0,  # official; see D2LConfig.scaler_b_init
    )
    h.update(kw)
    return mlc.ConfigDict(h)


# Stage-2 / NIAH chunk-count distribution: 1 chunk 50%, 2 chunks 12.5%, 3..8 chunks 6.25% each.
NUM_CHUNK_PROBS = {"1": 0.5, "2": 0.125, **{str(k): 0.0625 for k in range(3, 9)}}


def _train(**kw) -> mlc.ConfigDict:
    """Main stage-1 (80k steps) hyperparameters; presets override per §3.4. AdamW with
    b1 0.9, b2 0.999, eps 1e-8 (official, optax defaults)."""
    t = dict(
        steps=80_000,
        learning_rate=4e-5,
        schedule="cosine",  # official cosine_with_min_lr
        min_learning_rate=1e-7,
        warmup_steps=100,
        weight_decay=0.01,
        # Excluded from weight decay (name match): scalers, biases, norms, latents.
        no_decay=("scaler", "bias", "layernorm", "ln_", "latents_q"),
        max_grad_norm=1.0,
        grad_accum_steps=8,
        global_packs_per_step=64,  # 8 GPUs x 8 accumulation x 1 pack
        max_packed_inp_len=4096,
        max_packed_ctx_len=4096,
        max_contexts_per_pack=16,
        max_chunks_per_pack=16,
        max_qas_per_pack=64,
        max_qas_len=2048,
        max_qas_per_sample=1,
        max_label_len=0,  # > 0: the LM head only at this many label positions per row
        loss="kl_top16",  # "kl_top16" (distillation on 16 teacher log-probs) or "ce" (NIAH)
        l1_coef=0.1,
        neftune_alpha=5.0,
        # Chunking during training: <= 0 = one chunk per context (up to max_packed_ctx_len).
        max_ctx_chunk_len=-1,
        min_ctx_chunk_len=placeholder(int),
        num_chunk_probs=None,
        # Cross-model self-gen records: the base's chat markup around a context is dropped before
        # it is re-tokenized for the encoder (what inference shows it); True keeps it, as the
        # official `detokenize_ctx_text` does (the encoder then reads the base's turn markup).
        ctx_keep_base_template=False,
        compute_dtype="bfloat16",
        remat_policy="",  # "" = none; see d2l_loss.make_d2l_loss
        seed=42,
        init_from="",  # an exported checkpoint: its params, fresh optimizer (stage 2)
        mesh=mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),  # --mesh overrides
        log_every=1,
        save_every=1000,
        max_to_keep=3,
        max_bad_steps=10,  # stop after this many skipped steps in a row
        # divergence guard: skip an update larger than this x the param norm (0 = off)
        max_update_ratio=1.0,
        time_budget_s=0.0,  # wall-clock seconds for a run, 0 = none (trainer.TrainOptions)
        lr_time_decay=False,  # cosine-decay the lr over time_budget_s instead of over steps
    )
    t.update(kw)
    return mlc.ConfigDict(t)


def _stage2(**kw) -> mlc.ConfigDict:
    """Stage-2 chunk training (initialised from the stage-1 checkpoint: train.init_from)."""
    return _train(
        steps=20_000,
        learning_rate=2e-5,
        warmup_steps=2000,
        grad_accum_steps=16,
        global_packs_per_step=128,
        max_packed_inp_len=1024,
        max_packed_ctx_len=2048,
        max_qas_len=512,
        max_ctx_chunk_len=512,
        min_ctx_chunk_len=25,
        num_chunk_probs=NUM_CHUNK_PROBS,
        **kw,
    )


def _niah_train(**kw) -> mlc.ConfigDict:
    t = dict(
        steps=placeholder(int),
        epochs=1,
        num_train_samples=640_000,
        grad_accum_steps=16,
        global_packs_per_step=16,
        loss="ce",
        l1_coef=1.5,
        neftune_alpha=0.0,
        max_ctx_chunk_len=512,
        min_ctx_chunk_len=25,
        num_chunk_probs=NUM_CHUNK_PROBS,
    )
    t.update(kw)
    return _train(**t)


def _base(name: str, preset, hf_id, hypernet: mlc.ConfigDict, train) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.kind = "d2l"
    c.name = name
    c.base_model = hf_id
    c.base_preset = preset
    c.hypernet = hypernet
    c.train = train
    return c


def gemma2_2b_qa() -> mlc.ConfigDict:
    return _base("gemma2_2b_qa", "gemma-2-2b-it", "google/gemma-2-2b-it", _hypernet(), _train())


def gemma2_2b_qa_chunks() -> mlc.ConfigDict:
    c = _base(
        "gemma2_2b_qa_chunks", "gemma-2-2b-it", "google/gemma-2-2b-it", _hypernet(), _stage2()
    )
    return c


def gemma2_2b_niah() -> mlc.ConfigDict:
    # eval: contexts chunked at 1024 tokens, batch 4
    h = _hypernet(ctx_encoder_type="early_exit", n_latent_queries=208, num_blocks=8)
    return _base("gemma2_2b_niah", "gemma-2-2b-it", "google/gemma-2-2b-it", h, _niah_train())


def mistral7b_qa() -> mlc.ConfigDict:
    return _base(
        "mistral7b_qa",
        "mistral-7b-instruct-v0.2",
        "mistralai/Mistral-7B-Instruct-v0.2",
        _hypernet(),
        _train(),
    )


def qwen3_4b_qa() -> mlc.ConfigDict:
    return _base(
        "qwen3_4b_qa",
        "qwen3-4b-instruct-2507",
        "Qwen/Qwen3-4B-Instruct-2507",
        _hypernet(),
        _train(),
    )


def _cpu_train(**kw) -> mlc.ConfigDict:
    t = dict(
        steps=2000,
        warmup_steps=50,
        learning_rate=4e-4,
        grad_accum_steps=1,
        global_packs_per_step=4,
        max_packed_inp_len=512,
        max_packed_ctx_len=1024,
        max_qas_len=256,
        compute_dtype="float32",
    )
    t.update(kw)
    return _train(**t)


def smollm2_qa() -> mlc.ConfigDict:
    h = _hypernet(latent_size=32, num_blocks=2)
    return _base(
        "smollm2_qa",
        "smollm2-135m-instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        h,
        _cpu_train(),
    )


def smollm2_niah() -> mlc.ConfigDict:
    h = _hypernet(latent_size=32, num_blocks=2, ctx_encoder_type="early_exit", n_latent_queries=240)
    t = _cpu_train(
        loss="ce",
        l1_coef=1.5,
        neftune_alpha=0.0,
        steps=200,
        warmup_steps=20,
        save_every=20,
        max_packed_inp_len=256,  # ~6 NIAH queries of ~40 tokens per row
        max_contexts_per_pack=8,
        max_ctx_chunk_len=256,
        min_ctx_chunk_len=25,
        num_chunk_probs=NUM_CHUNK_PROBS,
    )
    return _base(
        "smollm2_niah",
        "smollm2-135m-instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        h,
        t,
    )


def smollm2_embedded() -> mlc.ConfigDict:
    """The shipped default: smollm2_niah's hypernetwork trained in one CE run on NIAH records
    mixed with synthetic fact documents (gold answers; see hyperlora_jax/checkpoints/README)."""
    c = smollm2_niah()
    c.name = "smollm2_embedded"
    c.train.update(dict(steps=130, learning_rate=8e-4, max_packed_inp_len=384, max_qas_per_pack=32))
    return c


def smollm2_gpu() -> mlc.ConfigDict:
    """smollm2_niah's hypernetwork trained at the official NIAH recipe's scale on one GPU, in the
    two stages of the lease (launch/device/lease.py): NIAH, then NIAH + fact documents from the
    stage-1 weights. Both stages and call 1's probe run this one program (same shapes, loss and
    schedule constants), so it compiles once; runs stop by `time_budget_s`, and stage 2 decays
    its learning rate over the clock (`lr_time_decay`). bf16 compute, f32 accumulation."""
    c = smollm2_niah()
    c.name = "smollm2_gpu"
    c.hypernet.scaler_b_init = 0.1  # not the official 0: see the learning-gate table
    c.train.update(
        dict(
            steps=10**6,  # the time budget ends each stage
            schedule="constant",
            learning_rate=1e-3,
            min_learning_rate=1e-5,
            warmup_steps=50,
            global_packs_per_step=32,  # the probe halves it if the GPU runs out of memory
            max_packed_inp_len=384,  # 8 NIAH queries of ~45 tokens
            max_packed_ctx_len=1280,  # with 32 chunk slots rows hold ~7 contexts, not ~5
            max_chunks_per_pack=32,
            max_contexts_per_pack=8,
            max_label_len=96,  # logits only at label positions: 8 answers of <= 12 tokens
            compute_dtype="bfloat16",
            save_every=1000,
            max_to_keep=2,
        )
    )
    return c


def tiny() -> mlc.ConfigDict:
    h = _hypernet(latent_size=16, num_blocks=1, n_latent_queries=4)
    c = _base(
        "tiny",
        None,
        None,
        h,
        # Rows sized for short test records (16 contexts of a few tokens): small programs.
        _cpu_train(
            steps=20,
            global_packs_per_step=2,
            max_packed_inp_len=128,
            max_packed_ctx_len=64,
            max_qas_len=64,
        ),
    )
    c.base_model_config = mlc.ConfigDict(
        dict(
            family="llama",
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
        )
    )
    return c


def gemma2_2b_vlm_ctx() -> mlc.ConfigDict:
    # official: train-cross-enc-slurm.sh = the main stage-1 run with
    # --ctx_encoder_model_name_or_path=google/gemma-3-4b-it (train.py sets last layer = 26)
    h = _hypernet(ctx_encoder_last_layer=26)
    c = _base("gemma2_2b_vlm_ctx", "gemma-2-2b-it", "google/gemma-2-2b-it", h, _train())
    c.ctx_model = "google/gemma-3-4b-it"
    c.ctx_preset = "gemma-3-4b-it"
    return c


def tiny_vlm_ctx() -> mlc.ConfigDict:
    h = _hypernet(latent_size=16, num_blocks=1, n_latent_queries=4, ctx_encoder_last_layer=3)
    c = _base("tiny_vlm_ctx", None, None, h, tiny().train)
    c.ctx_model = None
    c.ctx_preset = None
    # the tiny Gemma-2 fixture (tests/fixtures/official/d2l/tiny-gemma2) and the text tower of
    # hyperlora_jax.models.testing.save_tiny_vlm, whole architectures: the random models of a run
    # without --base_model / --ctx_model are built like them, and those folders load into them
    gemma = dict(embed_scale=True, norm_plus_one=True, sandwich_norm=True,
                 hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)  # fmt: skip
    c.base_model_config = mlc.ConfigDict(
        dict(family="gemma2", vocab_size=512, hidden_size=64, intermediate_size=128,
             num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, sliding_window=1024,
             layer_types=("sliding", "full", "sliding"), attn_logit_softcap=50.0,
             final_logit_softcap=30.0, query_pre_attn_scalar=16.0,
             max_position_embeddings=2048, **gemma)
    )  # fmt: skip
    c.ctx_model_config = mlc.ConfigDict(
        dict(family="gemma3", vocab_size=512, hidden_size=48, intermediate_size=96,
             num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, sliding_window=64,
             layer_types=("sliding", "full") * 2, rope_theta=1e6, rope_local_theta=10000.0,
             qk_norm=True, query_pre_attn_scalar=256.0, max_position_embeddings=512, **gemma)
    )  # fmt: skip
    return c


PRESETS = {
    f.__name__: f
    for f in (
        gemma2_2b_qa,
        gemma2_2b_qa_chunks,
        gemma2_2b_niah,
        mistral7b_qa,
        qwen3_4b_qa,
        smollm2_qa,
        smollm2_niah,
        smollm2_embedded,
        smollm2_gpu,
        tiny,
        gemma2_2b_vlm_ctx,
        tiny_vlm_ctx,
    )
}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """ml_collections entry point: `configs/d2l.py:<preset>` (default gemma2_2b_qa)."""
    name = arg or "gemma2_2b_qa"
    if name not in PRESETS:
        raise ConfigError(f"unknown d2l preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]()
