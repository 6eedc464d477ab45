"""Adapter algebra, validation, storage and dense merge (reference: numpy W + scale*A^T B)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax.errors import CheckpointError, InputError
from hyperlora_jax.lora import adapter as ad
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.lora.storage import load_adapter, save_adapter
from hyperlora_jax.models.testing import tiny_config

CFG = tiny_config(vocab_size=256, hidden_size=64, intermediate_size=128, head_dim=16)


def rand_adapter(
    seed, modules=("q_proj", "v_proj", "down_proj"), rank=4, batch=(), scale=0.7, cfg=CFG
):
    keys = jax.random.split(jax.random.key(seed), 2 * len(modules))
    a, b = {}, {}
    for i, m in enumerate(modules):
        d_in, d_out = cfg.module_dims(m)
        a[m] = jax.random.normal(keys[2 * i], (*batch, cfg.num_layers, rank, d_in)) * 0.1
        b[m] = jax.random.normal(keys[2 * i + 1], (*batch, cfg.num_layers, rank, d_out)) * 0.1
    return Adapter(a, b, scale)


def dense(adapter):
    return {m: np.asarray(x) for m, x in ad.to_dense_delta(adapter).items()}


def assert_same_delta(x, y, atol=1e-6):
    dx, dy = dense(x), dense(y)
    for m in set(dx) | set(dy):
        ref = dx.get(m, np.zeros_like(dy.get(m)))
        got = dy.get(m, np.zeros_like(ref))
        np.testing.assert_allclose(got, ref, atol=atol, err_msg=m)


# ----------------------------------------------------------------- algebra


def test_concat_is_sum_with_scalars_scales_and_missing_modules():
    x = rand_adapter(0, ("q_proj", "v_proj"), rank=4, scale=0.5)
    y = rand_adapter(1, ("v_proj", "down_proj"), rank=2, scale=3.0)
    c = ad.concat([x, y], scalars=[2.0, -1.5])
    assert c.scale == 0.5 and c.a["v_proj"].shape[-2] == 6 and c.a["q_proj"].shape[-2] == 6
    dx, dy, dc = dense(x), dense(y), dense(c)
    np.testing.assert_allclose(dc["v_proj"], 2 * dx["v_proj"] - 1.5 * dy["v_proj"], atol=1e-6)
    np.testing.assert_allclose(dc["q_proj"], 2 * dx["q_proj"], atol=1e-6)
    np.testing.assert_allclose(dc["down_proj"], -1.5 * dy["down_proj"], atol=1e-6)
    # Scalars are linear (they scale A only), so they can be traced and differentiated.
    g = jax.grad(lambda s: ad.to_dense_delta(ad.concat([x, y], [s, 1.0]))["q_proj"].sum())(1.0)
    np.testing.assert_allclose(g, dx["q_proj"].sum(), rtol=1e-5)


def test_concat_broadcasts_shared_part_over_batch():
    chunks = rand_adapter(0, ("down_proj",), rank=4, batch=(3,))
    bias = rand_adapter(1, ("down_proj",), rank=4)
    c = ad.concat([chunks, bias])
    assert c.batch_shape == (3,) and c.rank == 8
    for i, part in enumerate(ad.unstack(c)):
        ref = dense(ad.unstack(chunks)[i])["down_proj"] + dense(bias)["down_proj"]
        np.testing.assert_allclose(dense(part)["down_proj"], ref, atol=1e-6)


def test_concat_batch_folds_chunks_into_rank():
    chunks = rand_adapter(0, ("down_proj",), rank=2, batch=(2, 3))  # 2 contexts x 3 chunks
    s = jnp.array([[1.0, 0.5, 0.0], [2.0, 1.0, -1.0]])  # context 0 has only 2 real chunks
    c = ad.concat_batch(chunks, s)
    assert c.batch_shape == (2,) and c.rank == 6
    d = dense(chunks)["down_proj"]
    ref = np.einsum("gk,gklio->glio", np.asarray(s), d)
    np.testing.assert_allclose(dense(c)["down_proj"], ref, atol=1e-6)
    # Same as concat of the chunks in order.
    ctx0 = [ad.unstack(ad.unstack(chunks)[0])[k] for k in range(3)]
    assert_same_delta(ad.concat(ctx0, [1.0, 0.5, 0.0]), ad.unstack(c)[0])


def test_pad_rank_scale_with_scale_are_exact():
    x = rand_adapter(0)
    assert_same_delta(x, ad.pad_rank(x, 9))
    assert ad.pad_rank(x, 9).rank == 9
    with pytest.raises(InputError, match="pad"):
        ad.pad_rank(x, 2)
    s = ad.scale(x, 3.0)
    for m, d in dense(x).items():
        np.testing.assert_allclose(dense(s)[m], 3 * d, atol=1e-6)
    w = ad.with_scale(x, 2.0)
    assert w.scale == 2.0
    assert_same_delta(x, w)


def test_stack_unstack_ragged_ranks():
    x = rand_adapter(0, rank=2, scale=1.0)
    y = rand_adapter(1, rank=5, scale=4.0)
    s = ad.stack([x, y])
    assert s.batch_shape == (2,) and s.rank == 5 and s.scale == 1.0
    px, py = ad.unstack(s)
    assert_same_delta(x, px)
    assert_same_delta(y, py)
    with pytest.raises(InputError, match="batch axis"):
        ad.unstack(x)


def test_zeros_and_init_match_peft_init():
    z = ad.zeros(CFG, ["q_proj"], 4, batch_shape=(2,))
    assert z.a["q_proj"].shape == (2, 2, 4, 64) and float(jnp.abs(z.a["q_proj"]).sum()) == 0
    i = ad.init(jax.random.key(0), CFG, ["q_proj", "down_proj"], 8, scale=2.0)
    assert float(jnp.abs(i.b["down_proj"]).max()) == 0.0
    a = np.asarray(i.a["down_proj"])  # d_in = 128: U(-1/sqrt(128), 1/sqrt(128))
    assert a.max() <= 1 / np.sqrt(128) and a.min() >= -1 / np.sqrt(128)
    assert a.std() == pytest.approx(1 / np.sqrt(128) / np.sqrt(3), rel=0.1)
    ad.validate(i, CFG)


# ----------------------------------------------------------------- validation


def test_validate_rejects_bad_adapters():
    good = rand_adapter(0)
    ad.validate(good, CFG)
    with pytest.raises(InputError, match="unknown target module 'w_proj'"):
        ad.validate(Adapter({"w_proj": good.a["q_proj"]}, {"w_proj": good.b["q_proj"]}), CFG)
    with pytest.raises(InputError, match="q_proj.*disagree"):
        ad.validate(Adapter({"q_proj": good.a["q_proj"]}, {"q_proj": good.b["q_proj"][:, :3]}))
    with pytest.raises(InputError, match="widths"):
        ad.validate(Adapter({"q_proj": good.a["q_proj"]}, {"q_proj": good.b["v_proj"]}), CFG)
    # An adapter for a 26-layer model given to a 30-layer model.
    cfg26, cfg30 = CFG.replace(num_layers=26), CFG.replace(num_layers=30)
    with pytest.raises(InputError, match="26 layers but the llama model has 30"):
        ad.validate(ad.zeros(cfg26, ["v_proj"], 2), cfg30)
    bad = good.a["v_proj"].at[1, 0, 3].set(jnp.nan)
    with pytest.raises(InputError, match="v_proj: A holds 1 NaN/Inf"):
        ad.validate(Adapter({**good.a, "v_proj": bad}, good.b), CFG)
    with pytest.raises(InputError, match="different modules"):
        ad.validate(Adapter(good.a, {"q_proj": good.b["q_proj"]}))
    with pytest.raises(InputError, match="scale"):
        ad.validate(Adapter(good.a, good.b, float("inf")))


# ----------------------------------------------------------------- native storage


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    x = ad.cast(rand_adapter(0, batch=(2,)), dtype)
    save_adapter(x, tmp_path / "ad", {"base_model": "tiny", "source": "test"})
    y = load_adapter(tmp_path / "ad")
    assert y.scale == x.scale and y.modules == x.modules and y.dtype == dtype
    for m in x.modules:
        np.testing.assert_array_equal(np.asarray(y.a[m]), np.asarray(x.a[m]))
        np.testing.assert_array_equal(np.asarray(y.b[m]), np.asarray(x.b[m]))
    with pytest.raises(InputError, match="not empty"):
        save_adapter(x, tmp_path / "ad")
    save_adapter(ad.scale(x, 2.0), tmp_path / "ad", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temp leftovers


def test_load_corrupt_adapter_names_the_file(tmp_path):
    save_adapter(rand_adapter(0), tmp_path / "ad")
    w = tmp_path / "ad" / "adapter.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="adapter.safetensors"):
        load_adapter(tmp_path / "ad")
    (tmp_path / "ad" / "adapter.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter.json"):
        load_adapter(tmp_path / "ad")
    with pytest.raises(CheckpointError, match="no adapter.json"):
        load_adapter(tmp_path)


# ----------------------------------------------------------------- application through the decoder

FWD_CFG = CFG.replace(intermediate_size=96, num_layers=2, vocab_size=128)


@pytest.fixture(scope="module")
def base():
    from hyperlora_jax.models import transformer

    params = transformer.init_params(FWD_CFG, jax.random.key(0))
    # Kernels of normal(0.02) make LoRA effects tiny; bigger factors keep the checks meaningful.
    fwd = jax.jit(
        lambda p, tok, adapter=None, seg=None, idx=None: (
            transformer.forward(
                p, FWD_CFG, tok, adapter=adapter, segment_ids=seg, adapter_index=idx
            ).logits
        )
    )
    return params, fwd


def fwd_adapter(seed, rank=4, batch=(), modules=("q_proj", "v_proj", "o_proj", "down_proj")):
    return rand_adapter(seed, modules, rank=rank, batch=batch, scale=2.0, cfg=FWD_CFG)


def tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 3, FWD_CFG.vocab_size)


def test_per_example_adapters_equal_separate_runs(base):
    params, fwd = base
    parts = [fwd_adapter(i) for i in range(3)]
    tok = tokens(0, (3, 6))
    batched = fwd(params, tok, ad.stack(parts))
    plain = fwd(params, tok)
    assert float(jnp.abs(batched - plain).max()) > 1e-2  # the adapters matter
    for i, part in enumerate(parts):
        single = fwd(params, tok[i : i + 1], part)
        np.testing.assert_allclose(batched[i], single[0], atol=1e-5, rtol=0)


def test_packed_segments_with_own_adapters_equal_separate_runs(base):
    """Two packed rows; each segment uses its own adapter, chosen from a global set [N, ...]
    or from the row's own set [B, N, ...]. Each segment equals a run of it alone."""
    params, fwd = base
    parts = [fwd_adapter(10 + i) for i in range(3)]
    layout = [[(3, 0), (5, 1)], [(4, 2), (2, 0)]]  # (length, adapter) per segment; T = 8
    rows, segs, idx_global, idx_row, singles = [], [], [], [], []
    for r, row in enumerate(layout):
        toks, seg, ig, ir = [], [], [], []
        for j, (n, which) in enumerate(row):
            t = tokens(20 + 2 * r + j, (1, n))
            toks.append(t)
            seg += [j + 1] * n
            ig += [which] * n
            ir += [j] * n
            singles.append((r, len(seg) - n, t, parts[which]))
        pad = 8 - len(seg)
        rows.append(jnp.concatenate([*toks, jnp.zeros((1, pad), jnp.int32)], axis=1))
        segs.append(seg + [0] * pad)
        idx_global.append(ig + [0] * pad)
        idx_row.append(ir + [0] * pad)
    row_tok, seg = jnp.concatenate(rows), jnp.array(segs)
    global_ = fwd(params, row_tok, ad.stack(parts), seg, jnp.array(idx_global))
    per_row = ad.stack([ad.stack([parts[w] for _, w in row]) for row in layout])
    assert per_row.batch_shape == (2, 2)
    row_wise = fwd(params, row_tok, per_row, seg, jnp.array(idx_row))
    for r, s0, t, part in singles:
        single = fwd(params, t, part)[0]
        n = t.shape[1]
        np.testing.assert_allclose(global_[r, s0 : s0 + n], single, atol=1e-5, rtol=0)
        np.testing.assert_allclose(row_wise[r, s0 : s0 + n], single, atol=1e-5, rtol=0)


def test_merge_matches_application_and_unmerge_restores(base):
    params, fwd = base
    x = fwd_adapter(30)
    tok = tokens(1, (2, 6))
    merged = ad.merge_into(params, x, FWD_CFG)
    np.testing.assert_allclose(fwd(merged, tok), fwd(params, tok, x), atol=1e-4, rtol=0)
    back = ad.unmerge(merged, x, FWD_CFG)
    for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_allclose(q, p, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="batch shape"):
        ad.merge_into(params, ad.stack([x, x]), FWD_CFG)


def test_concat_equals_additive_application_and_padding_is_free(base):
    params, fwd = base
    x = fwd_adapter(40, modules=("q_proj", "down_proj"))
    y = fwd_adapter(41, rank=3, modules=("v_proj", "down_proj"))
    tok = tokens(2, (2, 6))
    both = fwd(params, tok, ad.concat([x, y]))
    additive = fwd(ad.merge_into(params, x, FWD_CFG), tok, y)
    np.testing.assert_allclose(both, additive, atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        fwd(params, tok, ad.pad_rank(x, 11)), fwd(params, tok, x), atol=1e-6, rtol=0
    )
