"""Imagenette through Doc-to-LoRA: an image internalized by a Gemma-3 VLM context encoder into a
LoRA for a text-only base model, which then names the class (the paper's cross-modal result,
official `scripts/main_exp/eval/imagenette_eval.py`: 75.03% with Gemma-3-4b-it -> Gemma-2-2b).

Per image: the context is a Gemma-3 user turn (empty system message) holding the image alone;
the query is the official prompt as a plain user turn of the base model, answered greedily (256
new tokens); the answer maps to a class by the official rules (`predicted_class`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import numpy as np

from hyperlora_jax.errors import InputError

CLASS_NAMES = (
    "tench",
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas pump",
    "golf ball",
    "parachute",
)
# Imagenette's folders (fast.ai release) are ImageNet synset ids, in the class order above.
WNIDS = (
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888605",
)
# The official prompt, word for word ("Response with only ..." included).
PROMPT = (
    "What is in this image? Choose exactly one of the following classes: "
    f"{', '.join(CLASS_NAMES)}. Response with only the correct class without any other text."
)
# Official extra spellings -> class (checked after the class names themselves, in this order).
ALIASES = (
    ("english springer spaniel", "English springer"),
    ("springer spaniel", "English springer"),
    ("chainsaw", "chain saw"),
    ("dump truck", "garbage truck"),
    ("refuse truck", "garbage truck"),
    ("garbage lorry", "garbage truck"),
    ("fuel pump", "gas pump"),
    ("gas station pump", "gas pump"),
    ("cassette deck", "cassette player"),
    ("cassette recorder", "cassette player"),
    ("fish", "tench"),
    ("tench fish", "tench"),
    ("french horn instrument", "French horn"),
    ("golfball", "golf ball"),
    ("skydiving", "parachute"),
    ("parachutist", "parachute"),
)


def _words(text: str) -> str:
    """Lower case, anything but [a-z0-9] and whitespace -> space, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9\s]", " ", text.lower()).split())


