"""Precision policies (hyperlora_jax.precision): names, param casting, and bf16 against f32.

bf16 = bf16 matmul / attention inputs with f32 accumulation. With the real SmolLM2-135M-Instruct
(the embedded default base model) on a fixed set of 4 chat prompts: last-token logits within 2.0
of f32 (max abs; logits span ~[-20, 30]; measured 0.34-1.15) with the same argmax, and 24 greedy
tokens identical to f32, params kept in f32 ("bf16") or stored in bf16 ("bf16-params").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax.errors import ConfigError, InputError
from hyperlora_jax.precision import DEFAULTS, POLICIES, get_precision

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
    "What is 12 plus 7?",
)


def test_policies_and_defaults():
    assert get_precision("f32").compute == jnp.float32
    bf = get_precision("bf16")
    assert (bf.compute, bf.params) == (jnp.bfloat16, jnp.float32)
    assert get_precision("bf16-params").params == jnp.bfloat16
    assert get_precision(None) is POLICIES["f32"]  # exact unless asked
    for path, name in DEFAULTS.items():
        assert get_precision("auto", path) is POLICIES[name]
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        get_precision("fp8")
    with pytest.raises(ConfigError, match="unknown path"):
        get_precision("auto", "nowhere")
    tree = {"w": jnp.ones(3), "ids": jnp.arange(3)}
    cast = get_precision("bf16-params").cast_params(tree)
    assert cast["w"].dtype == jnp.bfloat16 and cast["ids"].dtype == tree["ids"].dtype
    assert get_precision("bf16").cast_params(tree)["w"] is tree["w"]


def test_generate_rejects_dtype_and_precision_together():
    from hyperlora_jax.models.decoding import generate

    with pytest.raises(InputError, match="dtype or precision"):
        generate({}, None, [[1]], dtype=jnp.float32, precision="bf16")


@pytest.mark.slow
def test_bf16_keeps_smollm2_greedy_answers():
    from hyperlora_jax.embedded import DEFAULT_MODEL
    from hyperlora_jax.models.decoding import chat
    from hyperlora_jax.models.load import load_base
    from hyperlora_jax.models.tokenizer import apply_chat
    from hyperlora_jax.models.transformer import forward

    base = load_base(DEFAULT_MODEL)
    cfg, params, tok = base[0], base[1], base[2]
    ids = [apply_chat(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    for policy in ("bf16", "bf16-params"):
        pol = get_precision(policy)
        for row in ids:
            x = jnp.asarray([row])
            want = forward(params, cfg, x, logits_at=jnp.asarray([[len(row) - 1]])).logits
            got = forward(
                pol.cast_params(params),
                cfg,
                x,
                dtype=pol.compute,
                logits_at=jnp.asarray([[len(row) - 1]]),
            ).logits
            err = float(jnp.max(jnp.abs(got - want)))
            print(f"{policy}: max |logit diff| {err:.3f}")
            assert err <= 2.0, (policy, err)
            assert int(jnp.argmax(got)) == int(jnp.argmax(want))
    kw = dict(max_new_tokens=24, stop_ids=[])
    ref = chat(params, cfg, tok, list(PROMPTS), precision="f32", **kw)
    for policy in ("bf16", "bf16-params"):
        out = chat(params, cfg, tok, list(PROMPTS), precision=policy, **kw)
        np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=f"{policy}: {out.texts}")


def test_doc_to_lora_precision_policy():
    """DocToLoRA(precision=...) sets the compute dtype and the hypernetwork params' dtype; the
    bf16 chunk LoRAs stay within 5% (max abs, relative to the largest entry) of the f32 ones on a
    tiny random model."""
    from hyperlora_jax.hypernet.d2l.api import DocToLoRA
    from hyperlora_jax.hypernet.d2l.model import D2LConfig, init_params
    from hyperlora_jax.models.testing import tiny_config
    from hyperlora_jax.models.transformer import init_params as base_init

    cfg = tiny_config()
    hcfg = D2LConfig.for_base(cfg, rank=4)
    hyper, base = init_params(hcfg, jax.random.key(1)), base_init(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    chunks = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (9, 5)]
    ref = DocToLoRA(hcfg, hyper, base, cfg).chunk_loras(chunks)
    for policy, pdt in (("bf16", jnp.float32), ("bf16-params", jnp.bfloat16)):
        d2l = DocToLoRA(hcfg, hyper, base, cfg, precision=policy)
        assert d2l.dtype == jnp.bfloat16
        assert all(x.dtype == pdt for x in jax.tree.leaves(d2l.params))
        for got, want in zip(
            jax.tree.leaves(d2l.chunk_loras(chunks)), jax.tree.leaves(ref), strict=True
        ):
            scale = float(jnp.max(jnp.abs(want)))
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
            assert err <= 0.05 * scale, (policy, err, scale)


def test_session_precision_policy(fixtures_dir):
    """Session(precision=...) (the chat / serve --precision flag): base weights stored in the
    policy's param dtype, compute and the D2L hypernetwork in its compute / param dtypes."""
    from hyperlora_jax.session import Session

    d2l = fixtures_dir / "official" / "d2l"
    s = Session(str(d2l / "tiny-gemma2"), d2l=d2l / "pytorch_model.bin", precision="bf16-params")
    assert s.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(s.params)} == {jnp.dtype(jnp.bfloat16)}
    hyper = s.d2l()
    assert {x.dtype for x in jax.tree.leaves(hyper.params)} == {jnp.dtype(jnp.bfloat16)}
    assert hyper.dtype == jnp.bfloat16
    s.internalize("The cat sat on the mat. It was warm.", "doc")  # runs end to end in bf16
    auto = Session(str(d2l / "tiny-gemma2"), d2l=d2l / "pytorch_model.bin", precision="auto")
    assert auto.dtype == jnp.dtype(POLICIES[DEFAULTS["generate"]].compute)
    assert auto.d2l().dtype == jnp.dtype(POLICIES[DEFAULTS["internalize"]].compute)
    with pytest.raises(ConfigError, match="precision 'half'"):
        Session(str(d2l / "tiny-gemma2"), precision="half")
