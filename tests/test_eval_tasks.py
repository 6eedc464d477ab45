"""T2L benchmark formats: local files, official prompts, targets, parsers, errors."""

import json

import pytest

from hyperlora_jax.errors import InputError
from hyperlora_jax.eval import tasks as T

ARC_ROW = {
    "question": "Which gas do plants absorb?",
    "choices": {"text": ["Oxygen", "Carbon dioxide", "Helium"], "label": ["A", "B", "C"]},
    "answerKey": "B",
}
GSM_ROW = {
    "question": "Tom has 2 apples and buys 1,000 more. How many?",
    "answer": "2+1000\n#### 1,002",
}


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_arc_prompt_is_official_with_padding(tmp_path):
    rows = T.load_examples("arc_easy", _write_jsonl(tmp_path / "arc.jsonl", [ARC_ROW]))
    prompt = T.build_user_prompt("arc_easy", rows[0])
    assert prompt == (
        "Answer the question below by choosing the correct choice.\n\n"
        "Which gas do plants absorb?\n\n"
        "A: Oxygen\nB: Carbon dioxide\nC: Helium\nD: N/A\n\n"
        "You must respond with the letter corresponding to the correct choice without any "
        "explanation."
    )
    msgs = T.build_messages("arc_easy", rows[0], description="Science questions.")
    assert msgs[0] == {"role": "system", "content": ""}
    assert msgs[1]["content"].startswith("Science questions.\n\nAnswer the question below")
    assert T.target("arc_easy", rows[0]) == "B"
    assert T.score("arc_easy", "B", "B") == 1
    assert T.score("arc_easy", "Answer: B", "B") == 1
    assert T.score("arc_easy", "Answer: B", "B", parity=True) == 0  # official parses "a"


def test_numeric_arc_labels_pad_with_numbers():
    row = {"question": "q", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"}
    assert "3: N/A\n4: N/A" in T.build_user_prompt("arc_challenge", row)


def test_gsm8k_targets_prefill_and_description_bug():
    assert T.get_task("gsm8k").prefill == "Let's think step by step."
    assert T.target("gsm8k", GSM_ROW) == 1002
    assert T.target("gsm8k", GSM_ROW, parity=True) == 2  # "1,002" -> last match "002"
    with_desc = T.build_user_prompt("gsm8k", GSM_ROW, description="Math.")
    assert with_desc.startswith("Math.\n\nPlease answer the following question: Tom has")
    # the official GSM8K eval drops the description prefix
    assert T.build_user_prompt("gsm8k", GSM_ROW, "Math.", parity=True).startswith("Please answer")
    assert T.score("gsm8k", "so 2 + 1,000 = 1,002", 1002) == 1


def test_other_formats_render_and_score():
    rows = {
        "boolq": {"passage": "P.", "question": "is it", "answer": True},
        "hellaswag": {"ctx": "He", "endings": ["a", "b", "c", "d"], "label": "2"},
        "openbookqa": {
            "question_stem": "Q",
            "choices": {"text": list("wxyz"), "label": list("ABCD")},
            "answerKey": "C",
        },
        "piqa": {"goal": "g", "sol1": "s1", "sol2": "s2", "label": 1},
        "winogrande": {"sentence": "s", "option1": "o1", "option2": "o2", "answer": "2"},
    }
    outputs = {"boolq": "true", "hellaswag": "2", "openbookqa": "C", "piqa": "1", "winogrande": "2"}
    for task, row in rows.items():
        p = T.build_user_prompt(task, row)
        assert "{" not in p, task
        assert T.score(task, outputs[task], T.target(task, row)) == 1, task
    assert T.build_user_prompt("boolq", rows["boolq"]).startswith("P.\n\nQuestion: is it?\n\n")
    assert len(T.TASKS) == 8 and all(len(s.descriptions) == 3 for s in T.TASKS.values())
    assert T.TASK_DESCRIPTION_MESSAGES["boolq"].startswith("Analyze the given details")


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="unknown T2L benchmark 'mmlu'"):
        T.get_task("mmlu")
    with pytest.raises(InputError, match="no data file"):
        T.load_examples("piqa", tmp_path / "missing.jsonl")
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"goal": "g"}])
    with pytest.raises(InputError, match=r"row 0 lacks field\(s\) \['sol1', 'sol2', 'label'\]"):
        T.load_examples("piqa", bad)
    (tmp_path / "list.json").write_text(json.dumps([ARC_ROW, ARC_ROW, ARC_ROW]))
    assert len(T.load_examples("arc_easy", tmp_path / "list.json", limit=2)) == 2
