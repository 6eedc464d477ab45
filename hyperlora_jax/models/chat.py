"""Chat formatting for D2L contexts and queries, chunk affixes, and the official split rule.

D2L tokenises a document as a one-turn chat with an empty system message and the generation
prompt (official `tokenize_ctx_text`), using the repo's own per-family templates; e.g. Gemma:
`<bos><start_of_turn>user\\n\\n\\n{doc}<end_of_turn>\\n<start_of_turn>model\\n`. Long documents are
split into equal contiguous slices of those token ids (official `split_too_long_ctx`, eval branch)
and each slice is re-wrapped with the family's affixes so every chunk looks like a whole turn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hyperlora_jax.errors import ConfigError, InputError

# Template kinds: the official repo ships Gemma, Mistral and ChatML (Qwen) templates.
TEMPLATE_KINDS = ("gemma", "mistral", "chatml")
FAMILY_TEMPLATE = {
    "gemma2": "gemma",
    "gemma3": "gemma",
    "mistral": "mistral",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "llama": "chatml",  # SmolLM2 and most small llama-arch instruct models use ChatML
}

# Official CTX_AFFIXES (token ids of the released base models), kept for checking our tokenizer
# path; our code derives the affixes from the tokenizer (`ctx_affixes`), which reproduces these.
CTX_AFFIXES: dict[str, dict[str, list[int]]] = {
    "google/gemma-2-2b-it": {"prefix": [2, 106, 1645, 110], "suffix": [107, 108, 106, 2516, 108]},
    "mistralai/Mistral-7B-Instruct-v0.2": {
        "prefix": [1, 733, 16289, 28793, 28705, 13, 13],
        "suffix": [733, 28748, 16289, 28793],
    },
    "Qwen/Qwen3-4B-Instruct-2507": {
        "prefix": [151644, 8948, 198, 151645, 198, 151644, 872, 198],
        "suffix": [151645, 198, 151644, 77091, 198],
    },
}


def template_kind(tokenizer: Any = None, family: str | None = None) -> str:
    """The chat template kind: from the tokenizer's special tokens, else from the model family."""
    if tokenizer is not None:
        # token lookups, not get_vocab(): that builds the whole vocabulary dict on every call
        convert = getattr(tokenizer, "convert_tokens_to_ids", None)
        unk = getattr(tokenizer, "unk_token_id", None)

        def has(tok: str) -> bool:
            if convert is None:  # a minimal tokenizer: look in its vocabulary
                return tok in tokenizer.get_vocab()
            i = convert(tok)
            return i is not None and i != unk

        if has("<start_of_turn>"):
            return "gemma"
        if has("<|im_start|>"):
            return "chatml"
        if has("[INST]") or has("▁[INST]"):
            return "mistral"
    if family is not None:
        if family not in FAMILY_TEMPLATE:
            raise ConfigError(f"no chat template for model family {family!r}")
        return FAMILY_TEMPLATE[family]
    raise ConfigError(
        "cannot tell the chat template of this tokenizer (no <start_of_turn>, <|im_start|> or "
        "[INST] token); pass kind= one of " + ", ".join(TEMPLATE_KINDS)
    )


