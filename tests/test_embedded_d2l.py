"""The shipped embedded default (hyperlora_jax/checkpoints/d2l-smollm2-135m-instruct) reproduces
its model-card numbers on a subset of the held-out sets, and `make demo`'s job runs on it."""

import json
import re

import numpy as np
import pytest

from hyperlora_jax.embedded import EMBEDDED_D2L


@pytest.fixture(scope="module")
def setup():
    from hyperlora_jax.hypernet.d2l.api import DocToLoRA
    from hyperlora_jax.models.fetch import fetch_model
    from hyperlora_jax.models.hf import load_hf_model
    from hyperlora_jax.models.tokenizer import load_tokenizer

    path = fetch_model("smollm2-135m-instruct")
    config, params = load_hf_model(path)
    tok = load_tokenizer(path)
    d2l = DocToLoRA.from_checkpoint(EMBEDDED_D2L, (config, params), tokenizer=tok)
    card = json.loads((EMBEDDED_D2L / "eval_summary.json").read_text())
    return config, params, tok, d2l, card


def _mean(recs, method, key):
    return float(np.mean([r[key] for r in recs if r["method"] == method]))


@pytest.mark.slow
def test_niah_256_matches_the_model_card(setup):
    """Exact match as in the card (n=10: +-0.2), and the trained behaviour the card describes:
    the adapter makes the model answer with a bare 4-digit number, which it never does alone."""
    from hyperlora_jax.eval import niah, qa

    config, params, tok, d2l, card = setup
    ev = qa.D2LEvaluator(params, config, tok, d2l, chunk_size=1024, max_new_tokens=8)
    examples = niah.make_niah(tok, [(128, 256)], 10, seed=42)  # held-out (test) needles
    recs = qa.run(ev, examples, ["d2l", "no_context"])
    em = _mean(recs, "d2l", "exact_match")
    four_digits = {
        m: np.mean(
            [
                re.fullmatch(r"\d{4}", r["output"].strip()) is not None
                for r in recs
                if r["method"] == m
            ]
        )
        for m in ("d2l", "no_context")
    }
    want = card["niah_128_256_exact_match"]
    print(
        f"NIAH 128-256 exact match {em:.3f} (card {want:.3f}, n=10); 4-digit answers {four_digits}"
    )
    assert abs(em - want) <= 0.2
    assert four_digits["d2l"] >= 0.9 and four_digits["no_context"] <= 0.1


@pytest.mark.slow
def test_fact_qa_matches_the_model_card(setup, tmp_path):
    from hyperlora_jax.data import facts
    from hyperlora_jax.eval import qa

    config, params, tok, d2l, card = setup
    rows = facts.qa_records(facts.generate_fact_documents(8, "test", seed=1), seed=1, per_doc=1)
    f = tmp_path / "facts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = qa.D2LEvaluator(params, config, tok, d2l, chunk_size=1024, max_new_tokens=16)
    recs = qa.run(ev, qa.load_qa(f, "plain"), ["d2l", "no_context"])
    d2l_f1, none_f1 = _mean(recs, "d2l", "score"), _mean(recs, "no_context", "score")
    words = np.mean([len(r["output"].split()) for r in recs if r["method"] == "d2l"])
    print(
        f"fact QA F1: d2l {d2l_f1:.3f} (card {card['facts_d2l_f1']:.3f}), none {none_f1:.3f}; "
        f"{words:.1f} words per adapter answer"
    )
    assert abs(d2l_f1 - card["facts_d2l_f1"]) <= 0.25  # 8 questions
    assert words <= 3  # short answers in the trained format (the base model writes sentences)


@pytest.mark.slow
def test_demo_runs_on_the_embedded_default(capsys):
    from hyperlora_jax.cli.demo import run_demo

    rows = run_demo()
    out = capsys.readouterr().out
    assert "internalized" in out and "KV cache" in out and len(rows) == 4
    assert all(len(r["internalized"].split()) <= 3 for r in rows)  # the trained answer format


def test_internalize_chunks_as_the_checkpoint_was_trained():
    """Without --chunk-size, `internalize`, `chat` and `serve` split documents into the chunk
    length the shipped D2L was trained on (its checkpoint's training config), not one chunk;
    a checkpoint that records no training run (official releases) keeps one chunk."""
    from hyperlora_jax.hypernet.d2l.checkpoint import read_config, trained_chunk_size

    _, meta = read_config(EMBEDDED_D2L)
    assert trained_chunk_size(meta) == 256
    assert trained_chunk_size({"training": {"config": {"train": {}}}}) is None
    assert trained_chunk_size({}) is None
