"""D2L hypernetwork: stage-wise parity with the official code, modes, param counts, converter.

Reference: tests/fixtures/official/d2l (official ctx_to_lora, float32). Tolerances from its README:
resmlp_out rtol 1e-4 / atol 1e-5; head_out, A, B rtol 1e-4 / atol 1e-6.
"""

import json
import pickle
import subprocess
import sys
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import packed_d2l_row

from hyperlora_jax.cli import main as cli_main
from hyperlora_jax.convert.official_d2l import convert, read_official
from hyperlora_jax.errors import CheckpointError, ConfigError
from hyperlora_jax.hypernet.d2l.checkpoint import load_checkpoint
from hyperlora_jax.hypernet.d2l.model import (
    D2LConfig,
    HyperLoRA,
    count_params,
    generate_chunk_loras,
)
from hyperlora_jax.models.config import get_preset

D2L = "official/d2l"


@lru_cache(maxsize=1)
def _official(fixtures_dir):
    cfg, params, meta = read_official(fixtures_dir / D2L / "pytorch_model.bin")
    return params, cfg, meta, dict(np.load(fixtures_dir / D2L / "golden.npz"))


def test_config_read_from_pickle(fixtures_dir):
    _, cfg, meta, g = _official(fixtures_dir)
    assert cfg.num_layers == 3 and cfg.feature_size == 64 and cfg.latent_size == 32
    assert cfg.module_dims == (("down_proj", 128, 64),)
    assert cfg.rank == 8 and cfg.lora_alpha == pytest.approx(float(g["lora_alpha"]), abs=0)
    assert cfg.num_blocks == 2 and cfg.n_latent_queries == 8 and cfg.layer_to_layer
    assert meta["base_model"] == "tiny-gemma2"
    assert count_params(cfg) == 618_672  # meta.json hypernet_float_params


