"""Bad inputs against every CLI verb (issue 21): each must give ONE line naming the problem, exit
code 2 and leave no half-written output. The table is also benchmarks/results/bad_inputs.md
(`python benchmarks/bad_inputs_table.py`)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hyperlora_jax.cli import main
from hyperlora_jax.embedded import EMBEDDED_D2L, EMBEDDED_T2L

FIX = Path(__file__).parent / "fixtures" / "official"
D2L_BIN = FIX / "d2l" / "pytorch_model.bin"
GEMMA = FIX / "d2l" / "tiny-gemma2"
T2L_RELEASE = FIX / "t2l" / "t2l_release"
MISTRAL = FIX / "t2l" / "tiny-mistral"
PLACES = {"d2l_bin": D2L_BIN, "gemma": GEMMA, "t2l_release": T2L_RELEASE, "mistral": MISTRAL}


@dataclass
class Case:
    id: str
    argv: list[str]  # "{tmp}" and the PLACES names are filled in
    expect: str  # fragment of the one error line
    what: str  # the bad input, in words (the markdown table)
    setup: Callable[[Path], None] | None = None
    out: str | None = None  # output path (under tmp) that must not exist afterwards
    keep: str | None = None  # pre-existing path (under tmp) that must be unchanged afterwards
    check: Callable[[Path], None] | None = None  # extra assertion
    marks: list = field(default_factory=list)

    def command(self) -> str:
        words = [w for w in self.argv if not w.startswith("-")][:2]
        sub = words[1] if len(words) > 1 and "{" not in words[1] else ""
        return f"{words[0]} {sub}".strip() if words[0] in ("convert", "data", "eval") else words[0]


# --------------------------------------------------------------------------- setup helpers
def _image(rel: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        from PIL import Image

        Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp / rel)

    return setup


def _write(rel: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


def _both(*fns) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for f in fns:
            f(tmp)

    return setup


class _Evil:
    """Unpickling this runs `touch PWNED` unless the unpickler refuses os.system."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(rel: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(pickle.dumps({"state": _Evil(str(tmp / "PWNED"))}))

    return setup


def _not_pwned(tmp: Path) -> None:
    assert not (tmp / "PWNED").exists(), "the malicious pickle ran"


def _adapter(rel: str, layers=5, d=32, meta_json: str | None = None, truncate=False):
    """A valid adapter folder (for a 5-layer width-32 model, so not tiny-gemma2/mistral), then
    optionally a replaced adapter.json or a truncated weights file."""

    def setup(tmp: Path) -> None:
        import numpy as np

        from hyperlora_jax.lora.adapter import Adapter
        from hyperlora_jax.lora.storage import save_adapter

        a = {"q_proj": np.zeros((layers, 2, d), np.float32)}
        b = {"q_proj": np.zeros((layers, 2, d), np.float32)}
        out = save_adapter(Adapter(a, b, 1.0), tmp / rel, {"base_model": str(GEMMA)})
        if meta_json is not None:
            if meta_json == "<missing>":
                (out / "adapter.json").unlink()
            else:
                (out / "adapter.json").write_text(meta_json)
        if truncate:
            w = out / "adapter.safetensors"
            w.write_bytes(w.read_bytes()[:50])

    return setup


def _t2l_release(rel: str, replace: dict[str, str | None]) -> Callable[[Path], None]:
    """A copy of the tiny T2L release with some files replaced (None: deleted)."""

    def setup(tmp: Path) -> None:
        dst = tmp / rel
        shutil.copytree(T2L_RELEASE, dst)
        for name, text in replace.items():
            if text is None:
                (dst / name).unlink()
            else:
                (dst / name).write_text(text)

    return setup


def _checkpoint_copy(rel: str, src: Path) -> Callable[[Path], None]:
    """Our checkpoint folder with its weights cut to 100 bytes (config files intact)."""

    def setup(tmp: Path) -> None:
        dst = tmp / rel
        dst.mkdir(parents=True)
        for f in src.iterdir():
            if f.suffix == ".json":
                shutil.copy(f, dst / f.name)
        (dst / "params.safetensors").write_bytes((src / "params.safetensors").read_bytes()[:100])

    return setup


def _nonempty(rel: str) -> Callable[[Path], None]:
    return _write(f"{rel}/precious.txt", "keep me")


def _qa_ok(rel: str) -> Callable[[Path], None]:
    row = {"context": "The sky is green.", "question": "What color?", "answers": ["green"]}
    return _write(rel, json.dumps(row) + "\n")


def _boolq(rel: str) -> Callable[[Path], None]:
    return _write(rel, json.dumps({"passage": "p", "question": "q", "answer": True}) + "\n")


TINY = "configs/d2l.py:tiny"

