"""T2L benchmark suite read from local files: formats, official prompts, targets and scoring.

Each task reads JSONL (or a JSON list) with the fields of its HF dataset (e.g. ARC: question,
choices{text,label}, answerKey). Prompts are the official `vllm_eval.py` templates, sent as
[system "", user prompt] through the chat template, plus the task's assistant prefill. The eval
descriptions are the 3 unseen ones of the official config (`eval_ds_info`); description 0 is
also the official `TASK_DESCRIPTION_MESSAGES` text for the "base + description" row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from hyperlora_jax.errors import InputError
from hyperlora_jax.eval import metrics
from hyperlora_jax.lora.adapter import unstack
from hyperlora_jax.models import decoding
from hyperlora_jax.models import sharding as shd

ARC_TEMPLATE = (
    "Answer the question below by choosing the correct choice.\n\n"
    "{question}\n\n"
    "{choices[label][0]}: {choices[text][0]}\n{choices[label][1]}: {choices[text][1]}\n"
    "{choices[label][2]}: {choices[text][2]}\n{choices[label][3]}: {choices[text][3]}\n\n"
    "You must respond with the letter corresponding to the correct choice without any explanation."
)
OQA_TEMPLATE = (
    "Complete the following passage or answer the question by choosing the correct choice.\n\n"
    "{question_stem}\n\n"
    "{choices[label][0]}: {choices[text][0]}\n{choices[label][1]}: {choices[text][1]}\n"
    "{choices[label][2]}: {choices[text][2]}\n{choices[label][3]}: {choices[text][3]}\n\n"
    "You must respond with the letter corresponding to the correct choice (A,B,C,D) without any "
    "explanation."
)
HSWAG_TEMPLATE = (
    "You are provided with an incomplete passage below as well as 4 choices of continuation "
    "with only one of them being the correct ending. "
    "Treat the endings as being labelled 0, 1, 2, 3 in order.\n\n"
    "Passage: {ctx}\n\n"
    "0: {endings[0]}\n"
    "1: {endings[1]}\n"
    "2: {endings[2]}\n"
    "3: {endings[3]}\n\n"
    "You must respond with the only number corresponding to the correct ending (0,1,2,3) for the "
    "passage without any explanation."
)
PIQA_TEMPLATE = (
    "Choose the option that either answers the question, completes the sentence, or solves the "
    "problem. Pay attention to the properties of the objects in the question and how they "
    "interact with each other. If both options are correct, choose the one that is more "
    'convenient or more common.\n\n"""{goal}"""\n\n'
    "0: {sol1}\n1: {sol2}\n\n"
    "You must respond with either `0` or `1` without any explanation."
)
WINOGRANDE_TEMPLATE = (
    "Given the following situation:\n\n{sentence}\n\nWhich option is correct?\n\n"
    "Option 1: {option1}\n\nOption 2: {option2}\n\n"
    "You must respond with either `1` or `2` without any explanation."
)
BOOLQ_TEMPLATE = (
    "{passage}\n\nQuestion: {question}?\n\n"
    "Please answer with either `true` or `false` without any explanation."
)
GSM8K_TEMPLATE = "Please answer the following question: {question}\n\n"


def _pad_arc(ex: dict) -> dict:
    """Official ARC preprocessing: pad to 4 choices with "N/A" and continued labels."""
    ex = dict(ex)
    ch = {"text": list(ex["choices"]["text"]), "label": list(ex["choices"]["label"])}
    n = 4 - len(ch["text"])
    if n > 0:
        ch["text"] += ["N/A"] * n
        if ch["label"][0].isdigit():
            ch["label"] += [str(len(ch["label"]) + i + 1) for i in range(n)]
        else:
            ch["label"] += ["ABCD"[len(ch["label"]) + i] for i in range(n)]
    ex["choices"] = ch
    return ex


@dataclass(frozen=True)
class TaskSpec:
    name: str
    template: str
    fields: tuple[str, ...]  # fields the template and target need
    response_field: str
    scorer: str  # "choice" | "bool" | "number"
    descriptions: tuple[str, str, str]
    prefill: str = ""
    preprocess: Callable[[dict], dict] | None = None


_D = {
    "arc_easy": (
        "Your job is to discern which information best answers a posed question, focusing on practical examples and scientific principles. This requires a strong grasp of underlying concepts in ecology or physics.",  # noqa: E501
        "You will analyze questions that explore important connections such as environmental issues or animal adaptations. Utilize your background knowledge to evaluate and select the most fitting answer.",  # noqa: E501
        "This task involves selecting answers that reflect accurate relationships or effects seen in nature or society. You will need to sort through potential choices critically to find the appropriate one.",  # noqa: E501
    ),
    "arc_challenge": (
        "This task is about analyzing questions which examine your grasp of scientific ideas. You must connect conceptual knowledge with practical examples from geology, ecology and environmental changes.",  # noqa: E501
        "The objective here is to evaluate various scientific scenarios and infer the most logical explanations or definitions based on established knowledge. This task will strengthen your analytical and reasoning skills in the context of natural science.",  # noqa: E501
        "Your role is to interpret questions focusing on earth science and biological interactions. This demands a clear understanding of relevant processes, such as decomposition, weathering, and species adaptation.",  # noqa: E501
    ),
    "boolq": (
        "Analyze the given details about various subjects, including movies, sports, and television shows. Your role is to confirm whether certain claims are true or false.",  # noqa: E501
        "Your task is to determine the truthfulness of specific statements based on the provided background information. This requires careful reading and comprehension of the content.",  # noqa: E501
        "The goal is to evaluate factual claims made in relation to highlighted texts. You will need to discern whether the statements align with the information provided.",  # noqa: E501
    ),
    "gsm8k": (
        "You will be tasked with interpreting mathematical situations described in words. The goal is to use logical reasoning and calculations to determine the numerical answers based on the context provided.",  # noqa: E501
        "This task challenges your problem-solving abilities through mathematical reasoning. You must carefully read each scenario and systematically work through the data to compute the final outcome.",  # noqa: E501
        "Your role is to engage with practical math scenarios presented as questions. The task requires translating textual data into numerical operations that will lead you to the final solution.",  # noqa: E501
    ),
    "hellaswag": (
        "This task revolves around completing an unfinished text by selecting an ending that matches its tone and context. It requires you to think critically about how narratives develop and conclude effectively.",  # noqa: E501
        "This task asks you to select a suitable conclusion for an unfinished narrative or instructional content. It tests your comprehension and reasoning skills as you assess how well each option aligns with the given text.",  # noqa: E501
        "Your task involves completing an incomplete passage by selecting the ending that logically continues the context provided. This requires reading comprehension and the ability to infer meaning from a text.",  # noqa: E501
    ),
    "openbookqa": (
        "Analyze the provided statements carefully and determine which one best fits into the context of the passage. This requires comprehension skills and the ability to make logical inferences.",  # noqa: E501
        "Consider each option in relation to what is presented in the input. Discern which one logically completes or responds accurately to the notion being expressed.",  # noqa: E501
        "Here, you'll be presented with different statements, and your role is to decide which one appropriately complements or responds to a scenario. This process involves critical analysis and synthesis of information.",  # noqa: E501
    ),
    "piqa": (
        "You will explore practical questions and select an answer that presents a logical and widely accepted approach to solve a given problem or complete a task successfully.",  # noqa: E501
        "Analyze the provided scenarios where practical advice or solutions are required, focusing on selecting the most commonly used or convenient method.",  # noqa: E501
        "Given a question related to common tasks, your responsibility is to discern which proposed solution aligns with typical practices or makes the task easier to achieve.",  # noqa: E501
    ),
    "winogrande": (
        "In this exercise, you need to read short narratives and discern which person or object fits best within the context of the sentence.",  # noqa: E501
        "This task requires synthesizing information from concise textual scenarios to identify crucial elements that drive the narrative forward.",  # noqa: E501
        "The goal is to evaluate descriptions and select the entity that best aligns with the sentiments or actions presented in the scenario.",  # noqa: E501
    ),
}

TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec(
        "arc_easy",
        ARC_TEMPLATE,
        ("question", "choices", "answerKey"),
        "answerKey",
        "choice",
        _D["arc_easy"],
        preprocess=_pad_arc,
    ),
    "arc_challenge": TaskSpec(
        "arc_challenge",
        ARC_TEMPLATE,
        ("question", "choices", "answerKey"),
        "answerKey",
        "choice",
        _D["arc_challenge"],
        preprocess=_pad_arc,
    ),
    "boolq": TaskSpec(
        "boolq", BOOLQ_TEMPLATE, ("passage", "question", "answer"), "answer", "bool", _D["boolq"]
    ),
    "gsm8k": TaskSpec(
        "gsm8k",
        GSM8K_TEMPLATE,
        ("question", "answer"),
        "answer",
        "number",
        _D["gsm8k"],
        prefill="Let's think step by step.",
    ),
    "hellaswag": TaskSpec(
        "hellaswag",
        HSWAG_TEMPLATE,
        ("ctx", "endings", "label"),
        "label",
        "choice",
        _D["hellaswag"],
    ),
    "openbookqa": TaskSpec(
        "openbookqa",
        OQA_TEMPLATE,
        ("question_stem", "choices", "answerKey"),
        "answerKey",
        "choice",
        _D["openbookqa"],
    ),
    "piqa": TaskSpec(
        "piqa", PIQA_TEMPLATE, ("goal", "sol1", "sol2", "label"), "label", "choice", _D["piqa"]
    ),
    "winogrande": TaskSpec(
        "winogrande",
        WINOGRANDE_TEMPLATE,
        ("sentence", "option1", "option2", "answer"),
        "answer",
        "choice",
        _D["winogrande"],
    ),
}

# The official "w/ task desc" text (TASK_DESCRIPTION_MESSAGES) is eval description 0.
TASK_DESCRIPTION_MESSAGES = {k: v.descriptions[0] for k, v in TASKS.items()}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise InputError(f"unknown T2L benchmark {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def load_examples(task: str, path: str | Path, limit: int | None = None) -> list[dict]:
    """Read a task's local file (JSONL, or a JSON list) and check its fields."""
    spec = get_task(task)
    p = Path(path)
    if not p.is_file():
        raise InputError(
            f"{task}: no data file at {p}; pass a JSONL file with fields {spec.fields}"
        )
    text = p.read_text()
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise InputError(f"{p} is not JSONL/JSON: {e}") from e
    for i, row in enumerate(rows):
        missing = [f for f in spec.fields if f not in row]
        if missing:
            raise InputError(
                f"{p}: row {i} lacks field(s) {missing} needed by {task} (expects {spec.fields})"
            )
    return rows[:limit] if limit else rows