def test_heads_match_official_stagewise(fixtures_dir):
    params, cfg, _, g = _official(fixtures_dir)
    m, v = HyperLoRA(cfg), {"params": params}
    res = m.apply(v, jnp.asarray(g["agg_out"]), method=HyperLoRA.resmlp)
    np.testing.assert_allclose(np.asarray(res), g["resmlp_out"], rtol=1e-4, atol=1e-5)
    hin = m.apply(v, jnp.asarray(g["agg_out"]), method=HyperLoRA.head_inputs)
    np.testing.assert_allclose(np.asarray(hin), g["head_in"], rtol=1e-4, atol=1e-5)
    hout = m.apply(v, jnp.asarray(g["head_in"]), method=HyperLoRA.head_outputs)
    np.testing.assert_allclose(np.asarray(hout), g["head_out"], rtol=1e-4, atol=1e-6)
    a, b = m.apply(v, jnp.asarray(g["head_out"]), method=HyperLoRA.split_head)
    np.testing.assert_allclose(np.asarray(a["down_proj"]), g["A__down_proj"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(b["down_proj"]), g["B__down_proj"], rtol=1e-4, atol=1e-6)


def test_features_to_loras_batched_and_iterative(fixtures_dir):
    """ctx_features -> A/B in every mode equal the official ones (rtol 1e-4): all layers at once
    (layer_group=0, training), the default group (all 3 fixture layers), groups of 2 (a remainder
    group of 1), and iterative (one layer at a time); each within 1e-5 of all-at-once."""
    params, cfg, _, g = _official(fixtures_dir)
    feats = jnp.asarray(g["ctx_features"])
    mask = jnp.asarray(g["ctx_attn_mask"]).astype(bool)
    assert cfg.num_layers == 3
    a, b = generate_chunk_loras(params, cfg, feats, mask, layer_group=0)
    for x, key in ((a, "A"), (b, "B")):
        np.testing.assert_allclose(
            np.asarray(x["down_proj"]), g[f"{key}__down_proj"], rtol=1e-4, atol=1e-6
        )
    for kw in ({}, {"layer_group": 2}, {"iterative": True}):
        ai, bi = generate_chunk_loras(params, cfg, feats, mask, **kw)
        for got, want in ((ai, a), (bi, b)):
            np.testing.assert_allclose(
                np.asarray(got["down_proj"]), np.asarray(want["down_proj"]), atol=1e-5, err_msg=kw
            )


@pytest.mark.parametrize(
    "preset, kw, expected, exact",
    [
        ("gemma-2-2b-it", {}, 315_237_792, True),
        (
            "gemma-2-2b-it",
            dict(ctx_encoder_type="early_exit", n_latent_queries=208, num_blocks=8),
            309_672_864,
            True,
        ),
        ("qwen3-4b-instruct-2507", {}, 421.0e6, False),
        ("mistral-7b-instruct-v0.2", {}, 574.2e6, False),
    ],
)
def test_official_param_counts(preset, kw, expected, exact):
    n = count_params(D2LConfig.for_base(get_preset(preset), **kw))
    if exact:
        assert n == expected
    else:
        assert abs(n - expected) / expected < 1e-3


def test_config_errors():
    with pytest.raises(ConfigError, match="ctx_encoder_type"):
        D2LConfig(
            num_layers=2,
            feature_size=8,
            module_dims=(("down_proj", 16, 8),),
            ctx_encoder_type="pooler",
        )
    with pytest.raises(ConfigError, match="sorted"):
        D2LConfig(num_layers=2, feature_size=8, module_dims=(("v_proj", 8, 8), ("q_proj", 8, 8)))
    with pytest.raises(ConfigError, match="unknown target"):
        D2LConfig(num_layers=2, feature_size=8, module_dims=(("lm_head", 8, 8),))


def test_convert_official_roundtrip(fixtures_dir, tmp_path):
    src = fixtures_dir / D2L / "pytorch_model.bin"
    out = tmp_path / "ckpt"
    assert cli_main(["convert", "official-d2l", str(src), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["d2l_config.json", "params.safetensors"]
    meta = json.loads((out / "d2l_config.json").read_text())
    assert meta["base_model"] == "tiny-gemma2"
    assert meta["lora"] == {
        "r": 8,
        "alpha": pytest.approx(45.254834),
        "target_modules": ["down_proj"],
    }
    assert meta["ctx_encoder"]["type"] == "per_layer_activations"
    assert meta["num_params"] == 618_672
    cfg, params, _ = load_checkpoint(out)
    ref, ref_cfg, _, _ = _official(fixtures_dir)
    assert cfg == ref_cfg
    jax.tree.map(np.testing.assert_array_equal, params, ref)
    # EinMix bias [1, L, 1, 1, d] squeezed; nn.Linear transposed.
    assert params["layers_0"]["b1"].shape == (3, 128)
    assert params["aggregator"]["modality_projection"]["down_proj"]["kernel"].shape == (256, 32)


def _torch_save(obj, path):
    torch = pytest.importorskip("torch")
    torch.save(obj, path)


def test_convert_rejects_non_d2l_pickle(tmp_path):
    torch = pytest.importorskip("torch")
    src = tmp_path / "plain.bin"
    _torch_save({"weight": torch.zeros(2, 2)}, src)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="not an official Doc-to-LoRA checkpoint"):
        convert(src, out)
    assert not out.exists()
    assert cli_main(["convert", "official-d2l", str(src), str(out)]) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


class _Evil:
    def __reduce__(self):
        return (subprocess.call, ([sys.executable, "-c", "open('PWNED','w')"],))


def test_convert_rejects_malicious_pickle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "evil.bin"
    src.write_bytes(pickle.dumps({"hypernet_config": _Evil()}))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("encoder", ["per_layer_activations", "early_exit"])
def test_training_and_inference_write_the_same_chunk_loras(encoder):
    """One D2L forward: the training loss (packed context rows, projection before the chunks are
    cut out) and DocToLoRA (one padded row per chunk) give the same per-chunk LoRAs and bias.
    Both run in f32; they differ only in summation order: rtol 1e-5, atol 1e-6."""
    from hyperlora_jax.hypernet.d2l.api import DocToLoRA
    from hyperlora_jax.hypernet.d2l.model import bias_lora, init_params
    from hyperlora_jax.models.testing import tiny_model
    from hyperlora_jax.train.d2l_loss import make_d2l_loss

    cfg, base = tiny_model(num_layers=3)
    hcfg = D2LConfig.for_base(
        cfg, latent_size=16, n_latent_queries=4, num_blocks=1, rank=2, scaler_b_init=0.5,
        ctx_encoder_type=encoder, early_exit_layer=2 if encoder == "early_exit" else None,
    )  # fmt: skip
    hyper = init_params(hcfg, jax.random.key(1))
    # the official init has B = bias = 0: give them values so both paths are really compared
    hyper = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "bias" in jax.tree_util.keystr(p).lower() else x, hyper
    )
    row, items = packed_d2l_row(cfg.vocab_size)
    loss = make_d2l_loss(hcfg, cfg, objective="ce", max_chunk_len=8)
    train_ad, _ = jax.jit(loss.adapter_fn)(hyper, base, row)  # [1, C + 1, L, r, d]

    d2l = DocToLoRA(hcfg, hyper, base, cfg)
    chunks = [c for it in items for c in it["ctx_chunks"]]
    a, b = d2l.chunk_loras(chunks)  # [N, L, r, d]
    ba, bb = bias_lora(hyper, hcfg)
    n = len(chunks)
    assert list(np.asarray(row["chunk_context"][0, :n])) == [0, 0, 1]
    for m in hcfg.modules:
        for got, want, bias in ((train_ad.a[m], a[m], ba[m]), (train_ad.b[m], b[m], bb[m])):
            np.testing.assert_allclose(got[0, :n], want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got[0, -1], bias, rtol=1e-5, atol=1e-6)
    m = hcfg.modules[0]
    assert np.abs(np.asarray(b[m])).max() > 0 and np.abs(np.asarray(bb[m])).max() > 0


def test_config_files_written_with_the_old_rank_name_still_load():
    """d2l_config.json files written before D2L and T2L shared one vocabulary say `lora_r`."""
    from hyperlora_jax.models.testing import tiny_config

    cfg = D2LConfig.for_base(tiny_config(), rank=4)
    old = {("lora_r" if k == "rank" else k): v for k, v in cfg.to_json().items()}
    assert D2LConfig.from_json(old) == cfg
