"""Lots-of-LoRAs / SNI tasks from local files: metadata, official preprocessing and prompts,
labels on the response (end-of-turn included), left truncation, the hierarchical sampler and
held-out lists, and bad-data reports."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from hyperlora_jax.data import pipeline, sni
from hyperlora_jax.errors import InputError

TASKS = Path(__file__).parent / "fixtures" / "sni" / "tasks"
TOK = Path(__file__).parent / "fixtures" / "official" / "d2l" / "tiny-gemma2"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOK)


def test_fixture_tasks_and_held_out_lists():
    tasks = sni.load_tasks(TASKS)
    names = [t.name for t in tasks]
    assert names == ["lol_701", "lol_9001", "lol_9002", "lol_9003", "lol_9004", "lol_9005"]
    assert sni.train_task_names(names) == [
        "lol_9001",
        "lol_9002",
        "lol_9003",
        "lol_9004",
        "lol_9005",
    ]  # lol_701 is a held-out MMMLU task
    assert len(sni.HELD_OUT_TASKS) == 11 and len(sni.DECONTAMINATED_TASKS) == 10
    by = {t.name: t for t in tasks}
    assert by["lol_9001"].metadata["task_name"] == "lol_9001"  # directory name wins
    ex = by["lol_9004"].examples[0]  # two references -> the list instruction is appended
    assert ex["task_def"].endswith(
        "without any explanation.\nThe answer should be a comma-separated list of possible "
        "completions."
    )
    assert ex["answer"] == "c, C" and ex["problem"] == "cloud"
    raw = by["lol_9005"].examples  # raw SNI JSON (Definition + Instances)
    assert len(raw) == 8 and raw[0]["task_def"].startswith("Count the words")
    assert len(sni.load_task(TASKS / "lol_9001", "train[:30%]").examples) == 3
    assert len(sni.load_task(TASKS / "lol_9001", "valid").examples) == 3


def test_prompt_labels_cover_the_response_with_end_of_turn(tok):
    task = sni.load_task(TASKS / "lol_9001")
    ex = task.examples[0]
    prompt, response = sni.render_prompt_response(task.metadata, ex, tok)
    assert prompt.startswith("<bos><start_of_turn>user\n") and ex["problem"] in prompt
    assert ex["task_def"] in prompt
    # no second <bos>: what a template opens every conversation with stays out of the response
    # (the official repo's edited templates render `<start_of_turn>model\n{R}<end_of_turn>\n`)
    assert response == f"<start_of_turn>model\n{ex['answer']}<end_of_turn>\n"
    ids, labels = sni.tokenize_pair(tok, prompt, response)
    lab = [t for t in labels if t != sni.IGNORE_INDEX]
    assert tok.decode(lab) == response  # the whole rendered response is supervised
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(t == sni.IGNORE_INDEX for t in labels[:n_prompt])
    assert tok.convert_ids_to_tokens(lab[-2]) == "<end_of_turn>"


def test_response_drops_a_default_system_turn():
    """SmolLM2's ChatML template adds its default system prompt to any conversation without one;
    inside the supervised response that would be 25 tokens of noise per example."""
    from hyperlora_jax.models.fetch import fetch_model
    from hyperlora_jax.models.tokenizer import load_tokenizer

    tok = load_tokenizer(fetch_model("smollm2-135m-instruct"))
    meta = {
        "system_message": "",
        "user_prompt_template": "{q}",
        "assistant_prefill": "",
        "response_field": "a",
    }
    prompt, response = sni.render_prompt_response(meta, {"q": "2+2?", "a": "4"}, tok)
    assert prompt == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    assert response == "<|im_start|>assistant\n4<|im_end|>\n"


def test_pair_truncation_is_left_and_longest_first(tok):
    task = sni.load_task(TASKS / "lol_9001")
    prompt, response = sni.render_prompt_response(task.metadata, task.examples[0], tok)
    ids, labels = sni.tokenize_pair(tok, prompt, response, max_len=40)
    assert len(ids) == 40
    full_resp = tok(response, add_special_tokens=False)["input_ids"]
    assert ids[-len(full_resp) :] == full_resp  # the short response survives intact
    full_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: 40 - len(full_resp)] == full_prompt[-(40 - len(full_resp)) :]  # lost its start


def _tokenized(tok):
    return [sni.tokenize_task(t, tok) for t in sni.load_tasks(TASKS)]


def test_hierarchical_sampler(tok):
    tasks = _tokenized(tok)
    src = sni.HierarchicalSource(tasks, tasks_per_step=2, seed=0, num_epochs=4, pad_to=256)
    assert src.steps_per_epoch == 3 and len(src) == 4 * 3 * 2
    rows = [src[i] for i in range(len(src))]
    for e in range(4):
        ep = rows[e * 6 : (e + 1) * 6]
        t = [int(r["task_index"]) for r in ep]
        assert len(set(t)) == 6  # each epoch: a permutation of the tasks, k per step
    descs = {(int(r["task_index"]), int(r["desc_index"])) for r in rows}
    assert len(descs) > 12  # a fresh description per example
    r = rows[0]
    n = int(r["segment_ids"].sum())
    assert (r["labels"][n:] == sni.IGNORE_INDEX).all() and (r["input_ids"][n:] == 0).all()
    assert src.description(r) in tasks[int(r["task_index"])].descriptions
    again = sni.HierarchicalSource(tasks, 2, seed=0, num_epochs=4, pad_to=256)
    assert all((again[i]["input_ids"] == rows[i]["input_ids"]).all() for i in range(len(src)))


def test_sni_pipeline_processes_split_each_step(tok):
    tasks = _tokenized(tok)
    steps = []
    for p in (0, 1):
        cfg = pipeline.LoaderConfig(
            batch_size=2, seed=1, num_epochs=1, process_index=p, process_count=2
        )
        steps.append(list(pipeline.make_sni_dataset(tasks, cfg, tasks_per_step=4, pad_to=256)))
    assert len(steps[0]) == len(steps[1]) == 1
    both = np.concatenate([steps[0][0]["task_index"], steps[1][0]["task_index"]])
    assert len(set(both.tolist())) == 4  # one global step of 4 distinct tasks


def test_bad_tasks_are_reported(tmp_path, tok):
    root = tmp_path / "tasks"
    shutil.copytree(TASKS, root)
    meta = (root / "lol_9002" / "metadata.yaml").read_text()
    start = meta.index("descriptions:")
    end = meta.index("ds_kwargs:")
    (root / "lol_9002" / "metadata.yaml").write_text(
        meta[:start] + "descriptions: []\n" + meta[end:]
    )
    (root / "lol_9003" / "train.jsonl").write_text(
        '{"id": "x", "output": ["1"]}\n' + (TASKS / "lol_9003/train.jsonl").read_text()
    )
    (root / "lol_9001" / "train.jsonl").write_bytes(b'{"input": "caf\xe9"}\n')
    with pytest.raises(InputError, match="lol_9001.*UTF-8"):
        sni.load_tasks(root)
    with pytest.raises(InputError, match="lol_9003/train.jsonl record 0: missing 'input'"):
        sni.load_tasks(root, ["lol_9003"])
    tasks = sni.load_tasks(root, on_error="skip")
    assert [t.name for t in tasks] == ["lol_701", "lol_9003", "lol_9004", "lol_9005"]
    assert len(tasks[1].examples) == 10
    with pytest.raises(InputError, match="no descriptions"):
        sni.load_tasks(root, ["lol_9002"])