def build_user_prompt(
    task: str, example: dict, description: str | None = None, parity: bool = False
) -> str:
    """The user turn: [description + "\\n\\n"] + template. parity=True reproduces the official
    GSM8K bug where the description (and ICL) prefix is built but never used."""
    spec = get_task(task)
    ex = spec.preprocess(example) if spec.preprocess else example
    prompt = spec.template.format(**ex)
    if description and not (parity and task == "gsm8k"):
        prompt = description + "\n\n" + prompt
    return prompt


def build_messages(
    task: str, example: dict, description: str | None = None, parity: bool = False
) -> list[dict[str, str]]:
    """Chat messages as the official eval sends them: an empty system turn, then the user turn."""
    return [
        {"role": "system", "content": ""},
        {"role": "user", "content": build_user_prompt(task, example, description, parity)},
    ]


def target(task: str, example: dict, parity: bool = False) -> Any:
    """The answer to compare with: a label string, or GSM8K's integer."""
    spec = get_task(task)
    raw = example[spec.response_field]
    if spec.scorer == "number":
        return metrics.gsm8k_target(str(raw), parity)
    return str(raw)


def score(task: str, output: str, tgt: Any, parity: bool = False) -> int:
    """1/0 correctness of one generated output with the task's (official) parser."""
    kind = get_task(task).scorer
    if kind == "choice":
        return metrics.choice_accuracy(output, tgt, parity)
    if kind == "bool":
        return metrics.bool_accuracy(output, tgt, parity)
    return metrics.number_accuracy(output, tgt, parity)


