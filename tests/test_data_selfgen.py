"""Self-generated QA data: official prompts and parser, teacher prompt and student view, stored
top-k log-probs equal to a fresh teacher forward pass, unfinished responses dropped."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from hyperlora_jax.data import selfgen, storage
from hyperlora_jax.errors import InputError
from hyperlora_jax.models.transformer import forward

TINY = Path(__file__).parent / "fixtures" / "official" / "d2l" / "tiny-gemma2"
DOCS = [
    "The Eiffel Tower in Paris was completed in 1889. It is 330 metres tall.",
    "Marie Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911.",
    "The river Nile flows north through eleven countries into the Mediterranean Sea.",
]
QUESTIONS = [
    ["How tall is the Eiffel Tower?", "When was it completed?"],
    ["When did Marie Curie win the Chemistry prize?"],
    ["Where does the Nile end?"],
]
LP_TOL = 1e-3  # stored top-k log-probs vs a fresh, unpadded teacher forward pass


def test_parse_qa_pairs_official_rules():
    text = "Question 1: What?\nAnswer 1: This.\nQuestion 2: Who?\nAnswer 2: Them."
    assert selfgen.parse_qa_pairs(text, finished=True) == (["What?", "Who?"], ["This.", "Them."])
    # cut off mid-answer (no stop token): the last pair goes
    assert selfgen.parse_qa_pairs(text, finished=False) == (["What?"], ["This."])
    # leftover question without an answer: every complete pair is kept
    left = text + "\nQuestion 3: Why"
    assert selfgen.parse_qa_pairs(left, finished=False)[0] == ["What?", "Who?"]
    assert selfgen.parse_qa_pairs("Question 1: \nAnswer 1: x", True) == ([], [])
    assert selfgen.parse_qa_pairs("<think>Question 1: a\nAnswer 1: b</think>none", True) == ([], [])


def test_official_prompt_structure():
    p = selfgen.question_prompt("CTX", 5)
    assert p.startswith("### Instructions ###\n") and "### Context ###\nCTX\n\n\n### Rules" in p
    assert "Respond with 5 question-answer pairs." in p
    assert p.endswith(
        "Question 1: {question_1}\nAnswer 1: {answer_1}\nQuestion 2: "
        "{question_2}\nAnswer 2: {answer_2}\n..."
    )
    r = selfgen.repeat_prompt("CTX", ["q1", "q2"], ["a1", "a2"], 5)
    assert (
        "### Example Question-Answer Pairs ###\nQuestion 1: q1\nAnswer 1: a1\nQuestion 2: "
        "q2\nAnswer 2: a2\n\n\n\n### Rules ###" in r
    )
    assert "must *not* be redundant" in r
    m = selfgen.teacher_user_message("DOC", "Q?")
    assert m.startswith(
        "You are an honest and helpful assistant.\n\n\n# Provided Information\n"
        "DOC\n\n---\n\n# System Instruction\n- The information provided"
    )
    assert m.endswith("\n---\n\n# User Input\nQ?")


def test_question_generation_two_rounds():
    tok = AutoTokenizer.from_pretrained(TINY)
    seen = []

    def fake_generate(prompts, max_new):
        seen.append([tok.decode(p) for p in prompts])
        n = len(seen)
        txt = f"Question 1: Q{n}a?\nAnswer 1: A{n}a.\nQuestion 2: Q{n}b?\nAnswer 2: A{n}b."
        return [
            selfgen.Generation(tok(txt, add_special_tokens=False)["input_ids"] + [5], True)
            for _ in prompts
        ]

    qa = selfgen.generate_questions(DOCS[:2], tok, fake_generate, selfgen.SelfGenConfig())
    assert qa[0] == (["Q1a?", "Q1b?", "Q2a?", "Q2b?"], ["A1a.", "A1b.", "A2a.", "A2b."])
    assert "You are a creative and helpful assistant." in seen[0][0]
    assert "Question 1: Q1a?\nAnswer 1: A1a.\nQuestion 2: Q1b?" in seen[1][0]


def test_compact_question_generation():
    """Compact mode: the assistant turn starts with "Question 1:", only questions are kept, a
    cut-off output loses its partial last line, repeats across rounds are dropped."""
    tok = AutoTokenizer.from_pretrained(TINY)
    seen = []
    outs = [  # both cut off by max_new_tokens
        " Who?\nAnswer 1: X.\nQuestion 2: Where?\nAnswer 2: Y",
        " Where?\nQuestion 2: When?\nQuestion 3: Wh",
    ]

    def fake_generate(prompts, max_new):
        seen.append([tok.decode(p) for p in prompts])
        txt = outs[len(seen) - 1]
        return [selfgen.Generation(tok(txt, add_special_tokens=False)["input_ids"], False)] * len(
            prompts
        )

    sg = selfgen.SelfGenConfig(qg_prompt="compact", n_qa_pairs=2)
    qa = selfgen.generate_questions(DOCS[:1], tok, fake_generate, sg)
    assert qa == [(["Who?", "Where?", "When?"], ["", "", ""])]
    assert seen[0][0].endswith("<start_of_turn>model\nQuestion 1:")
    assert DOCS[0] in seen[0][0] and "You are a creative" not in seen[0][0]
    assert "different from these ones:\nWho?\nWhere?\n" in seen[1][0]
    assert selfgen.parse_questions("Question 1: A? Answer 1: b\nQuestion 2:  \nQuestion 3: A?") == [
        "A?"
    ]
    with pytest.raises(InputError, match="qg_prompt"):
        selfgen.generate_questions(DOCS, tok, fake_generate, selfgen.SelfGenConfig(qg_prompt="x"))


def _check_records(recs, tok, params, cfg, docs, questions, chat_prefix_fn):
    """Stored log-probs vs a fresh forward; student views hold the question, not the document."""
    fwd = jax.jit(lambda p, x: forward(p, cfg, x).logits)
    worst = 0.0
    n_qa = 0
    for rec in recs:
        d = docs.index(rec["context"])
        assert rec["ctx_ids"] == selfgen.context_ids(tok, docs[d]) or np.array_equal(
            rec["ctx_ids"], selfgen.context_ids(tok, docs[d])
        )
        for q, ids, (s, e), vals, idx in zip(
            rec["prompts"],
            rec["input_ids"],
            rec["response_start_end"],
            rec["logprobs_vals"],
            rec["logprobs_indices"],
        ):
            ids = np.asarray(ids)
            assert q in questions[d] and e == len(ids)
            student_prompt = tok.decode(ids[:s])
            assert student_prompt == chat_prefix_fn(q)
            assert docs[d] not in tok.decode(ids) and "Provided Information" not in student_prompt
            tp = selfgen.teacher_prompt(tok, docs[d], q)
            full = np.asarray(tp.ids + ids[s:e].tolist())[None]
            logp = jax.nn.log_softmax(fwd(params, full)[0].astype(jnp.float32), -1)
            ref = logp[len(tp.ids) - 1 : full.shape[1] - 1]
            vals, idx = np.asarray(vals, np.float32), np.asarray(idx)
            got = np.take_along_axis(np.asarray(ref), idx, axis=-1)
            worst = max(worst, float(np.max(np.abs(got - vals))))
            top = np.sort(np.asarray(ref), -1)[:, ::-1][:, : vals.shape[1]]
            worst = max(worst, float(np.max(np.abs(top - vals))))
            n_qa += 1
    assert worst <= LP_TOL, worst
    return n_qa, worst


def test_teacher_records_with_tiny_model(tmp_path):
    from hyperlora_jax.models.hf import load_hf_model

    tok = AutoTokenizer.from_pretrained(TINY)
    cfg, params = load_hf_model(TINY)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    rng = np.random.default_rng(0)

    def fake_generate(prompts, max_new):  # a random model never stops: fix the answers
        out = []
        for i, _ in enumerate(prompts):
            toks = rng.integers(10, 400, 6).tolist()
            out.append(
                selfgen.Generation(toks + [eot], True)
                if i != 1
                else selfgen.Generation(toks, False)
            )
        return out

    topk = selfgen.make_jax_topk(params, cfg, k=16, batch_size=3)
    recs, stats = selfgen.self_generate(
        DOCS, tokenizer=tok, generate=fake_generate, topk=topk, questions=QUESTIONS
    )
    assert stats["questions"] == 4 and stats["dropped_unfinished"] == 1
    storage.write_records(tmp_path / "sg.parquet", recs)
    back = [storage.RecordSource(tmp_path / "sg.parquet")[i] for i in range(len(recs))]
    storage.write_records(tmp_path / "sg.array_record", recs)
    back2 = storage.RecordSource(tmp_path / "sg.array_record")
    assert back2[0]["logprobs_vals"][0].dtype == np.float32

    def prefix(q):  # the template's user turn with the generation prompt, no document
        return tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )

    n_qa, _ = _check_records(back, tok, params, cfg, DOCS, QUESTIONS, prefix)
    assert n_qa == 3
    for r in back:
        for ids, (_s, e) in zip(r["input_ids"], r["response_start_end"]):
            assert ids[e - 1] == eot  # the end-of-turn is part of the labelled response


@pytest.mark.slow
def test_selfgen_smollm2_end_to_end(tmp_path, capsys):
    """`data selfgen` on SmolLM2-135M-Instruct: it writes the questions (compact prompt) and
    answers them as the teacher; stored top-k equal a fresh forward, no document in the student."""
    import json

    from hyperlora_jax.cli import main
    from hyperlora_jax.models.fetch import fetch_model
    from hyperlora_jax.models.hf import load_hf_model
    from hyperlora_jax.models.tokenizer import load_tokenizer

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = tmp_path / "sg.array_record"
    args = ["data", "selfgen", "--docs", str(docs), "--model", "smollm2-135m-instruct"]
    args += ["--qg-prompt", "compact", "--n-qa-pairs", "2", "--no-repeat-round"]
    args += ["--q-max-new-tokens", "40", "--max-new-tokens", "64", "--out", str(out)]
    assert main(args) == 0
    stats = capsys.readouterr().out  # the run's counts and throughput
    src = storage.RecordSource(out)
    back = [src[i] for i in range(len(src))]
    assert len(back) >= 2, stats  # a rambling teacher answer (> 64 tokens) is dropped
    questions = [next((r["prompts"] for r in back if r["context"] == d), []) for d in DOCS]
    assert all(q.endswith("?") for qs in questions for q in qs), questions

    path = fetch_model("smollm2-135m-instruct")
    tok = load_tokenizer(path)
    cfg, params = load_hf_model(path)

    def prefix(q):  # SmolLM2's template adds its default system turn
        return tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )

    _check_records(back, tok, params, cfg, DOCS, questions, prefix)
    answers = " ".join(" ".join(r["responses"]) for r in back)
    assert any(x in answers for x in ("330", "1889", "1903", "1911", "Mediterranean")), answers
