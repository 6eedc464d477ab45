"""Doc-to-LoRA end to end from text / token ids through our base model, against the official run.

Reference: tests/fixtures/official/d2l (official ctx_to_lora with the tiny Gemma-2 base, float32).
Tolerances (fixture README, end to end): ctx_features rtol/atol 1e-4; A/B rtol 1e-3, atol 1e-5;
logits atol 5e-4. Stage-wise (golden combined LoRA -> logits): rtol 1e-4, atol 1e-4.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax.api import load_d2l
from hyperlora_jax.cli import main as cli_main
from hyperlora_jax.convert.official_d2l import convert
from hyperlora_jax.errors import CheckpointError, InputError
from hyperlora_jax.hypernet.d2l.api import DocToLoRA, pad_chunks
from hyperlora_jax.hypernet.d2l.checkpoint import load_checkpoint
from hyperlora_jax.hypernet.d2l.model import context_features, generate_chunk_loras, init_params
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.lora.storage import load_adapter

D2L = "official/d2l"


@pytest.fixture(scope="module")
def setup(fixtures_dir):
    d2l = load_d2l(fixtures_dir / D2L / "pytorch_model.bin")
    meta = json.loads((fixtures_dir / D2L / "meta.json").read_text())
    return d2l, meta, dict(np.load(fixtures_dir / D2L / "golden.npz"))


def test_end_to_end_matches_official(setup):
    d2l, meta, g = setup
    n = int(g["max_ctx_chunk_len"])
    chunks = [d2l.chunk_document(doc, n) for doc in meta["docs"]]
    assert [len(c) for c in chunks] == g["n_ctx_chunks"].tolist()
    flat = [c for cs in chunks for c in cs]
    tokens, mask = pad_chunks(flat)
    np.testing.assert_array_equal(tokens, g["ctx_ids"])
    feats = context_features(
        d2l.ctx_params, d2l.ctx_config, d2l.config, jnp.asarray(tokens), jnp.asarray(mask)
    )
    np.testing.assert_allclose(np.asarray(feats), g["ctx_features"], rtol=1e-4, atol=1e-4)

    a, b = d2l.chunk_loras(flat)
    np.testing.assert_allclose(np.asarray(a["down_proj"]), g["A__down_proj"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(b["down_proj"]), g["B__down_proj"], rtol=1e-3, atol=1e-5)

    ad = d2l.internalize(meta["docs"], n)
    assert ad.a["down_proj"].shape == (2, 3, (3 + 1) * 8, 128)
    assert ad.scale == pytest.approx(float(g["lora_alpha"]), rel=1e-12)
    for k, x in (("A", ad.a), ("B", ad.b)):
        np.testing.assert_allclose(
            np.asarray(x["down_proj"]), g[f"combined_{k}__down_proj"], rtol=1e-3, atol=1e-5
        )
    logits = d2l.logits(g["query_ids"], ad)
    np.testing.assert_allclose(np.asarray(logits), g["logits_lora"], rtol=0, atol=5e-4)
    # The LoRA matters: the adapted logits are far from the base ones.
    assert np.abs(g["logits_lora"] - g["logits_base"]).max() > 0.1

    # Stage-wise: golden combined LoRA -> our base model with the adapter.
    golden = Adapter(
        {"down_proj": jnp.asarray(g["combined_A__down_proj"])},
        {"down_proj": jnp.asarray(g["combined_B__down_proj"])},
        float(g["lora_alpha"]),
    )
    np.testing.assert_allclose(
        np.asarray(d2l.logits(g["query_ids"], golden)), g["logits_lora"], rtol=1e-4, atol=1e-4
    )

    # Batched over documents: the 1-chunk document's extra ranks are exact zeros.
    assert not np.asarray(ad.a["down_proj"][0, :, 16:]).any()
    assert not np.asarray(ad.b["down_proj"][0, :, 16:]).any()

    # Iterative mode (each layer's LoRA made inside the encoder's layer scan): the same adapter.
    it = d2l.internalize(meta["docs"], n, iterative=True)
    for got, want in ((it.a, ad.a), (it.b, ad.b)):
        np.testing.assert_allclose(
            np.asarray(got["down_proj"]), np.asarray(want["down_proj"]), rtol=1e-4, atol=1e-6
        )


def test_converted_checkpoint_gives_same_adapter(setup, fixtures_dir, tmp_path):
    d2l, meta, _ = setup
    out = convert(fixtures_dir / D2L / "pytorch_model.bin", tmp_path / "ckpt")
    ours = DocToLoRA.from_checkpoint(
        out, base_model=(d2l.base_config, d2l.base_params), tokenizer=d2l.tokenizer
    )
    x, y = ours.internalize(meta["docs"], 60), d2l.internalize(meta["docs"], 60)
    np.testing.assert_array_equal(np.asarray(x.a["down_proj"]), np.asarray(y.a["down_proj"]))
    # Several documents composed into one adapter: all chunks (1 + 3), then the bias once.
    both = ours.internalize(meta["docs"], 60, combine=True)
    assert both.a["down_proj"].shape == (3, (1 + 3 + 1) * 8, 128)
    np.testing.assert_array_equal(
        np.asarray(both.a["down_proj"][:, :8]), np.asarray(x.a["down_proj"][0, :, :8])
    )
    np.testing.assert_array_equal(
        np.asarray(both.a["down_proj"][:, 8:]), np.asarray(x.a["down_proj"][1])
    )
    saved = ours.save(tmp_path / "saved")
    cfg, params, meta2 = load_checkpoint(saved)
    assert cfg == d2l.config and meta2["base_model"] == "tiny-gemma2"
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, d2l.params))


def test_official_init_equals_base_model(setup):
    """scaler_B = bias_B = 0 at init: the adapted model is exactly the base model."""
    d2l, meta, g = setup
    params = jax.jit(init_params, static_argnums=0)(d2l.config, jax.random.key(0))
    fresh = DocToLoRA(d2l.config, params, d2l.base_params, d2l.base_config, d2l.tokenizer)
    ad = fresh.internalize(meta["docs"], 60)
    assert ad.rank == 4 * 8 and np.asarray(ad.a["down_proj"]).any()
    assert not np.asarray(ad.b["down_proj"]).any()
    q = g["query_ids"]
    np.testing.assert_array_equal(np.asarray(fresh.logits(q, ad)), np.asarray(fresh.logits(q)))


def test_wrong_base_model_is_refused(setup, fixtures_dir):
    d2l, _, _ = setup
    import dataclasses

    other = dataclasses.replace(d2l.base_config, num_layers=2, layer_types=())
    with pytest.raises(CheckpointError, match="trained for a base model"):
        load_d2l(fixtures_dir / D2L / "pytorch_model.bin", base_model=(other, d2l.base_params))
    wider = dataclasses.replace(d2l.base_config, intermediate_size=256)
    with pytest.raises(CheckpointError, match="trained for a base model"):
        load_d2l(fixtures_dir / D2L / "pytorch_model.bin", base_model=(wider, d2l.base_params))


def test_official_file_loads_through_the_facade_only(fixtures_dir):
    """hypernet/ never imports convert/: DocToLoRA reads our folders, load_d2l also .bin files."""
    with pytest.raises(CheckpointError, match="convert official-d2l.*load_d2l"):
        DocToLoRA.from_checkpoint(fixtures_dir / D2L / "pytorch_model.bin")


def test_cli_internalize(setup, fixtures_dir, tmp_path):
    d2l, meta, _ = setup
    docs = []
    for i, text in enumerate(meta["docs"]):
        docs += ["--doc", str(tmp_path / f"doc{i}.txt")]
        (tmp_path / f"doc{i}.txt").write_text(text)
    out = tmp_path / "adapter"
    ckpt = str(fixtures_dir / D2L / "pytorch_model.bin")
    assert (
        cli_main(
            [
                "internalize",
                "--hypernet",
                ckpt,
                *docs,
                "--out",
                str(out),
                "--chunk-size",
                "60",
                "--iterative",
            ]
        )
        == 0
    )
    ad = load_adapter(out)
    ref = d2l.internalize(meta["docs"], 60)
    assert ad.rank == 32 and ad.scale == pytest.approx(ref.scale)
    assert ad.a["down_proj"].shape == (2, 3, 32, 128)
    np.testing.assert_allclose(
        np.asarray(ad.a["down_proj"]), np.asarray(ref.a["down_proj"]), atol=1e-5
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert (
        cli_main(
            [
                "internalize",
                "--hypernet",
                ckpt,
                "--doc",
                str(empty),
                "--out",
                str(tmp_path / "never"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "never").exists()


def test_generate_with_adapter(setup):
    d2l, meta, _ = setup
    """Greedy answers with a per-document adapter; the adapter changes the tokens generated."""
    ad = d2l.internalize(meta["docs"], 60)
    with_doc = d2l.generate(meta["questions"], ad, max_new_tokens=4)
    plain = d2l.generate(meta["questions"], None, max_new_tokens=4)
    assert len(with_doc) == 2 and all(isinstance(t, str) for t in with_doc)
    assert with_doc != plain
    with pytest.raises(InputError, match="one question per internalized document"):
        d2l.generate(meta["questions"][0], ad)


def test_early_exit_encoder(setup):
    """Early exit: one final-normed feature map after k layers; it equals the last entry of the
    l2l encoder truncated to k layers (both are HF last_hidden_state of the k-layer model)."""
    import dataclasses

    d2l, meta, g = setup
    ee = dataclasses.replace(d2l.config, ctx_encoder_type="early_exit", early_exit_layer=1)
    l2l = dataclasses.replace(d2l.config, num_layers=2, ctx_encoder_last_layer=2)
    tokens, mask = jnp.asarray(g["ctx_ids"]), jnp.asarray(g["ctx_attn_mask"]).astype(bool)
    f_ee = context_features(d2l.ctx_params, d2l.ctx_config, ee, tokens, mask)
    f_l2l = context_features(d2l.ctx_params, d2l.ctx_config, l2l, tokens, mask)
    assert f_ee.shape == (4, 65, 64) and f_l2l.shape == (4, 2, 65, 64)
    np.testing.assert_array_equal(np.asarray(f_ee), np.asarray(f_l2l[:, -1]))
    np.testing.assert_array_equal(np.asarray(f_l2l[:, 0]), np.asarray(g["ctx_features"][:, 0]))
    # An early-exit hypernetwork reads that one map and writes LoRAs for all L layers.
    assert ee.perceiver_config().n_output_queries == 3 * 8
    params = dict(d2l.params)
    agg = dict(params["aggregator"])
    agg["decoder"] = {**agg["decoder"], "latents_q": jnp.tile(agg["decoder"]["latents_q"], (3, 1))}
    params["aggregator"] = agg
    a, b = generate_chunk_loras(params, ee, f_ee, mask)
    assert a["down_proj"].shape == (4, 3, 8, 128) and b["down_proj"].shape == (4, 3, 8, 64)
    assert np.isfinite(np.asarray(a["down_proj"])).all()