def turn_affixes(kind: str, bos: str = "") -> tuple[str, str]:
    """(header, trailer) strings of a one-user-turn chat with an empty system message and the
    generation prompt, as the official templates render them."""
    if kind == "gemma":
        return f"{bos}<start_of_turn>user\n\n\n", "<end_of_turn>\n<start_of_turn>model\n"
    if kind == "mistral":
        return f"{bos} [INST] \n\n", " [/INST] "
    if kind == "chatml":
        return (
            "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n",
            "<|im_end|>\n<|im_start|>assistant\n",
        )
    raise ConfigError(f"unknown chat template kind {kind!r}; expected one of {TEMPLATE_KINDS}")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_batch(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Ids of many texts (no special tokens added) in one call: the Rust tokenizer's
    `encode_batch_fast` (parallel, no offsets) when the tokenizer has one, else a batched
    `tokenizer(texts)`. Same ids as one `tokenizer(text)` call per text."""
    texts = list(texts)
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    # transformers switches the backend's special-token splitting per call; keep to the default
    if fast is not None and not getattr(tokenizer, "split_special_tokens", False):
        if not getattr(backend, "encode_special_tokens", False):
            return [e.ids for e in fast(texts, add_special_tokens=False)]
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _bos(tokenizer: Any) -> str:
    return tokenizer.bos_token or ""


def _user_turn_text(text: str, tokenizer: Any, kind: str) -> str:
    head, tail = turn_affixes(kind, _bos(tokenizer) if kind != "chatml" else "")
    return head + text.strip() + tail


def format_user_turn(text: str, tokenizer: Any, kind: str | None = None) -> list[int]:
    """Token ids of `text` as one user turn (empty system message, generation prompt)."""
    return _encode(tokenizer, _user_turn_text(text, tokenizer, kind or template_kind(tokenizer)))


def _check_document(text: Any) -> None:
    if not isinstance(text, str) or not text.strip():
        raise InputError("the document is empty (or only whitespace); give it some text")


def _check_ctx_ids(ids: list[int], text: str, n_affixes: int) -> list[int]:
    if len(ids) <= n_affixes:
        raise InputError(
            f"the document {text[:40]!r} tokenizes to no tokens besides the chat affixes"
        )
    return ids


def tokenize_ctx_text(text: str, tokenizer: Any, kind: str | None = None) -> list[int]:
    """A document's context ids (official tokenize_ctx_text); an empty document is an InputError."""
    _check_document(text)
    kind = kind or template_kind(tokenizer)
    head, tail = ctx_affixes(tokenizer, kind)
    return _check_ctx_ids(format_user_turn(text, tokenizer, kind), text, len(head) + len(tail))


def tokenize_ctx_texts(
    texts: Sequence[str], tokenizer: Any, kind: str | None = None
) -> list[list[int]]:
    """`tokenize_ctx_text` of many documents with one batched tokenizer call (same ids)."""
    for t in texts:
        _check_document(t)
    kind = kind or template_kind(tokenizer)
    head, tail = ctx_affixes(tokenizer, kind)
    turns = [_user_turn_text(t, tokenizer, kind) for t in texts]
    return [
        _check_ctx_ids(ids, t, len(head) + len(tail))
        for ids, t in zip(encode_batch(tokenizer, turns), texts)
    ]


def ctx_affixes(tokenizer: Any, kind: str | None = None) -> tuple[list[int], list[int]]:
    """(prefix, suffix) chunk affix ids: the tokenised header and trailer of a context turn."""
    kind = kind or template_kind(tokenizer)
    head, tail = turn_affixes(kind, _bos(tokenizer) if kind != "chatml" else "")
    return _encode(tokenizer, head), _encode(tokenizer, tail)


def num_chunks(n_tokens: int, max_chunk_len: int | None) -> int:
    """Official eval rule: ceil(len / max_chunk_len) chunks; no chunking if max_chunk_len <= 0."""
    if not max_chunk_len or max_chunk_len <= 0:
        return 1
    return max(1, math.ceil(n_tokens / max_chunk_len))


def split_ctx_ids(
    ids: Sequence[int],
    max_chunk_len: int | None,
    prefix: Sequence[int],
    suffix: Sequence[int],
) -> list[list[int]]:
    """The official eval split: ceil(len / max_chunk_len) chunks (see `slice_into_chunks`)."""
    ids = list(ids)
    if not ids:
        raise InputError("cannot split an empty token sequence")
    return slice_into_chunks(ids, num_chunks(len(ids), max_chunk_len), prefix, suffix)


def slice_into_chunks(
    ids: Sequence[int], n_chunks: int, prefix: Sequence[int], suffix: Sequence[int]
) -> list[list[int]]:
    """Official `split_too_long_ctx` slicing: equal contiguous slices of ceil(n/k) templated ids,
    re-wrapped so each is a chat turn: first + suffix, middle prefix + . + suffix, last prefix + .
    (the first and last already carry the document's own header / trailer)."""
    ids = list(ids)
    if n_chunks <= 1:
        return [ids]
    step = math.ceil(len(ids) / n_chunks)
    chunks = [ids[i : i + step] for i in range(0, len(ids), step)]
    if len(chunks) == 1:
        return chunks
    out = [chunks[0] + list(suffix)]
    out += [list(prefix) + c + list(suffix) for c in chunks[1:-1]]
    out.append(list(prefix) + chunks[-1])
    return out