# --- running the suite ---------------------------------------------------------------------------

T2L_MODES = ("base", "base_desc", "t2l")


def prompt_ids(
    tokenizer, task: str, example: dict, description: str | None = None, parity: bool = False
) -> list[int]:
    """Token ids of the chat-formatted prompt plus the task's prefill. parity=True tokenizes the
    rendered text with special tokens added, like vLLM 0.5.4 did (double BOS for templates that
    already emit one); otherwise the template's own special tokens are kept as they are."""
    msgs = build_messages(task, example, description, parity)
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    text += get_task(task).prefill
    return list(tokenizer(text, add_special_tokens=parity)["input_ids"])


def evaluate_t2l(
    base_params,
    base_config,
    tokenizer,
    task_data: dict[str, list[dict]],
    *,
    t2l=None,
    modes: tuple[str, ...] = T2L_MODES,
    parity: bool = False,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    dtype=None,
    tracker=None,
    mesh=None,
) -> dict[str, Any]:
    """Accuracy of each mode on each task. "t2l" averages the 3 LoRAs generated from the task's 3
    eval descriptions (the README's T2L row). parity=True is README-parity: official parsers and
    GSM8K bug, LoRA scale alpha/r (vLLM 0.5.4 ignored rsLoRA), double BOS, 512 new tokens."""

    if "t2l" in modes and t2l is None:
        raise InputError("mode 't2l' needs a T2L checkpoint (--checkpoint)")
    max_new = max_new_tokens or (512 if parity else 256)
    if mesh is not None:  # laid out once; generate then shards only the rows
        base_params = shd.shard_model_params(base_params, base_config, mesh)
    dtype = dtype or jnp.float32
    results: dict[str, Any] = {}
    samples: dict[str, Any] = {}

    def run(task, rows, description, adapter, label):
        ids = [prompt_ids(tokenizer, task, r, description, parity) for r in rows]
        outs = []
        for s in range(0, len(ids), batch_size):
            ctx = tracker.stage("generation", s, task=task, mode=label) if tracker else None
            with ctx if ctx else _null():
                g = decoding.generate(
                    base_params,
                    base_config,
                    ids[s : s + batch_size],
                    adapter=adapter,
                    max_new_tokens=max_new,
                    tokenizer=tokenizer,
                    dtype=dtype,
                    mesh=mesh,
                )
            outs += g.texts
        correct = [score(task, o, target(task, r, parity), parity) for o, r in zip(outs, rows)]
        samples.setdefault(task, {})[label] = [
            {"output": o, "target": target(task, r, parity), "correct": c}
            for o, r, c in list(zip(outs, rows, correct))[:10]
        ]
        return sum(correct) / max(len(correct), 1)

    for task, rows in task_data.items():
        spec = get_task(task)
        res: dict[str, Any] = {}
        if "base" in modes:
            res["base"] = run(task, rows, None, None, "base")
        if "base_desc" in modes:
            res["base_desc"] = run(task, rows, TASK_DESCRIPTION_MESSAGES[task], None, "base_desc")
        if "t2l" in modes:
            accs = []
            for i, desc in enumerate(spec.descriptions):
                ctx = tracker.stage("hypernetwork", i, task=task) if tracker else None
                with ctx if ctx else _null() as s:
                    mode = "vllm054" if parity else "trained"
                    ad = unstack(t2l.generate([desc], scale_mode=mode))[0]
                    if s is not None:
                        s.done(ad)
                accs.append(run(task, rows, None, ad, f"t2l_{i}"))
            res["t2l"] = sum(accs) / len(accs)
            res["t2l_each"] = accs
        res["n"] = len(rows)
        results[task] = res
    avg = {}
    for m in modes:
        vals = [r[m] for r in results.values() if m in r]
        if vals:
            avg[m] = sum(vals) / len(vals)
    return {
        "tasks": results,
        "average": avg,
        "samples": samples,
        "parity": parity,
        "max_new_tokens": max_new,
    }


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