# ----------------------------------------------------------------------------------- the table
CASES = [
    # fetch-model
    Case(
        "fetch-unknown",
        ["fetch-model", "no-such-model"],
        "unknown model 'no-such-model'",
        "unknown model name",
    ),
    Case(
        "fetch-not-model",
        ["fetch-model", "{tmp}/notes.txt", "--dest", "{tmp}/out"],
        "is neither a model folder",
        "a text file as the model",
        setup=_write("notes.txt", "hello"),
        out="out",
    ),
    Case(
        "fetch-empty-dir",
        ["fetch-model", "{tmp}/empty", "--dest", "{tmp}/out"],
        "is neither a model folder",
        "an empty folder as the model",
        setup=lambda t: (t / "empty").mkdir(),
        out="out",
    ),
    # chat
    Case(
        "chat-missing-model",
        ["chat", "--model", "{tmp}/nope", "--prompt", "hi"],
        "nope",
        "missing model folder",
    ),
    Case(
        "chat-empty-prompt",
        ["chat", "--model", "{gemma}", "--prompt", "  "],
        "--prompt is empty",
        "blank prompt",
    ),
    Case(
        "chat-zero-tokens",
        ["chat", "--model", "{gemma}", "--prompt", "hi", "--max-new-tokens", "0"],
        "--max-new-tokens: must be a positive integer",
        "--max-new-tokens 0",
    ),
    Case(
        "chat-top-p",
        ["chat", "--model", "{gemma}", "--prompt", "hi", "--top-p", "1.5"],
        "--top-p: must be a number in (0, 1]",
        "--top-p 1.5",
    ),
    Case(
        "chat-neg-temperature",
        ["chat", "--model", "{gemma}", "--prompt", "hi", "--temperature", "-1"],
        "--temperature: must be a number >= 0",
        "--temperature -1",
    ),
    Case(
        "chat-missing-adapter",
        ["chat", "--model", "{gemma}", "--prompt", "hi", "--adapter", "{tmp}/nope"],
        "no adapter folder at",
        "missing adapter folder",
    ),
    Case(
        "chat-adapter-other-model",
        ["chat", "--model", "{gemma}", "--prompt", "hi", "--adapter", "{tmp}/ad"],
        "layer",
        "adapter for another model (5 layers, width 32)",
        setup=_adapter("ad"),
    ),
    # export-peft
    Case(
        "peft-missing-dir",
        ["export-peft", "{tmp}/nope", "{tmp}/out"],
        "no adapter.json",
        "missing adapter folder",
        out="out",
    ),
    Case(
        "peft-file-as-dir",
        ["export-peft", "{tmp}/f.txt", "{tmp}/out"],
        "f.txt",
        "a file as the adapter folder",
        setup=_write("f.txt", "x"),
        out="out",
    ),
    Case(
        "peft-no-meta",
        ["export-peft", "{tmp}/ad", "{tmp}/out"],
        "no adapter.json",
        "adapter folder without adapter.json",
        setup=_adapter("ad", meta_json="<missing>"),
        out="out",
    ),
    Case(
        "peft-bad-meta",
        ["export-peft", "{tmp}/ad", "{tmp}/out"],
        "is not valid JSON",
        "corrupted adapter.json",
        setup=_adapter("ad", meta_json="{not json"),
        out="out",
    ),
    Case(
        "peft-list-meta",
        ["export-peft", "{tmp}/ad", "{tmp}/out"],
        "adapter.json",
        "adapter.json holding a list",
        setup=_adapter("ad", meta_json="[1, 2]"),
        out="out",
    ),
    Case(
        "peft-truncated",
        ["export-peft", "{tmp}/ad", "{tmp}/out"],
        "adapter.safetensors",
        "truncated adapter.safetensors",
        setup=_adapter("ad", truncate=True),
        out="out",
    ),
    Case(
        "peft-other-model",
        ["export-peft", "{tmp}/ad", "{tmp}/out", "--base-model", "{gemma}"],
        "layer",
        "adapter for another model",
        setup=_adapter("ad"),
        out="out",
    ),
    Case(
        "peft-out-exists",
        ["export-peft", "{tmp}/ad", "{tmp}/out", "--base-model", "{gemma}"],
        "is not empty",
        "non-empty output folder, no --overwrite",
        setup=_both(_adapter("ad", layers=3, d=64), _nonempty("out")),
        keep="out",
    ),
    # internalize
    Case(
        "intern-missing-doc",
        [
            "internalize",
            "--hypernet",
            "{d2l_bin}",
            "--base-model",
            "{gemma}",
            "--doc",
            "{tmp}/nope.txt",
            "--out",
            "{tmp}/out",
        ],
        "no document file",
        "missing --doc",
        out="out",
    ),
    Case(
        "intern-bad-mesh",
        [
            "internalize",
            "--hypernet",
            "{d2l_bin}",
            "--base-model",
            "{gemma}",
            "--doc",
            "{tmp}/d.txt",
            "--out",
            "{tmp}/out",
            "--mesh",
            "dp=2",
        ],
        "bad mesh spec",
        "--mesh with an unknown axis",
        setup=_write("d.txt", "A document."),
        out="out",
    ),
    Case(
        "intern-empty-doc",
        [
            "internalize",
            "--hypernet",
            "{d2l_bin}",
            "--base-model",
            "{gemma}",
            "--doc",
            "{tmp}/d.txt",
            "--out",
            "{tmp}/out",
        ],
        "is empty",
        "empty document",
        setup=_write("d.txt", "\n  \n"),
        out="out",
    ),
    Case(
        "intern-doc-is-dir",
        [
            "internalize",
            "--hypernet",
            "{d2l_bin}",
            "--base-model",
            "{gemma}",
            "--doc",
            "{tmp}",
            "--out",
            "{tmp}/out",
        ],
        "no document file",
        "a folder as --doc",
        out="out",
    ),
    Case(
        "intern-binary-doc",
        [
            "internalize",
            "--hypernet",
            "{d2l_bin}",
            "--base-model",
            "{gemma}",
            "--doc",
            "{tmp}/d.txt",
            "--out",
            "{tmp}/out",
        ],
        "is not UTF-8",
        "non-UTF-8 document",
        setup=_write("d.txt", b"\xff\xfe\x00bad"),
        out="out",
    ),
    Case(
        "intern-chunk-neg",
        [
            "internalize",
            "--hypernet",
            "{d2l_bin}",
            "--doc",
            "{tmp}/d.txt",
            "--out",
            "{tmp}/out",
            "--chunk-size",
            "-5",
        ],
        "--chunk-size: must be a positive integer",
        "--chunk-size -5",
        setup=_write("d.txt", "text"),
        out="out",
    ),
    Case(
        "intern-chunk-zero",
        [
            "internalize",
            "--hypernet",
            "{d2l_bin}",
            "--doc",
            "{tmp}/d.txt",
            "--out",
            "{tmp}/out",
            "--chunk-size",
            "0",
        ],
        "--chunk-size: must be a positive integer",
        "--chunk-size 0",
        setup=_write("d.txt", "text"),
        out="out",
    ),
    Case(
        "intern-missing-hypernet",
        [
            "internalize",
            "--hypernet",
            "{tmp}/nope.bin",
            "--doc",
            "{tmp}/d.txt",
            "--out",
            "{tmp}/out",
        ],
        "nope.bin",
        "missing --hypernet",
        setup=_write("d.txt", "text"),
        out="out",
    ),
    Case(
        "intern-not-pickle",
        [
            "internalize",
            "--hypernet",
            "{tmp}/h.bin",
            "--base-model",
            "{gemma}",
            "--doc",
            "{tmp}/d.txt",
            "--out",
            "{tmp}/out",
        ],
        "h.bin",
        "--hypernet .bin that is not a pickle",
        setup=_both(_write("d.txt", "text"), _write("h.bin", "plain text")),
        out="out",
    ),
    Case(
        "intern-evil-pickle",
        [
            "internalize",
            "--hypernet",
            "{tmp}/h.bin",
            "--base-model",
            "{gemma}",
            "--doc",
            "{tmp}/d.txt",
            "--out",
            "{tmp}/out",
        ],
        "refusing to unpickle global posix.system",
        "--hypernet malicious pickle (os.system)",
        setup=_both(_write("d.txt", "text"), _evil_pickle("h.bin")),
        out="out",
        check=_not_pwned,
    ),
    Case(
        "intern-truncated-params",
        ["internalize", "--hypernet", "{tmp}/h", "--doc", "{tmp}/d.txt", "--out", "{tmp}/out"],
        "params.safetensors",
        "our D2L checkpoint with a truncated params.safetensors",
        setup=_both(_write("d.txt", "text"), _checkpoint_copy("h", EMBEDDED_D2L)),
        out="out",
    ),
    Case(
        "intern-out-exists",
        [
            "internalize",
            "--hypernet",
            "{d2l_bin}",
            "--base-model",
            "{gemma}",
            "--doc",
            "{tmp}/d.txt",
            "--out",
            "{tmp}/out",
        ],
        "is not empty",
        "non-empty --out, no --overwrite",
        setup=_both(_write("d.txt", "The sky is green."), _nonempty("out")),
        keep="out",
    ),
    Case(
        "intern-other-family",
        [
            "internalize",
            "--hypernet",
            "{d2l_bin}",
            "--base-model",
            "{mistral}",
            "--doc",
            "{tmp}/d.txt",
            "--out",
            "{tmp}/out",
        ],
        "gemma2 family",
        "D2L checkpoint (gemma2) + base model of another family (mistral)",
        setup=_write("d.txt", "The sky is green."),
        out="out",
    ),
    Case(
        "intern-no-doc-no-image",
        ["internalize", "--hypernet", "{d2l_bin}", "--out", "{tmp}/out"],
        "give --doc FILE and/or --image FILE",
        "neither --doc nor --image",
        out="out",
    ),
    Case(
        "intern-missing-image",
        [
            "internalize",
            "--hypernet",
            "{d2l_bin}",
            "--image",
            "{tmp}/nope.png",
            "--out",
            "{tmp}/out",
        ],
        "does not exist",
        "missing --image file",
        out="out",
    ),
    Case(
        "intern-unreadable-image",
        ["internalize", "--hypernet", "{d2l_bin}", "--image", "{tmp}/i.png", "--out", "{tmp}/out"],
        "cannot read image",
        "--image that is no image (text in a .png)",
        setup=_write("i.png", "not an image"),
        out="out",
    ),
    Case(
        "intern-image-text-encoder",
        [
            "internalize",
            "--hypernet",
            "{d2l_bin}",
            "--base-model",
            "{gemma}",
            "--image",
            "{tmp}/i.png",
            "--out",
            "{tmp}/out",
        ],
        "no vision tower",
        "--image with a text-only context encoder (the base model itself)",
        setup=_image("i.png"),
        out="out",
    ),
    # generate-adapter
    Case(
        "gen-no-task",
        ["generate-adapter", "--out", "{tmp}/out"],
        "give at least one --task",
        "no --task",
        out="out",
    ),
    Case(
        "gen-blank-task",
        ["generate-adapter", "--task", " ", "--out", "{tmp}/out"],
        "task description #0 is empty",
        "blank --task",
        out="out",
    ),
    Case(
        "gen-missing-hypernet",
        ["generate-adapter", "--hypernet", "{tmp}/nope", "--task", "t", "--out", "{tmp}/out"],
        "nope",
        "missing --hypernet",
        out="out",
    ),
    Case(
        "gen-bad-t2l-json",
        ["generate-adapter", "--hypernet", "{tmp}/h", "--task", "t", "--out", "{tmp}/out"],
        "t2l.json",
        "corrupted t2l.json",
        setup=_write("h/t2l.json", "{oops"),
        out="out",
    ),
    Case(
        "gen-list-t2l-json",
        ["generate-adapter", "--hypernet", "{tmp}/h", "--task", "t", "--out", "{tmp}/out"],
        "t2l.json",
        "t2l.json holding a list",
        setup=_write("h/t2l.json", "[1]"),
        out="out",
    ),
    Case(
        "gen-truncated-params",
        ["generate-adapter", "--hypernet", "{tmp}/h", "--task", "t", "--out", "{tmp}/out"],
        "params.safetensors",
        "truncated params.safetensors",
        setup=_checkpoint_copy("h", EMBEDDED_T2L),
        out="out",
    ),
    Case(
        "gen-bad-embeddings",
        ["generate-adapter", "--task", "t", "--embeddings", "{tmp}/e.npy", "--out", "{tmp}/out"],
        "e.npy",
        "--embeddings that is not .npy",
        setup=_write("e.npy", "text"),
        out="out",
    ),
    Case(
        "gen-missing-embeddings",
        ["generate-adapter", "--task", "t", "--embeddings", "{tmp}/e.npy", "--out", "{tmp}/out"],
        "e.npy",
        "missing --embeddings file",
        out="out",
    ),
    Case(
        "gen-out-exists",
        ["generate-adapter", "--task", "t", "--out", "{tmp}/out"],
        "is not empty",
        "non-empty --out, no --overwrite",
        setup=_nonempty("out"),
        keep="out",
    ),
    # convert
    Case(
        "conv-d2l-missing",
        ["convert", "official-d2l", "{tmp}/nope.bin", "{tmp}/out"],
        "nope.bin",
        "missing checkpoint",
        out="out",
    ),
    Case(
        "conv-d2l-dir",
        ["convert", "official-d2l", "{tmp}", "{tmp}/out"],
        "",
        "a folder as the checkpoint",
        out="out",
    ),
    Case(
        "conv-d2l-not-pickle",
        ["convert", "official-d2l", "{tmp}/h.bin", "{tmp}/out"],
        "h.bin",
        "checkpoint that is not a pickle",
        setup=_write("h.bin", "plain text"),
        out="out",
    ),
    Case(
        "conv-d2l-empty",
        ["convert", "official-d2l", "{tmp}/h.bin", "{tmp}/out"],
        "h.bin",
        "empty checkpoint file",
        setup=_write("h.bin", b""),
        out="out",
    ),
    Case(
        "conv-d2l-evil",
        ["convert", "official-d2l", "{tmp}/h.bin", "{tmp}/out"],
        "refusing to unpickle global posix.system",
        "malicious pickle (os.system)",
        setup=_evil_pickle("h.bin"),
        out="out",
        check=_not_pwned,
    ),
    Case(
        "conv-d2l-out-exists",
        ["convert", "official-d2l", "{d2l_bin}", "{tmp}/out"],
        "is not empty",
        "non-empty output folder",
        setup=_nonempty("out"),
        keep="out",
    ),
    Case(
        "conv-t2l-missing",
        ["convert", "official-t2l", "{tmp}/nope", "{tmp}/out"],
        "nope",
        "missing release folder",
        out="out",
    ),
    Case(
        "conv-t2l-no-hypermod",
        ["convert", "official-t2l", "{tmp}/rel", "{tmp}/out"],
        "hypermod.pt",
        "release without hypermod.pt",
        setup=_t2l_release("rel", {"hypermod.pt": None}),
        out="out",
    ),
    Case(
        "conv-t2l-yaml-list",
        ["convert", "official-t2l", "{tmp}/rel", "{tmp}/out"],
        "args.yaml",
        "args.yaml that is a list, not a mapping",
        setup=_t2l_release("rel", {"args.yaml": "- a\n- b\n"}),
        out="out",
    ),
    Case(
        "conv-t2l-yaml-broken",
        ["convert", "official-t2l", "{tmp}/rel", "{tmp}/out"],
        "args.yaml",
        "args.yaml that is not YAML",
        setup=_t2l_release("rel", {"args.yaml": "a: [unclosed\n  b: {"}),
        out="out",
    ),
    Case(
        "conv-t2l-yaml-no-keys",
        ["convert", "official-t2l", "{tmp}/rel", "{tmp}/out"],
        "missing",
        "args.yaml mapping without the training keys",
        setup=_t2l_release("rel", {"args.yaml": "a: 1\n"}),
        out="out",
    ),
    Case(
        "conv-t2l-bad-adapter-cfg",
        ["convert", "official-t2l", "{tmp}/rel", "{tmp}/out"],
        "adapter_config.json",
        "adapter_config.json that is not JSON",
        setup=_t2l_release("rel", {"adapter_config.json": "{nope"}),
        out="out",
    ),
    Case(
        "conv-t2l-missing-base",
        ["convert", "official-t2l", "{t2l_release}", "{tmp}/out", "--base-model", "{tmp}/nope"],
        "nope",
        "missing --base-model folder",
        out="out",
    ),
    # data
    Case("inspect-missing", ["data", "inspect", "{tmp}/nope.jsonl"], "nope.jsonl", "missing path"),
    Case(
        "inspect-bad-jsonl",
        ["data", "inspect", "{tmp}/x.jsonl"],
        "x.jsonl",
        "a file of broken JSONL",
        setup=_write("x.jsonl", '{"a": 1}\n{broken\n'),
    ),
    Case(
        "niah-neg-test",
        ["data", "niah", "--tokenizer", "{gemma}", "--n-test", "-3", "--out", "{tmp}/out"],
        "--n-test: must be",
        "--n-test -3",
        out="out",
    ),
    Case(
        "niah-missing-tok",
        ["data", "niah", "--tokenizer", "{tmp}/nope", "--out", "{tmp}/out"],
        "nope",
        "missing tokenizer folder",
        out="out",
    ),
    Case(
        "niah-bad-bins",
        ["data", "niah", "--tokenizer", "{gemma}", "--bins", "banana", "--out", "{tmp}/out"],
        "banana",
        "--bins banana",
        out="out",
    ),
    Case(
        "niah-missing-pieces",
        ["data", "niah", "--pieces", "{tmp}/p.json", "--format", "tokens", "--out", "{tmp}/out"],
        "p.json",
        "missing --pieces file",
        out="out",
    ),
    Case(
        "niah-bad-pieces",
        ["data", "niah", "--pieces", "{tmp}/p.json", "--format", "tokens", "--out", "{tmp}/out"],
        "p.json",
        "--pieces file of broken JSON",
        setup=_write("p.json", "{nope"),
        out="out",
    ),
    Case(
        "niah-pieces-list",
        ["data", "niah", "--pieces", "{tmp}/p.json", "--format", "tokens", "--out", "{tmp}/out"],
        "p.json",
        "--pieces JSON that is a list",
        setup=_write("p.json", "[1, 2]"),
        out="out",
    ),
    Case(
        "pieces-missing-tok",
        ["data", "niah-pieces", "--tokenizer", "{tmp}/nope", "--out", "{tmp}/p.json"],
        "nope",
        "missing tokenizer",
        out="p.json",
    ),
    Case(
        "facts-neg-test",
        ["data", "facts", "--n-test", "-3", "--out", "{tmp}/out"],
        "--n-test: must be",
        "--n-test -3",
        out="out",
    ),
    Case(
        "facts-tokens-no-tok",
        ["data", "facts", "--format", "tokens", "--out", "{tmp}/out"],
        "needs --tokenizer",
        "--format tokens without --tokenizer",
        out="out",
    ),
    Case(
        "facts-out-is-file",
        ["data", "facts", "--n-train", "2", "--n-test", "1", "--out", "{tmp}/out"],
        "is a file",
        "--out is a file",
        setup=_write("out", "precious"),
        keep="out",
    ),
    Case(
        "suite-neg-test",
        ["data", "task-suite", "--n-test", "-3", "--out", "{tmp}/out"],
        "--n-test: must be",
        "--n-test -3",
        out="out",
    ),
    Case(
        "selfgen-missing-docs",
        [
            "data",
            "selfgen",
            "--model",
            "{gemma}",
            "--docs",
            "{tmp}/nope.jsonl",
            "--out",
            "{tmp}/o.jsonl",
        ],
        "nope.jsonl",
        "missing --docs",
        out="o.jsonl",
    ),
    Case(
        "selfgen-empty-docs",
        [
            "data",
            "selfgen",
            "--model",
            "{gemma}",
            "--docs",
            "{tmp}/d.jsonl",
            "--out",
            "{tmp}/o.jsonl",
        ],
        "d.jsonl",
        "empty --docs file",
        setup=_write("d.jsonl", ""),
        out="o.jsonl",
    ),
    Case(
        "selfgen-bad-jsonl",
        [
            "data",
            "selfgen",
            "--model",
            "{gemma}",
            "--docs",
            "{tmp}/d.jsonl",
            "--out",
            "{tmp}/o.jsonl",
        ],
        "d.jsonl",
        "--docs of broken JSONL",
        setup=_write("d.jsonl", "{broken\n"),
        out="o.jsonl",
    ),
    Case(
        "selfgen-neg-limit",
        [
            "data",
            "selfgen",
            "--model",
            "{gemma}",
            "--docs",
            "{tmp}/d.jsonl",
            "--out",
            "{tmp}/o.jsonl",
            "--limit",
            "-1",
        ],
        "--limit: must be a positive integer",
        "--limit -1",
        setup=_write("d.jsonl", '{"text": "doc"}\n'),
        out="o.jsonl",
    ),
    Case(
        "selfgen-bad-suffix",
        [
            "data",
            "selfgen",
            "--model",
            "{gemma}",
            "--docs",
            "{tmp}/d.jsonl",
            "--out",
            "{tmp}/o.txt",
        ],
        "use a .parquet, .jsonl",
        "--out with an unknown suffix",
        setup=_write("d.jsonl", '{"text": "doc"}\n'),
        out="o.txt",
    ),
    Case(
        "selfgen-bad-process-index",
        [
            "data",
            "selfgen",
            "--model",
            "{gemma}",
            "--docs",
            "{tmp}/d.jsonl",
            "--out",
            "{tmp}/o.jsonl",
            "--num-processes",
            "2",
            "--process-index",
            "2",
        ],
        "--process-index 0..N-1",
        "--process-index not below --num-processes",
        setup=_write("d.jsonl", '{"text": "doc"}\n'),
        out="o.jsonl",
    ),
    Case(
        "selfgen-mesh-too-big",
        [
            "data",
            "selfgen",
            "--model",
            "{gemma}",
            "--docs",
            "{tmp}/d.jsonl",
            "--out",
            "{tmp}/o.jsonl",
            "--mesh",
            "data=64",
        ],
        "change the mesh sizes",
        "--mesh needing more devices than are visible",
        setup=_write("d.jsonl", '{"text": "doc"}\n'),
        out="o.jsonl",
    ),
    # train / plan / export-run
    Case(
        "train-missing-config",
        ["train", "--config", "{tmp}/nope.py:tiny", "--workdir", "{tmp}/run"],
        "nope.py",
        "missing config file",
        out="run",
    ),
    Case(
        "train-unknown-preset",
        ["train", "--config", "configs/d2l.py:banana", "--workdir", "{tmp}/run"],
        "banana",
        "unknown preset",
        out="run",
    ),
    Case(
        "train-unknown-key",
        ["train", "--config", TINY, "--config.train.nosuch=1", "--workdir", "{tmp}/run"],
        "unknown key 'nosuch'",
        "unknown --config override key",
        out="run",
    ),
    Case(
        "train-wrong-type",
        ["train", "--config", TINY, "--config.train.steps=abc", "--workdir", "{tmp}/run"],
        "steps",
        "--config.train.steps=abc",
        out="run",
    ),
    Case(
        "train-loss-banana",
        ["train", "--config", TINY, "--config.train.loss=banana", "--workdir", "{tmp}/run"],
        "banana",
        "--config.train.loss=banana",
        out="run",
    ),
    Case(
        "train-neg-lr",
        ["train", "--config", TINY, "--config.train.learning_rate=-1e-3", "--workdir", "{tmp}/run"],
        "learning_rate",
        "negative learning rate",
        out="run",
    ),
    Case(
        "train-no-config", ["train", "--workdir", "{tmp}/run"], "--config", "no --config", out="run"
    ),
    Case(
        "train-missing-data",
        ["train", "--config", TINY, "--data", "{tmp}/nope.jsonl", "--workdir", "{tmp}/run"],
        "nope.jsonl",
        "missing --data",
        out="run",
    ),
    Case(
        "train-unknown-flag",
        ["train", "--config", TINY, "--wrokdir", "{tmp}/run"],
        "wrokdir",
        "misspelt flag",
        out="run",
    ),
    Case(
        "plan-mesh-zero",
        ["plan", "--config", TINY, "--mesh", "data=0"],
        "data=0; each axis size must be >= 1",
        "--mesh data=0",
    ),
    Case(
        "plan-mesh-axis",
        ["plan", "--config", TINY, "--mesh", "pipeline=2"],
        "bad mesh spec",
        "--mesh pipeline=2",
    ),
    Case("plan-no-mesh", ["plan", "--config", TINY], "--mesh", "no --mesh"),
    Case(
        "plan-unknown-chip",
        ["plan", "--config", TINY, "--mesh", "data=2", "--analytic_only", "--chip", "tpu9"],
        "unknown --chip 'tpu9'; choose one of v4, v5e",
        "--chip tpu9",
    ),
    Case(
        "plan-mesh-rest",
        ["plan", "--config", TINY, "--mesh", "data=-1,fsdp=2"],
        "give every axis a size",
        "--mesh with a -1 axis (plan has no devices to fill it)",
    ),
    Case(
        "export-missing-run",
        ["export-run", "--workdir", "{tmp}/nope", "--out", "{tmp}/out"],
        "nope",
        "missing --workdir",
        out="out",
    ),
    Case(
        "export-empty-run",
        ["export-run", "--workdir", "{tmp}/run", "--out", "{tmp}/out"],
        "run",
        "--workdir with no checkpoint",
        setup=lambda t: (t / "run").mkdir(),
        out="out",
    ),
    # eval
    Case(
        "eval-d2l-missing-qa",
        [
            "eval",
            "d2l",
            "--base",
            "{gemma}",
            "--qa",
            "{tmp}/nope.jsonl",
            "--methods",
            "no_context",
            "--out",
            "{tmp}/out",
        ],
        "nope.jsonl",
        "missing --qa file",
        out="out",
    ),
    Case(
        "eval-d2l-bad-qa",
        [
            "eval",
            "d2l",
            "--base",
            "{gemma}",
            "--qa",
            "{tmp}/qa.jsonl",
            "--methods",
            "no_context",
            "--out",
            "{tmp}/out",
        ],
        "qa.jsonl",
        "--qa of broken JSONL",
        setup=_write("qa.jsonl", "{broken\n"),
        out="out",
    ),
    Case(
        "eval-d2l-neg-limit",
        [
            "eval",
            "d2l",
            "--base",
            "{gemma}",
            "--qa",
            "{tmp}/qa.jsonl",
            "--methods",
            "no_context",
            "--limit",
            "-1",
            "--out",
            "{tmp}/out",
        ],
        "--limit: must be a positive integer",
        "--limit -1",
        setup=_qa_ok("qa.jsonl"),
        out="out",
    ),
    Case(
        "eval-d2l-zero-tokens",
        [
            "eval",
            "d2l",
            "--base",
            "{gemma}",
            "--qa",
            "{tmp}/qa.jsonl",
            "--methods",
            "no_context",
            "--max-new-tokens",
            "0",
            "--out",
            "{tmp}/out",
        ],
        "--max-new-tokens: must be a positive integer",
        "--max-new-tokens 0",
        setup=_qa_ok("qa.jsonl"),
        out="out",
    ),
    Case(
        "eval-d2l-not-pickle",
        [
            "eval",
            "d2l",
            "--base",
            "{gemma}",
            "--checkpoint",
            "{tmp}/h.bin",
            "--qa",
            "{tmp}/qa.jsonl",
            "--out",
            "{tmp}/out",
        ],
        "h.bin",
        "--checkpoint that is not a pickle",
        setup=_both(_qa_ok("qa.jsonl"), _write("h.bin", "text")),
        out="out",
    ),
    Case(
        "eval-d2l-bad-method",
        [
            "eval",
            "d2l",
            "--base",
            "{gemma}",
            "--qa",
            "{tmp}/qa.jsonl",
            "--methods",
            "magic",
            "--out",
            "{tmp}/out",
        ],
        "unknown method(s) ['magic']",
        "--methods magic",
        out="out",
    ),
    Case(
        "eval-d2l-bad-dtype",
        [
            "eval",
            "d2l",
            "--base",
            "{gemma}",
            "--qa",
            "{tmp}/qa.jsonl",
            "--methods",
            "no_context",
            "--dtype",
            "float7",
            "--out",
            "{tmp}/out",
        ],
        "invalid choice: 'float7'",
        "--dtype float7",
        setup=_qa_ok("qa.jsonl"),
        out="out",
    ),
    Case(
        "eval-d2l-out-is-file",
        [
            "eval",
            "d2l",
            "--base",
            "{gemma}",
            "--qa",
            "{tmp}/qa.jsonl",
            "--methods",
            "no_context",
            "--limit",
            "1",
            "--out",
            "{tmp}/o",
        ],
        "is a file",
        "--out is a file",
        setup=_both(_qa_ok("qa.jsonl"), _write("o", "precious")),
        keep="o",
    ),
    Case(
        "eval-t2l-missing-task",
        [
            "eval",
            "t2l",
            "--base",
            "{gemma}",
            "--modes",
            "base",
            "--task",
            "boolq={tmp}/nope.jsonl",
            "--out",
            "{tmp}/out",
        ],
        "nope.jsonl",
        "missing --task file",
        out="out",
    ),
    Case(
        "eval-t2l-neg-limit",
        [
            "eval",
            "t2l",
            "--base",
            "{gemma}",
            "--modes",
            "base",
            "--task",
            "boolq={tmp}/b.jsonl",
            "--limit",
            "-1",
            "--out",
            "{tmp}/out",
        ],
        "--limit: must be a positive integer",
        "--limit -1",
        setup=_boolq("b.jsonl"),
        out="out",
    ),
    Case(
        "eval-suite-missing",
        ["eval", "t2l-suite", "--base", "{gemma}", "--suite", "{tmp}/nope", "--out", "{tmp}/out"],
        "nope",
        "missing --suite folder",
        out="out",
    ),
    # demo
    Case(
        "demo-missing-doc",
        ["demo", "--document", "{tmp}/nope.txt"],
        "nope.txt",
        "missing --document",
    ),
    Case(
        "demo-bad-questions",
        ["demo", "--questions", "{tmp}/q.json"],
        "q.json",
        "--questions of broken JSON",
        setup=_write("q.json", "[{"),
    ),
    Case(
        "demo-questions-mapping",
        ["demo", "--questions", "{tmp}/q.json"],
        "q.json",
        "--questions that is a mapping, not a list",
        setup=_write("q.json", '{"a": 1}'),
    ),
    Case(
        "demo-bad-t2l-task",
        ["demo", "--t2l-task", "{tmp}/t.json"],
        "t.json",
        "--t2l-task without inputs",
        setup=_write("t.json", '{"description": "x"}'),
    ),
    Case(
        "demo-missing-checkpoint",
        ["demo", "--checkpoint", "{tmp}/nope"],
        "nope",
        "missing --checkpoint",
    ),
]


def _snapshot(p: Path):
    if p.is_file():
        return p.read_bytes()
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def run_case(case: Case, tmp: Path) -> int:
    """Set up and run one case in-process; return the exit code (stderr is the caller's)."""
    if case.setup:
        case.setup(tmp)
    argv = [a.format(tmp=tmp, **PLACES) for a in case.argv]
    try:
        return main(argv)
    except SystemExit as e:  # argparse usage errors
        return e.code


def error_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if "error:" in x]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys):
    kept = None
    if case.keep:
        case.setup(tmp_path)
        kept = _snapshot(tmp_path / case.keep)
        case = Case(**{**case.__dict__, "setup": None})
    rc = run_case(case, tmp_path)
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    # the error is the last thing printed: a message with line breaks would fail here
    assert err.strip().splitlines()[-1] == lines[0], err
    assert case.expect in lines[0], err
    if case.out:
        assert not (tmp_path / case.out).exists(), f"{case.out} was (half-)written"
    if case.keep:
        assert _snapshot(tmp_path / case.keep) == kept, f"{case.keep} was changed"
    if case.check:
        case.check(tmp_path)


def test_table_is_big_enough():
    assert len(CASES) >= 45
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(bool(c.marks) for c in CASES) <= 5
