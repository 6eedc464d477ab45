"""Real weights (slow): SmolLM2-135M-Instruct and Gemma-3-270M from `fetch-model`.

Reference: transformers (torch f32, eager attention) loading the very same converted folder, so
any difference is ours, not quantization. Logits on a 64-token text: max abs error <= 2e-3.
Greedy 32 tokens: identical ids. The models are fetched once into the cache
($HYPERLORA_CACHE or ~/.cache/hyperlora_jax) and reused by later runs.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hyperlora_jax.models.decoding import generate
from hyperlora_jax.models.fetch import fetch_model
from hyperlora_jax.models.hf import load_hf_model
from hyperlora_jax.models.tokenizer import apply_chat, load_tokenizer
from hyperlora_jax.models.transformer import forward

pytestmark = pytest.mark.slow

MODELS = ("smollm2-135m-instruct", "gemma-3-270m")
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed 'La dame de fer', it was constructed as the centerpiece "
    "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution."
)


@pytest.fixture(scope="session")
def model_dirs():
    """Run fetch-model once per session (a no-op when the cache already holds the folders)."""
    return {name: fetch_model(name) for name in MODELS}


@functools.cache
def _load(folder: str):
    from transformers import AutoModelForCausalLM

    cfg, params = load_hf_model(folder, dtype=jnp.float32)
    ref = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return cfg, params, load_tokenizer(folder), ref


@pytest.fixture(scope="module", params=MODELS)
def real(request, model_dirs):
    return request.param, *_load(str(model_dirs[request.param]))


def test_logits_match_transformers(real):
    name, cfg, params, tok, ref = real
    ids = tok(TEXT)["input_ids"][:64]
    assert len(ids) == 64
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(forward(params, cfg, jnp.asarray([ids])).logits[0])
    err = np.abs(got - want).max()
    print(f"{name}: max |logit diff| over 64 tokens = {err:.2e}")
    assert err <= 2e-3
    assert (got.argmax(-1) == want.argmax(-1)).mean() == 1.0


def test_greedy_32_tokens_match_transformers(real):
    name, cfg, params, tok, ref = real
    if tok.chat_template and name.startswith("smollm2"):
        ids = apply_chat(tok, [{"role": "user", "content": "Tell me about the Eiffel Tower."}])
    else:  # Gemma-3-270M is a base model: plain completion
        ids = tok("The Eiffel Tower is located in")["input_ids"]
    with torch.no_grad():
        hf = ref.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None
        )
    want = hf[0, len(ids) :].numpy()
    out = generate(params, cfg, [ids], max_new_tokens=32, stop_ids=[], tokenizer=tok)
    print(f"{name}: {out.texts[0]!r}")
    np.testing.assert_array_equal(out.tokens[0], want)


def test_smollm2_tokenizer_converted_from_gguf(model_dirs):
    """BOS <|im_start|>=1, EOS <|im_end|>=2, a chat template, and nothing prepended to plain
    text (transformers 4.51 used to prepend <|im_start|>); the cached tokenizer.json encodes
    exactly like transformers' slow GGUF conversion."""
    from transformers import AutoTokenizer

    folder = model_dirs["smollm2-135m-instruct"]
    tok = load_tokenizer(folder)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.chat_template
    plain = tok("Hello world")["input_ids"]
    assert plain == tok.encode("Hello world", add_special_tokens=False) and 1 not in plain
    ids = apply_chat(tok, [{"role": "user", "content": "Hi"}])
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert text.count("<|im_start|>") == 3
    ref = AutoTokenizer.from_pretrained(str(folder), gguf_file="source.gguf")
    text = TEXT + "\n  indented, émoji 🙂, numbers 12345."
    assert tok(text)["input_ids"] == ref(text)["input_ids"]


def test_gemma_tokenizer_specials(model_dirs):
    """Gemma's cached tokenizer adds <bos>=2 and stops on <eos>=1 and <end_of_turn>. (Its slow
    GGUF conversion takes ~100 s, so the encode-equality check runs on SmolLM2's, above.)"""
    from hyperlora_jax.models.tokenizer import stop_token_ids

    tok = load_tokenizer(model_dirs["gemma-3-270m"])
    assert tok(TEXT)["input_ids"][0] == 2 and tok.convert_ids_to_tokens(2) == "<bos>"
    assert set(stop_token_ids(tok)) >= {1, tok.convert_tokens_to_ids("<end_of_turn>")}


def test_load_gguf_directly_equals_folder(model_dirs):
    """gguf.load_gguf (no folder) gives the same config and params as the converted folder."""
    import jax

    from hyperlora_jax.models.gguf import load_gguf

    folder = model_dirs["smollm2-135m-instruct"]
    cfg, params = load_gguf(folder / "source.gguf")
    cfg2, params2 = load_hf_model(folder)
    assert cfg == cfg2
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_chat_cli_answers_paris(model_dirs, capsys):
    from hyperlora_jax.cli import main

    rc = main(
        [
            "chat",
            "--model",
            str(model_dirs["smollm2-135m-instruct"]),
            "--prompt",
            "What is the capital of France?",
            "--max-new-tokens",
            "24",
        ]
    )
    answer = capsys.readouterr().out
    assert rc == 0 and "Paris" in answer, answer