def _compact(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _alias_table() -> dict[str, int]:
    """Spelling (word form and compact form) -> class index, first registration wins the order
    in which matches are tried (as the official dict)."""
    table: dict[str, int] = {}
    pairs = [(v, n) for n in CLASS_NAMES for v in (n, n.replace(" ", ""), n.replace(" ", "-"))]
    for alias, name in pairs + list(ALIASES):
        for key in (_words(alias), _compact(_words(alias))):
            if key:
                table[key] = CLASS_NAMES.index(name)
    return table


_ALIASES = _alias_table()


def predicted_class(answer: str) -> int:
    """The class an answer names, as the official eval decides: the first known spelling found
    in the answer (word or compact form); else a class whose words all appear; else the class
    name closest to the answer (difflib ratio)."""
    words, compact = _words(answer), _compact(answer)
    for alias, cls in _ALIASES.items():
        if alias in words or alias in compact:
            return cls
    tokens = set(words.split())
    for i, name in enumerate(CLASS_NAMES):
        if set(_words(name).split()) <= tokens:
            return i
    ratios = [SequenceMatcher(None, words, _words(n)).ratio() for n in CLASS_NAMES]
    return int(np.argmax(ratios))  # first best, as the official strict `>` scan


def _class_of_folder(name: str) -> int | None:
    if name in WNIDS:
        return WNIDS.index(name)
    by_words = {_words(n): i for i, n in enumerate(CLASS_NAMES)}
    return by_words.get(_words(name.replace("_", " ")))


def list_images(root: str | Path, limit_per_class: int | None = None) -> list[tuple[Path, int]]:
    """(image path, class index) for DIR/<class>/<image>, <class> a synset id (n01440764, as
    Imagenette's folders) or a class name (tench, English_springer, ...); sorted."""
    from hyperlora_jax.models.vision import IMAGE_EXTENSIONS

    root = Path(root)
    if not root.is_dir():
        raise InputError(
            f"--images {root} is not a folder; give a folder with one subfolder per class"
        )
    items = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        cls = _class_of_folder(sub.name)
        if cls is None:
            raise InputError(
                f"folder {sub} is no Imagenette class; name class folders by synset id "
                f"({', '.join(WNIDS[:2])}, ...) or class name ({', '.join(CLASS_NAMES[:2])}, ...)"
            )
        files = sorted(f for f in sub.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        items += [(f, cls) for f in files[:limit_per_class]]
    if not items:
        raise InputError(f"no images under {root}/<class>/ (extensions {IMAGE_EXTENSIONS})")
    return items


def query_ids(tokenizer: Any, kind: str) -> list[int]:
    """The official query: the prompt as a lone user turn of the base model (Gemma: no system
    message, `<bos><start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n`)."""
    from hyperlora_jax.models.chat import _encode, format_user_turn

    if kind == "gemma":
        bos = tokenizer.bos_token or ""
        text = f"{bos}<start_of_turn>user\n{PROMPT}<end_of_turn>\n<start_of_turn>model\n"
        return _encode(tokenizer, text)
    return format_user_turn(PROMPT, tokenizer, kind)


def evaluate(
    d2l: Any,
    items: Sequence[tuple[Path, int]],
    *,
    max_new_tokens: int = 256,
    batch: int = 8,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """One record per image: internalize it (the VLM context encoder), answer the prompt with
    the base model + that adapter (greedy, `batch` images per generate call), score."""
    import jax
    import jax.numpy as jnp

    from hyperlora_jax.lora.adapter import Adapter
    from hyperlora_jax.models.chat import template_kind
    from hyperlora_jax.models.decoding import generate

    tok = d2l._need_tokenizer()
    ids = query_ids(tok, d2l.template_kind or template_kind(tok))
    records = []
    for start in range(0, len(items), batch):
        group = items[start : start + batch]
        ads = [d2l.internalize(images=[path]) for path, _ in group]
        stacked = Adapter(
            jax.tree.map(lambda *x: jnp.stack(x), *[a.a for a in ads]),
            jax.tree.map(lambda *x: jnp.stack(x), *[a.b for a in ads]),
            ads[0].scale,
        )
        out = generate(
            d2l.base_params,
            d2l.base_config,
            [ids] * len(group),
            max_new_tokens=max_new_tokens,
            adapter=stacked,
            tokenizer=tok,
            dtype=d2l.dtype,
        )
        for (path, label), text in zip(group, out.texts, strict=True):
            pred = predicted_class(text)
            records.append(
                {
                    "image": str(path),
                    "label": label,
                    "label_name": CLASS_NAMES[label],
                    "answer": text,
                    "pred": pred,
                    "pred_name": CLASS_NAMES[pred],
                    "correct": pred == label,
                }
            )
        if log is not None:
            done = records[-len(group) :]
            log(f"imagenette: {len(records)}/{len(items)} images, last: "
                f"{done[-1]['label_name']} -> {done[-1]['answer'][:40]!r}")  # fmt: skip
    return records


def summarize(records: Sequence[dict]) -> dict:
    """Accuracy, per-class accuracy (classes with images) and the 10x10 confusion matrix
    (rows: true class, columns: predicted)."""
    conf = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), np.int64)
    for r in records:
        conf[r["label"], r["pred"]] += 1
    per_class = {}
    for i, name in enumerate(CLASS_NAMES):
        n = int(conf[i].sum())
        if n:
            per_class[name] = {"n": n, "correct": int(conf[i, i]), "accuracy": conf[i, i] / n}
    n = len(records)
    return {
        "n": n,
        "accuracy": float(np.trace(conf) / n) if n else 0.0,
        "per_class": per_class,
        "confusion": conf.tolist(),
        "class_names": list(CLASS_NAMES),
        "prompt": PROMPT,
    }


def markdown(summary: dict) -> str:
    lines = ["| class | images | correct | accuracy |", "|---|---:|---:|---:|"]
    for name, s in summary["per_class"].items():
        lines.append(f"| {name} | {s['n']} | {s['correct']} | {s['accuracy']:.2%} |")
    lines.append(f"| **all** | {summary['n']} | | **{summary['accuracy']:.2%}** |")
    return "\n".join(lines) + "\n"
