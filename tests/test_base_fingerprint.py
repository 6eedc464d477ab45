"""A base model with the right shapes but other weights is refused where a checkpoint or adapter
is applied or exported (T2L loading, D2L loading, chat --adapter, export-peft --base-model), unless
--allow-other-base / allow_other_base=True; files that record no fingerprint are not checked."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hyperlora_jax.cli import main
from hyperlora_jax.errors import CheckpointError
from hyperlora_jax.models.load import base_fingerprint, folder_fingerprint

FIX = Path(__file__).parent / "fixtures" / "official"
MISTRAL = FIX / "t2l" / "tiny-mistral"
GEMMA = FIX / "d2l" / "tiny-gemma2"
D2L_BIN = FIX / "d2l" / "pytorch_model.bin"
T2L_RELEASE = FIX / "t2l" / "t2l_release"
TASK = "Summarize the given text in one sentence"


def _perturbed(src: Path, dst: Path, key: str) -> Path:
    """A copy of the model folder `src` with one tensor changed (same shapes, config, tokenizer)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(str(src / "model.safetensors"))
    w[key] = w[key] + np.float32(0.05)
    save_file(w, str(dst / "model.safetensors"), {"format": "pt"})
    return dst


def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def t2l(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp")
    other = _perturbed(MISTRAL, d / "other-mistral", "model.layers.0.mlp.down_proj.weight")
    assert main(["convert", "official-t2l", str(T2L_RELEASE), str(d / "ckpt"),
                 "--base-model", str(MISTRAL)]) == 0  # fmt: skip
    np.save(d / "embs.npy", np.load(FIX / "t2l" / "golden.npz")["task_embs"][:1])
    gen = ["generate-adapter", "--hypernet", d / "ckpt", "--task", TASK,
           "--embeddings", d / "embs.npy"]  # fmt: skip
    assert main([str(a) for a in [*gen, "--out", d / "ad", "--base-model", MISTRAL]]) == 0
    return d, other, gen


def test_fingerprint_of_folder_equals_loaded_and_ignores_dtype():
    import jax.numpy as jnp

    from hyperlora_jax.models.hf import load_hf_model

    fp = folder_fingerprint(MISTRAL)
    assert fp == base_fingerprint(*load_hf_model(MISTRAL))
    assert fp == base_fingerprint(*load_hf_model(MISTRAL, dtype=jnp.bfloat16))
    assert fp.split("-")[0] != folder_fingerprint(GEMMA).split("-")[0]


def test_recorded_in_checkpoint_and_adapter(t2l):
    d, other, _ = t2l
    fp = folder_fingerprint(MISTRAL)
    assert fp != folder_fingerprint(other) and fp[:8] == folder_fingerprint(other)[:8]
    assert json.loads((d / "ckpt" / "t2l.json").read_text())["base_fingerprint"] == fp
    assert json.loads((d / "ad" / "adapter.json").read_text())["base_fingerprint"] == fp


def test_t2l_refuses_other_base(t2l, capsys):
    from hyperlora_jax.hypernet.t2l.api import TextToLoRA

    d, other, gen = t2l
    with pytest.raises(CheckpointError, match="same shapes, different weights"):
        TextToLoRA.from_checkpoint(d / "ckpt", base_model=other)
    TextToLoRA.from_checkpoint(d / "ckpt", base_model=other, allow_other_base=True)
    rc, err = _run([*gen, "--out", d / "g1", "--base-model", other], capsys)
    assert rc == 2 and "tiny-mistral" in err and str(other) in err, err
    assert "--allow-other-base" in err and len(err.strip().splitlines()) == 1
    assert not (d / "g1").exists()
    rc, err = _run([*gen, "--out", d / "g2", "--base-model", other, "--allow-other-base"], capsys)
    assert rc == 0, err
    # The adapter records the base it was made with.
    meta = json.loads((d / "g2" / "adapter.json").read_text())
    assert meta["base_fingerprint"] == folder_fingerprint(other)


def test_chat_refuses_adapter_of_other_base(t2l, capsys):
    d, other, _ = t2l
    chat = ["chat", "--prompt", "hi", "--max-new-tokens", "2", "--adapter", d / "ad"]
    rc, err = _run([*chat, "--model", other], capsys)
    assert rc == 2 and "different weights" in err and str(other) in err, err
    assert _run([*chat, "--model", other, "--allow-other-base"], capsys)[0] == 0
    assert _run([*chat, "--model", MISTRAL], capsys)[0] == 0


def test_export_peft_refuses_other_base(t2l, capsys):
    d, other, _ = t2l
    exp = ["export-peft", d / "ad"]
    rc, err = _run([*exp, d / "p1", "--base-model", other], capsys)
    assert rc == 2 and str(other) in err and not (d / "p1").exists(), err
    assert _run([*exp, d / "p2", "--base-model", other, "--allow-other-base"], capsys)[0] == 0
    assert _run([*exp, d / "p3", "--base-model", MISTRAL], capsys)[0] == 0
    side = json.loads((d / "p3" / "hyperlora_base.json").read_text())
    assert side["base_fingerprint"] == folder_fingerprint(MISTRAL)


def test_d2l_refuses_other_base(tmp_path):
    from hyperlora_jax.api import load_d2l

    other = _perturbed(GEMMA, tmp_path / "tiny-gemma2-other", "model.embed_tokens.weight")
    ckpt = tmp_path / "ckpt"
    argv = ["convert", "official-d2l", str(D2L_BIN), str(ckpt), "--base-model", str(GEMMA)]
    assert main(argv) == 0
    meta = json.loads((ckpt / "d2l_config.json").read_text())
    assert meta["base_fingerprint"] == folder_fingerprint(GEMMA)
    with pytest.raises(CheckpointError, match=str(other)):
        load_d2l(ckpt, base_model=other)
    d2l = load_d2l(ckpt, base_model=other, allow_other_base=True)
    assert d2l.base_fingerprint == folder_fingerprint(other)
    assert load_d2l(ckpt, base_model=GEMMA).base_fingerprint == meta["base_fingerprint"]


def test_unrecorded_fingerprint_is_not_checked(tmp_path):
    """Checkpoints written before fingerprints (shipped ones, fixtures) load with any base."""
    from hyperlora_jax.api import load_d2l

    other = _perturbed(GEMMA, tmp_path / "tiny-gemma2-other", "model.embed_tokens.weight")
    assert main(["convert", "official-d2l", str(D2L_BIN), str(tmp_path / "ckpt")]) == 0
    meta = json.loads((tmp_path / "ckpt" / "d2l_config.json").read_text())
    assert meta["base_fingerprint"] is None
    load_d2l(tmp_path / "ckpt", base_model=other)
