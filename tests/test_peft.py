"""PEFT interop: our exports load in HF PEFT with identical logits, PEFT's own adapters import.

Reference: transformers + peft (PyTorch, f32) on tiny random models from tests/tiny_models.py.
Tolerance on logits: 1e-4 absolute.
"""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file
from tiny_models import make_tiny_hf, to_jax
from transformers import AutoModelForCausalLM

from hyperlora_jax.cli import main as cli_main
from hyperlora_jax.errors import CheckpointError, InputError
from hyperlora_jax.lora import adapter as ad
from hyperlora_jax.lora import peft as lp
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.lora.storage import save_adapter
from hyperlora_jax.models import transformer

ATOL = 1e-4
TOKENS = np.array([[5, 17, 33, 2, 90, 41, 7, 64], [9, 9, 100, 3, 54, 12, 77, 1]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama saved with save_pretrained, and its JAX (config, params)."""
    folder = tmp_path_factory.mktemp("base")
    model, _ = make_tiny_hf("llama")
    config, params = to_jax(model, folder)
    fwd = jax.jit(lambda p, a=None: transformer.forward(p, config, TOKENS, adapter=a).logits)
    return folder, config, params, fwd


def rand_adapter(config, modules, rank, scale, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2 * len(modules))
    a, b = {}, {}
    for i, m in enumerate(modules):
        d_in, d_out = config.module_dims(m)
        a[m] = jax.random.normal(keys[2 * i], (config.num_layers, rank, d_in)) * 0.3
        b[m] = jax.random.normal(keys[2 * i + 1], (config.num_layers, rank, d_out)) * 0.3
    return Adapter(a, b, scale)


def peft_logits(base_dir, adapter_dir):
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return peft_model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize(
    "modules,rank,scale,rslora",
    [
        (("q_proj", "v_proj"), 8, 16 / math.sqrt(8), True),  # T2L: r=8, alpha=16, rsLoRA
        (("down_proj",), 16, 2 * 8**1.5, False),  # D2L: alpha used directly (45.25), R=(K+1)*8
    ],
    ids=["t2l_qv_rslora", "d2l_down_plain"],
)
def test_export_loads_in_peft_with_same_logits(tiny, tmp_path, modules, rank, scale, rslora):
    base_dir, config, params, fwd = tiny
    x = rand_adapter(config, modules, rank, scale)
    out = lp.export_peft(x, base_dir, tmp_path / "peft", rslora=rslora)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == rank and cfg["use_rslora"] == rslora
    assert lp.peft_scaling(cfg["lora_alpha"], rank, rslora) == pytest.approx(scale, rel=1e-12)
    assert (out / "config.json").read_text() == (base_dir / "config.json").read_text()
    ours = np.asarray(fwd(params, x))
    theirs = peft_logits(base_dir, out)
    assert np.abs(theirs - np.asarray(fwd(params))).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    back = lp.import_peft(out, model_config=config)
    assert back.scale == pytest.approx(scale, rel=1e-12)
    for m in modules:
        np.testing.assert_allclose(back.a[m], x.a[m], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(back.b[m], x.b[m])


@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_saved_by_peft(tiny, tmp_path, rslora):
    base_dir, config, params, fwd = tiny
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    patterns = {} if rslora else dict(rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})
    lcfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=rslora,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        **patterns,
    )
    peft_model = get_peft_model(model, lcfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
        theirs = peft_model(torch.tensor(TOKENS)).logits.numpy()
    peft_model.save_pretrained(tmp_path / "p")
    x = lp.import_peft(tmp_path / "p", model_config=config)
    assert x.scale == pytest.approx(8 / (math.sqrt(4) if rslora else 4))
    np.testing.assert_allclose(np.asarray(fwd(params, x)), theirs, atol=ATOL, rtol=0)
    # The same weights under ".default" key names import identically.
    w = load_file(tmp_path / "p" / "adapter_model.safetensors")
    shutil.copytree(tmp_path / "p", tmp_path / "d")
    save_file(
        {k.replace(".weight", ".default.weight"): v for k, v in w.items()},
        tmp_path / "d" / "adapter_model.safetensors",
    )
    y = lp.import_peft(tmp_path / "d", model_config=config)
    for m in x.modules:
        np.testing.assert_array_equal(y.a[m], x.a[m])


def test_import_official_t2l_generated_lora(fixtures_dir):
    """T2L's save_lora output (r=8, alpha=16, rsLoRA, q/v) reads as scale 16/sqrt(8)."""
    folder = fixtures_dir / "official" / "t2l" / "generated_lora_emb0"
    x = lp.import_peft(folder)
    raw = load_file(folder / "adapter_model.safetensors")
    assert x.scale == pytest.approx(16 / math.sqrt(8)) and x.modules == ("q_proj", "v_proj")
    n = len({k.split(".layers.")[1].split(".")[0] for k in raw})
    assert x.num_layers == n and x.rank == 8
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_{}.weight"
    np.testing.assert_array_equal(x.a["v_proj"][1], raw[key.format("A")])
    np.testing.assert_array_equal(x.b["v_proj"][1], raw[key.format("B")].T)


def test_export_errors_leave_nothing_behind(tiny, tmp_path, monkeypatch):
    base_dir, config, _, _ = tiny
    x = rand_adapter(config, ("q_proj",), 2, 1.0)
    with pytest.raises(InputError, match="batch shape"):
        lp.export_peft(ad.stack([x, x]), base_dir, tmp_path / "o")
    wrong = config.replace(num_layers=config.num_layers + 1)
    with pytest.raises(InputError, match="layers"):
        lp.export_peft(x, None, tmp_path / "o", model_config=wrong)

    def broken_copy(*args, **kwargs):  # fail after the weights and config are written
        raise OSError("disk full")

    monkeypatch.setattr(lp.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        lp.export_peft(x, base_dir, tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_import_bad_folders(tiny, tmp_path):
    base_dir, config, _, _ = tiny
    x = rand_adapter(config, ("v_proj",), 2, 1.0)
    out = lp.export_peft(x, None, tmp_path / "ok")
    # A 3-layer adapter given to a 2-layer model.
    with pytest.raises(InputError, match="layer 2 but the model has 2 layers"):
        lp.import_peft(out, model_config=config.replace(num_layers=2))
    w = out / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:64])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        lp.import_peft(out)
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        lp.import_peft(tmp_path)


def test_cli_export_peft(tiny, tmp_path, capsys):
    base_dir, config, params, fwd = tiny
    x = rand_adapter(config, ("q_proj", "v_proj"), 4, 2.0)
    save_adapter(x, tmp_path / "native", {"base_model": str(base_dir), "source": "test"})
    rc = cli_main(["export-peft", str(tmp_path / "native"), str(tmp_path / "peft"), "--rslora"])
    assert rc == 0 and "rank 4" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["lora_alpha"] == pytest.approx(2.0 * 2)
    y = lp.import_peft(tmp_path / "peft", model_config=config)
    np.testing.assert_allclose(np.asarray(fwd(params, y)), np.asarray(fwd(params, x)), atol=1e-5)
    # A second export into the same, now non-empty, folder is refused with a clear message.
    rc = cli_main(["export-peft", str(tmp_path / "native"), str(tmp_path / "peft")])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    rc = cli_main(["export-peft", str(tmp_path / "nothing"), str(tmp_path / "x")])
    assert rc == 2 and "no adapter.json" in capsys.readouterr().err
    assert jnp.all(jnp.isfinite(y.a["q_proj"]))
