"""`make demo` installs no PyTorch, yet `fetch-model` must write the same model folder: the GGUF
tokenizer is then read through fetch.py's torch-free path. Here a subprocess that cannot import
torch converts GGUFs, and every file must equal what this (torch) environment writes."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hyperlora_jax.models.fetch import convert_gguf, gguf_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_and_fetch import write_tiny_gguf  # noqa: E402

NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` fails, find_spec("torch") is None: as without torch
from hyperlora_jax.models.fetch import convert_gguf, gguf_tokenizer
if sys.argv[3] == "all":
    convert_gguf(sys.argv[1], sys.argv[2])
else:
    gguf_tokenizer(sys.argv[1]).save_pretrained(sys.argv[2])
assert "torch" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
"""


def _convert_both(gguf: Path, tmp_path: Path, what: str = "all") -> tuple[Path, Path]:
    """(this environment's folder, the torch-free one): the whole conversion or the tokenizer."""
    with_torch, without = tmp_path / "with_torch", tmp_path / "without_torch"
    if what == "all":
        convert_gguf(gguf, with_torch)
    else:
        gguf_tokenizer(gguf, without_torch=False).save_pretrained(with_torch)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(gguf), str(without), what],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return with_torch, without


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert "tokenizer.json" in names
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tiny_gguf_converts_the_same_without_torch(family, tmp_path):
    src = tmp_path / "src" / "tiny.gguf"
    src.parent.mkdir()
    write_tiny_gguf(src, family)
    with_torch, without = _convert_both(src, tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in with_torch.iterdir()}
    _same_files(with_torch, without)


@pytest.mark.slow
def test_smollm2_converts_the_same_without_torch(tmp_path):
    """The demo's model: the tokenizer of the real SmolLM2 GGUF (cached by fetch-model), in a
    folder of its own (its weights take the same torch-free path as the tiny ones')."""
    from hyperlora_jax.models.fetch import fetch_model

    src = tmp_path / "src" / "source.gguf"
    src.parent.mkdir()
    os.link(fetch_model("smollm2-135m-instruct") / "source.gguf", src)
    _same_files(*_convert_both(src, tmp_path, "tokenizer"))
