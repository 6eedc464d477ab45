"""Training a cross-model D2L hypernetwork (configs/d2l.py:tiny_vlm_ctx): a tiny Gemma-3 VLM's
language model reads the context, the tiny Gemma-2 fixture is the base. The frozen params are
{"base": ..., "ctx": ...}; the context side of the data is in the encoder's tokenizer (self-gen
contexts decoded with the base tokenizer and re-tokenized), the QAs in the base's. The run
learns, exports with its context encoder recorded, and the exported hypernetwork turns an
image into an adapter for the text-only base.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import packed_d2l_row
from PIL import Image

from hyperlora_jax.cli import main
from hyperlora_jax.data.feeds import d2l_items
from hyperlora_jax.errors import ConfigError
from hyperlora_jax.hypernet.d2l.api import DocToLoRA
from hyperlora_jax.hypernet.d2l.checkpoint import load_checkpoint
from hyperlora_jax.hypernet.d2l.model import init_params
from hyperlora_jax.models import transformer
from hyperlora_jax.models.chat import ctx_affixes, slice_into_chunks, tokenize_ctx_text
from hyperlora_jax.models.load import folder_fingerprint
from hyperlora_jax.models.testing import save_tiny_vlm
from hyperlora_jax.models.tokenizer import load_tokenizer
from hyperlora_jax.train import build
from hyperlora_jax.train.config_file import load_config
from hyperlora_jax.train.factory import build_trainer

PRESET = "configs/d2l.py:tiny_vlm_ctx"
# the synthetic key -> value task, fast: 32 rows a step, a high learning rate, no L1
FAST = [
    "--config.train.loss=ce",
    "--config.train.steps=40",
    "--config.train.warmup_steps=5",
    "--config.train.learning_rate=1e-2",
    "--config.train.global_packs_per_step=32",
    "--config.train.l1_coef=0",
    "--config.train.weight_decay=0",
]


@pytest.fixture(scope="module")
def run(fixtures_dir, tmp_path_factory):
    """(workdir, base folder, VLM folder) of one `train` run on the built-in synthetic task."""
    tmp = tmp_path_factory.mktemp("xmodel")
    base = fixtures_dir / "official/d2l/tiny-gemma2"
    vlm = tmp / "vlm"
    save_tiny_vlm(vlm, tokenizer_dir=base)
    work = tmp / "run"
    argv = ["train", "--config", PRESET, *FAST, f"--workdir={work}"]
    assert main([*argv, f"--base_model={base}", f"--ctx_model={vlm}"]) == 0
    return work, base, vlm


def test_training_learns(run):
    work, _, _ = run
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    # measured 7.9 -> 6.2 (random guessing: ln 512 = 6.24 before the logit soft-cap's spread)
    assert last < first - 1.0, (first, last)


def test_export_names_the_encoder_and_an_image_becomes_an_adapter(run, tmp_path):
    work, base, vlm = run
    out = tmp_path / "ckpt"
    assert main(["export-run", f"--workdir={work}", f"--out={out}"]) == 0
    meta = load_checkpoint(out).meta
    assert meta["ctx_encoder"]["model"] == str(vlm)
    assert meta["base_fingerprint"] == folder_fingerprint(base)  # the base's, not the encoder's
    d2l = DocToLoRA.from_checkpoint(out, base_model=base)  # the encoder found from its meta
    assert d2l.ctx_config.family == "gemma3" and d2l.ctx_vision is not None
    assert d2l.base_config.family == "gemma2"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    ad = d2l.internalize(images=[img])
    assert ad.a["down_proj"].shape == (3, 2 * d2l.config.rank, 128)
    q = jnp.asarray([d2l.query_ids("What is in the image?")])
    diff = np.abs(np.asarray(d2l.logits(q, ad)) - np.asarray(d2l.logits(q))).max()
    assert diff > 1e-3, diff


def _frozen_models(parts):
    base = transformer.init_params(parts.base_cfg, jax.random.key(0))
    ctx = transformer.init_params(parts.ctx_cfg, jax.random.key(1))
    return base, ctx


def test_the_context_encoder_reads_the_contexts():
    """The step's chunk LoRAs are the hypernetwork on context_features(ctx params, ctx config)
    (DocToLoRA's path over the encoder; f32, summation order only: rtol 1e-5, atol 1e-6); the
    base's weights do not enter them, the encoder's do."""
    cfg = load_config(PRESET, ["--config.train.loss=ce", "--config.hypernet.scaler_b_init=0.5"])
    parts = build.experiment(cfg)
    assert parts.ctx_cfg.hidden_size == parts.hyper_cfg.feature_size == 48
    base, ctx = _frozen_models(parts)
    hyper = init_params(parts.hyper_cfg, jax.random.key(2))
    row, items = packed_d2l_row(500)
    adapter_fn = jax.jit(parts.loss_fn.adapter_fn)
    got, _ = adapter_fn(hyper, {"base": base, "ctx": ctx}, row)

    d2l = DocToLoRA(
        parts.hyper_cfg, hyper, base, parts.base_cfg, ctx_params=ctx, ctx_config=parts.ctx_cfg
    )
    chunks = [c for it in items for c in it["ctx_chunks"]]
    a, b = d2l.chunk_loras(chunks)  # context_features(ctx, ctx_cfg, ...) -> the hypernetwork
    for g, w in ((got.a["down_proj"], a["down_proj"]), (got.b["down_proj"], b["down_proj"])):
        np.testing.assert_allclose(g[0, : len(chunks)], w, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(b["down_proj"])).max() > 0

    other_base = transformer.init_params(parts.base_cfg, jax.random.key(3))
    same, _ = adapter_fn(hyper, {"base": other_base, "ctx": ctx}, row)
    np.testing.assert_array_equal(np.asarray(same.a["down_proj"]), np.asarray(got.a["down_proj"]))
    other_ctx = transformer.init_params(parts.ctx_cfg, jax.random.key(4))
    moved, _ = adapter_fn(hyper, {"base": base, "ctx": other_ctx}, row)
    assert np.abs(np.asarray(moved.a["down_proj"] - got.a["down_proj"])).max() > 1e-4


@pytest.fixture(scope="module")
def tokenizers(fixtures_dir):
    """(base tokenizer: the tiny Gemma-2's, context tokenizer: another vocabulary and chat
    format, the tiny Mistral fixture's with its [INST] markers)."""
    base = load_tokenizer(fixtures_dir / "official/d2l/tiny-gemma2")
    ctx = load_tokenizer(fixtures_dir / "official/t2l/tiny-mistral")
    ctx.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
    return base, ctx


DOC = "The cat sat on the mat. Then it saw a bird and ran after it, far into the green field."


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return [str(path)]


def test_selfgen_contexts_are_retokenized_for_the_encoder(tokenizers, tmp_path):
    base_tok, ctx_tok = tokenizers
    assert ctx_affixes(ctx_tok) != ctx_affixes(base_tok)
    ids = tokenize_ctx_text(DOC, base_tok)  # the record was made in the base's tokenizer
    qa = [2, 4, 90, 88, 300, 301, 5, 4, 82, 84, 73, 446, 204, 310, 311, 5]
    rec = {"ctx_ids": ids, "input_ids": [qa], "response_start_end": [[13, 16]]}
    want = tokenize_ctx_text(DOC, ctx_tok)
    assert want != ids and base_tok.decode(ids[8:-8]) == DOC  # the affixes: 8 ids on each side
    cfg = load_config(PRESET, ["--config.train.loss=ce"])
    parts = build.experiment(cfg)
    items, _ = d2l_items(cfg, parts, _write(tmp_path / "sg.jsonl", [rec]), 0, base_tok, ctx_tok)
    assert items[0]["ctx_chunks"] == [want]
    assert items[0]["input_ids"] == [qa]  # the student side stays in the base tokenizer
    assert items[0]["labels"] == [[-100] * 13 + qa[13:16]]

    # chunked: equal slices of the encoder's ids, wrapped in the encoder's affixes
    cfg.train.max_ctx_chunk_len = 12
    items, _ = d2l_items(cfg, parts, _write(tmp_path / "sg.jsonl", [rec]), 0, base_tok, ctx_tok)
    pre, suf = ctx_affixes(ctx_tok)
    chunks = items[0]["ctx_chunks"]
    assert len(chunks) > 1 and chunks == slice_into_chunks(want, len(chunks), pre, suf)

    # train.ctx_keep_base_template: the official decoding, the base's chat markup kept as text
    cfg.train.update(max_ctx_chunk_len=-1, ctx_keep_base_template=True)
    items, _ = d2l_items(cfg, parts, _write(tmp_path / "sg.jsonl", [rec]), 0, base_tok, ctx_tok)
    assert items[0]["ctx_chunks"] == [tokenize_ctx_text(base_tok.decode(ids), ctx_tok)] != [want]


def test_text_records_read_their_context_in_the_encoder_tokenizer(tokenizers, tmp_path):
    base_tok, ctx_tok = tokenizers
    rec = {"context": DOC, "prompt": "Where did the cat sit?", "response": "on the mat"}
    cfg = load_config(PRESET, ["--config.train.loss=ce"])
    parts = build.experiment(cfg)
    items, _ = d2l_items(cfg, parts, _write(tmp_path / "t.jsonl", [rec]), 0, base_tok, ctx_tok)
    assert items[0]["ctx_chunks"] == [tokenize_ctx_text(DOC, ctx_tok)]
    q = items[0]["input_ids"][0]
    assert base_tok.decode(q).startswith("<bos><start_of_turn>user")  # the base's template


def test_cross_model_errors(fixtures_dir, tmp_path, capsys, tokenizers):
    base = fixtures_dir / "official/d2l/tiny-gemma2"
    cfg = load_config(PRESET, ["--config.train.loss=ce"])
    parts = build.experiment(cfg)
    np.savez(tmp_path / "shard.npz", x=np.zeros(1))
    with pytest.raises(ConfigError, match="token shards hold contexts in the base model's"):
        d2l_items(cfg, parts, [str(tmp_path / "shard.npz")], 0, *tokenizers)
    with pytest.raises(ConfigError, match="pass --ctx_model"):
        d2l_items(cfg, parts, _write(tmp_path / "t.jsonl", [{"context": DOC}]), 0, tokenizers[0])
    with pytest.raises(ConfigError, match=r"does not match the context encoder.*4 layers, H=48"):
        build_trainer(cfg, workdir=str(tmp_path / "w"), ctx_model=str(base))  # 3 layers, H=64
    for preset, msg in (
        (PRESET, "does not match the context encoder"),
        ("configs/d2l.py:tiny", "reads contexts with its base model"),
    ):
        argv = ["train", "--config", preset, f"--workdir={tmp_path / 'w2'}", f"--ctx_model={base}"]
        assert main(argv) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert len(err) == 1 and msg in err[0], err
