"""Parity of our decoder with transformers 5.24 (eager attention, float32) on tiny random models.

Reference: transformers' {Llama,Mistral,Qwen2,Qwen3,Gemma2,Gemma3}ForCausalLM. Tolerance: max abs
error 1e-4 on logits and hidden states (observed errors are ~3e-6).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import SLIDING_WINDOW, make_tiny_hf, to_jax

from hyperlora_jax.errors import InputError
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.models.config import FAMILIES
from hyperlora_jax.models.transformer import forward_jit as forward
from hyperlora_jax.models.transformer import init_cache

TOL = 1e-4
T = 12  # > SLIDING_WINDOW


@functools.cache
def _tiny(family):
    import tempfile

    model, _ = make_tiny_hf(family)
    with tempfile.TemporaryDirectory() as d:
        cfg, params = to_jax(model, d)
    return model, cfg, params


@pytest.fixture(params=FAMILIES)
def tiny(request):
    return _tiny(request.param)


def _hf(model, tokens, **kw):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens)), **kw)


def _tokens(b, t, seed=0):
    return np.random.RandomState(seed).randint(3, 128, size=(b, t)).astype(np.int32)


def test_padding_packing_and_hidden_states_match_transformers(tiny):
    """Row 0 right-padded, row 1 left-padded, row 2 two packed segments; each real token must
    match transformers run on that sequence alone. Hidden states follow output_hidden_states."""
    model, cfg, params = tiny
    assert T > SLIDING_WINDOW
    toks = _tokens(3, T)
    seg = np.ones((3, T), np.int32)
    seg[0, 8:] = 0  # right padding: 8 real tokens
    seg[1, :3] = 0  # left padding: 9 real tokens
    seg[2, 7:] = 2  # packed: segments of 7 and 5 tokens
    out = forward(params, cfg, toks, segment_ids=seg, return_hidden_states=True)
    logits, hs = np.asarray(out.logits), np.asarray(out.hidden_states)
    assert hs.shape == (3, cfg.num_layers + 1, T, cfg.hidden_size)
    pieces = [(0, slice(0, 8)), (1, slice(3, T)), (2, slice(0, 7)), (2, slice(7, T))]
    for row, sl in pieces:
        ref = _hf(model, toks[row : row + 1, sl], output_hidden_states=True)
        np.testing.assert_allclose(logits[row, sl], ref.logits[0].numpy(), atol=TOL, rtol=0)
        ref_hs = np.stack([h[0].numpy() for h in ref.hidden_states])
        np.testing.assert_allclose(hs[row, :, sl], ref_hs, atol=TOL, rtol=0)

    # transformers' own padded batch (attention_mask + position_ids, as generate() builds them)
    mask = torch.tensor(seg[:2] != 0).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = _hf(model, toks[:2], attention_mask=mask, position_ids=pos)
    valid = seg[:2] != 0
    np.testing.assert_allclose(logits[:2][valid], ref.logits.numpy()[valid], atol=TOL, rtol=0)


def test_last_hidden_state_is_final_normed(tiny):
    """transformers 5.24 convention (checked here on the reference itself): hidden_states[-1] is
    norm(output of the last layer); entries 0..L-1 are the un-normed residual stream."""
    model, cfg, params = tiny
    toks = _tokens(1, T, seed=1)
    seen = {}
    hook = model.model.layers[-1].register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    try:
        ref = _hf(model, toks, output_hidden_states=True)
    finally:
        hook.remove()
    last = seen["x"][0] if isinstance(seen["x"], tuple) else seen["x"]
    with torch.no_grad():
        torch.testing.assert_close(ref.hidden_states[-1], model.model.norm(last), rtol=0, atol=1e-6)
    assert len(ref.hidden_states) == cfg.num_layers + 1


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_early_exit_equals_first_hidden_states(family):
    """num_layers=k returns the first k entries of the full run, then final_norm(entry k)."""
    model, cfg, params = _tiny(family)
    toks = _tokens(2, T, seed=2)
    full = np.asarray(forward(params, cfg, toks, return_hidden_states=True).hidden_states)
    k = 2
    out = forward(params, cfg, toks, num_layers=k, return_hidden_states=True, return_logits=False)
    assert out.logits is None
    hs = np.asarray(out.hidden_states)
    assert hs.shape == (2, k + 1, T, cfg.hidden_size)
    np.testing.assert_allclose(hs[:, :k], full[:, :k], atol=TOL, rtol=0)
    with torch.no_grad():
        normed = model.model.norm(torch.tensor(np.array(full[:, k]))).numpy()
    np.testing.assert_allclose(hs[:, k], normed, atol=TOL, rtol=0)


@pytest.mark.parametrize("k", [2, None])
def test_layer_fn_consumes_each_hidden_state(tiny, k):
    """forward(layer_fn=f) stacks f(entry, index) over the k+1 entries return_hidden_states gives
    (early exit or all layers), and returns no hidden states itself."""
    _, cfg, params = tiny
    toks = _tokens(2, T, seed=2)
    full = forward(params, cfg, toks, num_layers=k, return_hidden_states=True, return_logits=False)
    out = forward(
        params, cfg, toks, num_layers=k, return_logits=False,
        layer_fn=lambda h, i: (jnp.sum(h * h, axis=1), i),
    )  # fmt: skip
    assert out.hidden_states is None
    sums, index = out.layer_outputs
    n = full.hidden_states.shape[1]
    np.testing.assert_array_equal(np.asarray(index), np.arange(n))
    want = np.sum(np.asarray(full.hidden_states) ** 2, axis=2).swapaxes(0, 1)  # [k+1, B, H]
    np.testing.assert_allclose(np.asarray(sums), want, rtol=1e-5, atol=0)


def test_cached_decoding_matches_full_forward(tiny):
    """Prefill 8 tokens (row 1 left-padded by 2) into a 16-slot cache, then 4 single-token steps;
    logits equal the uncached forward over the whole sequence (windows of 4 < 12 tokens)."""
    _, cfg, params = tiny
    toks = _tokens(2, T, seed=3)
    seg = np.ones((2, T), np.int32)
    seg[1, :2] = 0
    full = np.asarray(forward(params, cfg, toks, segment_ids=seg).logits)

    cache = init_cache(cfg, batch=2, max_len=16)
    out = forward(params, cfg, toks[:, :8], segment_ids=seg[:, :8], cache=cache)
    got = [np.asarray(out.logits)]
    cache = out.cache
    for i in range(8, T):
        out = forward(params, cfg, toks[:, i : i + 1], segment_ids=seg[:, i : i + 1], cache=cache)
        got.append(np.asarray(out.logits))
        cache = out.cache
    got = np.concatenate(got, axis=1)
    valid = seg != 0
    np.testing.assert_allclose(got[valid], full[valid], atol=TOL, rtol=0)
    assert np.asarray(cache["end"]).tolist() == [T, T]
    assert np.asarray(cache["next_position"]).tolist() == [T, T - 2]


def _random_adapter(cfg, modules, rank=3, batch=(), seed=0, scale=0.7):
    rng = np.random.RandomState(seed)
    a, b = {}, {}
    for m in modules:
        d_in, d_out = cfg.module_dims(m)
        a[m] = jnp.asarray(rng.randn(*batch, cfg.num_layers, rank, d_in).astype(np.float32) * 0.1)
        b[m] = jnp.asarray(rng.randn(*batch, cfg.num_layers, rank, d_out).astype(np.float32) * 0.1)
    return Adapter(a, b, scale)


def _merged_logits(model, cfg, adapter, toks, batch_idx=None):
    """transformers run with W + scale * A^T B merged into every targeted projection."""
    import copy

    merged = copy.deepcopy(model)
    for m in adapter.a:
        for layer in range(cfg.num_layers):
            a, b = adapter.a[m], adapter.b[m]
            if batch_idx is not None:
                a, b = a[batch_idx], b[batch_idx]
            delta = adapter.scale * np.asarray(b[layer]).T @ np.asarray(a[layer])  # [out, in]
            blk = merged.model.layers[layer]
            lin = getattr(
                blk.self_attn if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else blk.mlp,
                m,
            )
            with torch.no_grad():
                lin.weight += torch.as_tensor(delta)
    return _hf(merged, toks).logits.numpy()


def test_adapter_none_and_zero_adapter_are_the_base_model(tiny):
    _, cfg, params = tiny
    toks = _tokens(2, T, seed=4)
    base = np.asarray(forward(params, cfg, toks).logits)
    zero = _random_adapter(cfg, ["down_proj", "q_proj"])
    zero = Adapter(zero.a, {m: jnp.zeros_like(x) for m, x in zero.b.items()}, zero.scale)
    got = np.asarray(forward(params, cfg, toks, adapter=zero).logits)
    # exact zeros, but a different XLA program (fusion/tiling): observed 1.4e-6 on O(1) logits
    np.testing.assert_allclose(got, base, atol=1e-5, rtol=0)


def test_down_proj_adapter_equals_merged_weights(tiny):
    model, cfg, params = tiny
    toks = _tokens(2, T, seed=5)
    adapter = _random_adapter(cfg, ["down_proj"])
    got = np.asarray(forward(params, cfg, toks, adapter=adapter).logits)
    ref = _merged_logits(model, cfg, adapter, toks)
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    assert np.abs(ref - np.asarray(forward(params, cfg, toks).logits)).max() > 1e-2  # it matters


def test_per_sequence_and_per_token_adapters_on_all_modules():
    """[B, L, R, d] adapters (one per row) and [N, L, R, d] + adapter_index (one per packed
    segment) on all seven projections equal the merged reference of each row/segment."""
    model, cfg, params = _tiny("qwen2")  # qkv biases + sliding layers
    mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ad = _random_adapter(cfg, mods, batch=(2,), seed=6)
    toks = _tokens(2, T, seed=6)
    got = np.asarray(forward(params, cfg, toks, adapter=ad).logits)
    for i in range(2):
        ref = _merged_logits(model, cfg, ad, toks[i : i + 1], batch_idx=i)
        np.testing.assert_allclose(got[i], ref[0], atol=TOL, rtol=0)

    seg = np.ones((1, T), np.int32)
    seg[0, 5:] = 2
    index = jnp.asarray(seg - 1)
    packed = np.asarray(
        forward(params, cfg, toks[:1], segment_ids=seg, adapter=ad, adapter_index=index).logits
    )
    for i, sl in enumerate([slice(0, 5), slice(5, T)]):
        ref = _merged_logits(model, cfg, ad, toks[:1, sl], batch_idx=i)
        np.testing.assert_allclose(packed[0, sl], ref[0], atol=TOL, rtol=0)


def test_remat_and_bf16_run():
    _, cfg, params = _tiny("gemma2")
    toks = _tokens(1, T, seed=7)
    base = np.asarray(forward(params, cfg, toks).logits)
    remat = np.asarray(forward(params, cfg, toks, remat_policy="dots_saveable").logits)
    np.testing.assert_allclose(remat, base, atol=1e-6, rtol=0)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    low = np.asarray(forward(p16, cfg, toks, dtype=jnp.bfloat16).logits)
    assert low.dtype == np.float32 and np.abs(low - base).max() < 0.15
    from hyperlora_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown remat_policy 'bogus'"):
        forward(params, cfg, toks, remat_policy="bogus")


def test_adapter_validation_errors():
    _, cfg, params = _tiny("llama")
    toks = _tokens(1, 4)
    ad = _random_adapter(cfg, ["down_proj"])
    short = Adapter({"down_proj": ad.a["down_proj"][:2]}, {"down_proj": ad.b["down_proj"][:2]})
    with pytest.raises(InputError, match="has 2 layers but the model has 3"):
        forward(params, cfg, toks, adapter=short)
    bad = Adapter({"down_projx": ad.a["down_proj"]}, {"down_projx": ad.b["down_proj"]})
    with pytest.raises(InputError, match="unknown: \\['down_projx'\\]"):
        forward(params, cfg, toks, adapter=bad)
    wrong = Adapter({"q_proj": ad.a["down_proj"]}, {"q_proj": ad.b["down_proj"]})
    with pytest.raises(InputError, match="do not fit"):
        forward(params, cfg, toks, adapter=wrong)
    with pytest.raises(InputError, match="num_layers=7"):
        forward(params, cfg, toks, num_layers=7)


def test_loader_errors_and_sharded_checkpoints(tmp_path):
    """Missing/truncated/corrupt files, missing/extra/misshaped tensors and unsupported
    architectures raise errors naming the file or tensor; sharded checkpoints load the same."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    from hyperlora_jax.errors import CheckpointError, ConfigError
    from hyperlora_jax.models.hf import load_hf_model

    model, _ = make_tiny_hf("llama")
    ok = tmp_path / "ok"
    model.save_pretrained(str(ok))
    cfg, params = load_hf_model(ok)
    weights = load_file(str(ok / "model.safetensors"))

    def variant(name, tensors=None, raw=None, config=None):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(ok / "config.json", d / "config.json")
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        if tensors is not None:
            save_file(tensors, str(d / "model.safetensors"))
        if raw is not None:
            (d / "model.safetensors").write_bytes(raw)
        return d

    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_model(tmp_path / "nope")
    with pytest.raises(
        CheckpointError, match="no model.safetensors or model.safetensors.index.json"
    ):
        load_hf_model(variant("nofile"))
    blob = (ok / "model.safetensors").read_bytes()
    for name, raw in [("trunc", blob[: len(blob) // 2]), ("junk", b"\x00garbage" * 10)]:
        with pytest.raises(
            CheckpointError, match=f"{name}/model.safetensors.*truncated or corrupt"
        ):
            load_hf_model(variant(name, raw=raw))
    key = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
        load_hf_model(variant("missing", {k: v for k, v in weights.items() if k != key}))
    extra = {**weights, "model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match="unexpected tensor.*mlp.extra.weight"):
        load_hf_model(variant("extra", extra))
    conf = json.loads((ok / "config.json").read_text())
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model.layers.0.mlp.\w+_proj.weight' has shape \(\d+, \d+\), expected",
    ):
        load_hf_model(variant("shape", weights, config={**conf, "intermediate_size": 80}))
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        load_hf_model(variant("arch", weights, config={**conf, "model_type": "gpt2"}))

    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    cfg2, params2 = load_hf_model(sharded)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    (sharded / sorted(sharded.glob("model-*.safetensors"))[0].name).unlink()
    with pytest.raises(CheckpointError, match="missing weights file .*model-00001"):
        load_hf_model(sharded)


def test_state_dict_path_and_bf16_dtype():
    """params_from_torch_state_dict (used by the GGUF loader) equals the safetensors path;
    bf16 torch tensors convert bit-exactly."""
    from hyperlora_jax.models.hf import params_from_torch_state_dict

    model, cfg, params = _tiny("gemma3")
    sd = model.state_dict()
    got = params_from_torch_state_dict(cfg, sd)
    jax.tree.map(np.testing.assert_array_equal, got, params)
    # Gemma3ForConditionalGeneration layout (transformers 5): language_model prefix + vision tower
    mm = {k.replace("model.", "model.language_model.", 1): v for k, v in sd.items()}
    mm["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(2)
    got = params_from_torch_state_dict(cfg, mm)
    jax.tree.map(np.testing.assert_array_equal, got, params)
    bf = params_from_torch_state_dict(cfg, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    assert bf["embedding"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(bf["embedding"], np.float32),
        sd["model.embed_tokens.weight"].to(torch.bfloat16).float().numpy(),
    )


def test_official_d2l_fixture_base_model(fixtures_dir):
    """tests/fixtures/official/d2l (official ctx_to_lora code, transformers 4.51.3, fp32):
    our tiny-gemma2 forward reproduces the context encoder's per-layer activations (first L-1
    layers, last entry final-normed), the base logits, and the logits with the combined LoRA
    applied as delta = lora_alpha * (x A^T) B. Tolerances: the fixture README's, atol 1e-4."""
    from hyperlora_jax.models.hf import load_hf_model

    d2l = fixtures_dir / "official" / "d2l"
    g = np.load(d2l / "golden.npz")
    cfg, params = load_hf_model(d2l / "tiny-gemma2")
    assert cfg.family == "gemma2" and cfg.num_layers == 3

    mask = g["ctx_attn_mask"].astype(np.int32)
    out = forward(
        params,
        cfg,
        g["ctx_ids"].astype(np.int32),
        segment_ids=mask,
        num_layers=cfg.num_layers - 1,
        return_hidden_states=True,
        return_logits=False,
    )
    feats = np.asarray(out.hidden_states)  # [chunk, L, T, H]
    assert feats.shape == g["ctx_features"].shape
    real = mask.astype(bool)
    np.testing.assert_allclose(
        feats.transpose(0, 2, 1, 3)[real],
        g["ctx_features"].transpose(0, 2, 1, 3)[real],
        atol=1e-4,
        rtol=1e-4,
    )

    q = g["query_ids"].astype(np.int32)
    base = np.asarray(forward(params, cfg, q).logits)
    np.testing.assert_allclose(base, g["logits_base"], atol=1e-4, rtol=0)
    ad = Adapter(
        {"down_proj": jnp.asarray(g["combined_A__down_proj"])},
        {"down_proj": jnp.asarray(g["combined_B__down_proj"])},
        float(g["lora_alpha"]),
    )
    lora = np.asarray(forward(params, cfg, q, adapter=ad).logits)
    np.testing.assert_allclose(lora, g["logits_lora"], atol=1e-4, rtol=0)
