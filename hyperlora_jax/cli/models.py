"""`hyperlora-jax fetch-model` and `hyperlora-jax chat`."""

from __future__ import annotations

import argparse
import time

from hyperlora_jax.cli.common import (
    MODEL_HELP,
    add_allow_other_base,
    non_negative_float,
    positive_int,
    probability,
)


def _fetch_model(args: argparse.Namespace) -> int:
    from hyperlora_jax.models.fetch import fetch_model

    t0 = time.time()
    folder = fetch_model(args.name, dest=args.dest)
    print(f"model ready at {folder} ({time.time() - t0:.1f} s)")
    return 0


def _chat(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from hyperlora_jax.errors import InputError
    from hyperlora_jax.models.decoding import chat, generate
    from hyperlora_jax.models.load import load_base

    if not args.prompt.strip():
        raise InputError("--prompt is empty")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    config, params, tokenizer, _ = load_base(args.model, dtype=dtype)
    adapter = None
    if args.adapter:
        from hyperlora_jax.lora.adapter import validate
        from hyperlora_jax.lora.storage import load_adapter, read_adapter_meta
        from hyperlora_jax.models.load import base_fingerprint, check_fingerprint

        adapter = validate(load_adapter(args.adapter), config)
        check_fingerprint(
            read_adapter_meta(args.adapter),
            base_fingerprint(config, params),
            args.model,
            f"the adapter {args.adapter}",
            allow_other_base=args.allow_other_base,
        )
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        adapter=adapter,
        dtype=dtype,
    )
    if args.no_chat_template or not tokenizer.chat_template:
        out = generate(params, config, [args.prompt], tokenizer=tokenizer, **kw)
    else:
        out = chat(params, config, tokenizer, [args.prompt], **kw)
    print(out.texts[0].strip())
    return 0


def register(subparsers) -> None:
    """Add this area's subcommands to the `hyperlora-jax` parser."""
    from hyperlora_jax.models.fetch import KNOWN_MODELS

    p = subparsers.add_parser(
        "fetch-model",
        help="download and convert a small base model into a ready folder",
        description="Known models: "
        + "; ".join(f"{k}: {v.description}" for k, v in KNOWN_MODELS.items())
        + ". Also accepts a .gguf file or a Hugging Face hub id (online only). Default "
        "destination: $HYPERLORA_CACHE/models/NAME (~/.cache/hyperlora_jax/models/NAME).",
    )
    p.add_argument("name", help=f"one of {', '.join(KNOWN_MODELS)}, a .gguf file, or a hub id")
    p.add_argument("--dest", default=None, help="output folder (default: the cache)")
    p.set_defaults(func=_fetch_model)

    p = subparsers.add_parser("chat", help="answer one prompt with a base model (+ an adapter)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--adapter", default=None, help="adapter folder (hyperlora-jax format)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    add_allow_other_base(p, "adapter")
    p.set_defaults(func=_chat)
