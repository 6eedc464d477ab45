"""Text-to-LoRA: official checkpoint conversion, hypernetwork parity (L/M/S), logits, init, sizes.

References: tests/fixtures/official/t2l (official PyTorch T2L @ 8ba7749, head L, tolerances from its
README) and tests/fixtures/t2l_heads/heads.npz (official HyperModulator, heads M / S / S with
learned positions; produced by make_fixture.py beside it).
"""

import importlib.util
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from hyperlora_jax.convert.official_t2l import convert, map_state_dict, read_args_yaml
from hyperlora_jax.errors import CheckpointError, ConfigError, InputError
from hyperlora_jax.hypernet.t2l.api import TextToLoRA
from hyperlora_jax.hypernet.t2l.model import (
    HyperModulator,
    T2LConfig,
    _head_bias_init,
    apply,
    init_params,
    param_count,
)
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.train.build import t2l_configs

T2L = Path(__file__).parent / "fixtures" / "official" / "t2l"
HEADS = Path(__file__).parent / "fixtures" / "t2l_heads" / "heads.npz"


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(T2L / "golden.npz"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2l") / "ckpt"
    convert(T2L / "t2l_release", out)
    return out


@pytest.fixture(scope="module")
def t2l(ckpt):
    return TextToLoRA.from_checkpoint(ckpt)


def _first(adapter: Adapter, i: int = 0) -> Adapter:
    return Adapter(
        {m: x[i] for m, x in adapter.a.items()},
        {m: x[i] for m, x in adapter.b.items()},
        adapter.scale,
    )


def test_converter_reads_module_order_from_heads(t2l, golden):
    assert t2l.config.modules == tuple(golden["module_order"]) == ("v_proj", "q_proj")
    # args.yaml says q, v: the converter must not trust it (PEFT set order, reference §4.3).
    assert read_args_yaml(T2L / "t2l_release" / "args.yaml")["target_modules"] == [
        "q_proj",
        "v_proj",
    ]
    assert (
        t2l.config.head == "L" and t2l.config.num_layers == 3 and t2l.base_model == "tiny-mistral"
    )
    assert t2l.config.dims("v_proj") == (64, 32) and t2l.config.dims("q_proj") == (64, 64)


def test_golden_lora_parity(t2l, golden):
    """A/B, head outputs and encoded task embeddings vs official: rtol 1e-5, atol 1e-6."""
    adapter = t2l.generate(golden["task_embs"])
    assert adapter.scale == pytest.approx(float(golden["scaling"]), rel=1e-12)
    for m in ("v_proj", "q_proj"):
        np.testing.assert_allclose(adapter.a[m], golden[f"A__{m}"], rtol=1e-5, atol=1e-6)
        b_peft = np.swapaxes(np.asarray(adapter.b[m]), -1, -2)  # ours [.., r, out] = lora_B^T
        np.testing.assert_allclose(b_peft, golden[f"B__{m}"], rtol=1e-5, atol=1e-6)
    heads = jax.jit(
        lambda p, e: HyperModulator(t2l.config).apply({"params": p}, e, return_head_out=True)
    )
    _, _, raw, enc = heads(t2l.params, golden["task_embs"])
    np.testing.assert_allclose(enc, golden["encoded_task_embs"], rtol=1e-5, atol=1e-5)
    for m in ("v_proj", "q_proj"):
        np.testing.assert_allclose(raw[m], golden[f"head_out__{m}"][:, 0], rtol=1e-5, atol=1e-6)
    # README-parity scale (vLLM 0.5.4): alpha / r, same factors.
    assert t2l.generate(golden["task_embs"][:1], scale_mode="vllm054").scale == pytest.approx(2.0)


def test_logits_parity_with_base_model(t2l, golden):
    """Base model from hyperlora_jax.models + our adapter vs official PEFT logits (atol 2e-4)."""
    from hyperlora_jax.models.hf import load_hf_model
    from hyperlora_jax.models.transformer import forward

    config, params = load_hf_model(T2L / "tiny-mistral")
    fwd = jax.jit(lambda p, t, a: forward(p, config, t, adapter=a).logits)
    adapter = _first(t2l.generate(golden["task_embs"][0]))
    logits = np.asarray(fwd(params, golden["prompt_ids"], adapter))
    np.testing.assert_allclose(logits, golden["logits_lora"], atol=2e-4, rtol=0)
    gold = Adapter(
        {m: golden[f"A__{m}"][0] for m in t2l.config.modules},
        {m: np.swapaxes(golden[f"B__{m}"][0], -1, -2) for m in t2l.config.modules},
        float(golden["scaling"]),
    )
    logits = np.asarray(fwd(params, golden["prompt_ids"], gold))
    np.testing.assert_allclose(logits, golden["logits_lora"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["M", "S", "Slpe"])
def test_official_m_and_s_heads(name):
    """Heads M, S (rotary ranks) and S (learned rank embedding) vs the official HyperModulator."""
    z = np.load(HEADS)
    sd = {k.split("/sd/", 1)[1]: z[k] for k in z.files if k.startswith(f"{name}/sd/")}
    mods = tuple(str(m) for m in z[f"{name}/module_order"])
    cfg = T2LConfig(
        modules=mods,
        in_features=tuple(int(z[f"{name}/A/{m}"].shape[-1]) for m in mods),
        out_features=tuple(int(z[f"{name}/B/{m}"].shape[-2]) for m in mods),
        num_layers=3,
        task_emb_size=24,
        latent_size=16,
        head_in_size=16,
        head="M" if name == "M" else "S",
        learnable_pos_emb=name == "Slpe",
        rank=4,
        lora_alpha=8.0,
    )
    params, constants = map_state_dict(sd, cfg)
    assert constants == {}  # official zeros are dropped
    assert param_count(cfg) == int(z[f"{name}/n_params"])
    a, b = apply(cfg, params, z[f"{name}/task_embs"])
    for m in mods:
        np.testing.assert_allclose(a[m], z[f"{name}/A/{m}"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            np.swapaxes(np.asarray(b[m]), -1, -2), z[f"{name}/B/{m}"], rtol=1e-5, atol=1e-6
        )


def _cfg(head="L", **kw):
    return T2LConfig(
        modules=("q_proj", "down_proj"),
        in_features=(64, 128),
        out_features=(64, 64),
        num_layers=3,
        task_emb_size=24,
        latent_size=16,
        head_in_size=16,
        head=head,
        **kw,
    )


def test_sft_init_is_a_zero_update_for_l_only():
    embs = jax.random.normal(jax.random.key(1), (4, 24))
    cfg = _cfg("L")
    params = init_params(cfg, jax.random.key(0))
    a, b = apply(cfg, params, embs)
    for m in cfg.modules:
        assert np.all(np.asarray(b[m]) == 0)  # B = 0: the base model exactly
        a_m = np.asarray(a[m])
        assert np.all(a_m == a_m[0, 0]) and np.abs(a_m).max() <= 1 / np.sqrt(cfg.dims(m)[0])
        assert np.abs(a_m).max() > 0.5 / np.sqrt(cfg.dims(m)[0])
    # Official M/S inits (head output = bias at step 0) are not no-ops: B gets A0-like values.
    for head, factor in (("M", 1 / np.sqrt(2)), ("S", 1 / np.sqrt(2) / np.sqrt(8))):
        cfg = _cfg(head)
        for m in cfg.modules:
            bias = np.asarray(_head_bias_init(cfg, m)(jax.random.key(0), None))
            assert bias.shape == (cfg.head_width(m),)
            bound = factor / np.sqrt(cfg.dims(m)[0])
            assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.5 * bound


def test_dropout_only_in_training(t2l, golden):
    embs = golden["task_embs"][:2]
    a1, _ = apply(t2l.config, t2l.params, embs)
    a2, _ = apply(t2l.config, t2l.params, embs, False, jax.random.key(2))
    np.testing.assert_allclose(a1["q_proj"], golden["A__q_proj"][:2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a1["q_proj"], a2["q_proj"], atol=1e-4)


def _load_configs():
    spec = importlib.util.spec_from_file_location(
        "t2l_configs", Path(__file__).parents[1] / "configs" / "t2l.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "preset,millions",
    [
        ("mistral7b_sft", 55.4),
        ("gemma2_2b_sft", 137.7),
        ("llama8b_sft", 230.0),
        ("mistral7b_recon", 34.4),
    ],
)
def test_official_preset_parameter_counts(preset, millions):
    """L-head sizes counted from the official hyper_modulator.py layers, within 0.5% (no alloc)."""
    cfgs = _load_configs()
    n = param_count(t2l_configs(cfgs.get_config(preset))[1])
    assert abs(n / 1e6 - millions) / millions < 0.005, n


def test_all_presets_build():
    cfgs = _load_configs()
    for name in cfgs.PRESETS:
        c = cfgs.get_config(name)
        h = t2l_configs(c)[1]
        assert h.rank == 8 and c.train.learning_rate > 0 and h.modules == ("q_proj", "v_proj"), name
    with pytest.raises(ValueError, match="unknown t2l preset"):
        cfgs.get_config("nope")


# ---------------------------------------------------------------------------------------------
# Error cases


def test_empty_and_bad_inputs(t2l, golden):
    with pytest.raises(InputError, match="empty"):
        t2l.generate(["  "])
    with pytest.raises(InputError, match="no task descriptions"):
        t2l.generate([])
    with pytest.raises(InputError, match="expects"):
        t2l.generate(np.zeros((2, 7), np.float32))
    # Descriptions need an encoder; the official gte one is not loaded here.
    with pytest.raises(InputError, match="gte-large-en-v1.5"):
        t2l.generate(["Solve math word problems."])
    with pytest.raises(ConfigError, match="scale_mode"):
        t2l.generate(golden["task_embs"], scale_mode="bogus")


def test_base_model_mismatch(ckpt, tmp_path):
    import json

    from hyperlora_jax.models.config import load_hf_config

    other = tmp_path / "other"
    other.mkdir()
    cfg = load_hf_config(T2L / "tiny-mistral")
    cfg["num_key_value_heads"] = 4  # v_proj 64 -> 64 instead of 64 -> 32
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="v_proj"):
        TextToLoRA.from_checkpoint(ckpt, base_model=other)
    with pytest.raises(CheckpointError, match="v_proj"):
        convert(T2L / "t2l_release", tmp_path / "x", base_model=other)
    cfg["num_key_value_heads"] = 2
    cfg["num_hidden_layers"] = 4
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="4"):
        TextToLoRA.from_checkpoint(ckpt, base_model=other)
    TextToLoRA.from_checkpoint(ckpt, base_model=T2L / "tiny-mistral")  # the right one is fine


def _release_copy(tmp_path) -> Path:
    src = tmp_path / "release"
    shutil.copytree(T2L / "t2l_release", src)
    return src


def test_missing_heads_and_inconsistent_release(tmp_path):
    import torch

    from hyperlora_jax.convert.safe_unpickle import load_torch_file

    src = _release_copy(tmp_path)
    sd = load_torch_file(src / "hypermod.pt")
    no_heads = {k: torch.from_numpy(v) for k, v in sd.items() if not k.startswith("heads.")}
    torch.save(no_heads, src / "hypermod.pt")
    with pytest.raises(CheckpointError, match="no heads"):
        convert(src, tmp_path / "out")
    one_head = {k: torch.from_numpy(v) for k, v in sd.items() if not k.startswith("heads.q_proj")}
    torch.save(one_head, src / "hypermod.pt")
    with pytest.raises(CheckpointError, match="target_modules"):
        convert(src, tmp_path / "out")
    shutil.copy(T2L / "t2l_release" / "hypermod.pt", src / "hypermod.pt")
    args = (src / "args.yaml").read_text()
    (src / "args.yaml").write_text(
        args.replace("model_dir: tiny-mistral", "model_dir: other-model")
    )
    with pytest.raises(CheckpointError, match="differs from adapter_config.json"):
        convert(src, tmp_path / "out")
    (src / "args.yaml").write_text(
        args.replace("hypernet_latent_size: 32", "hypernet_latent_size: 64")
    )
    with pytest.raises(CheckpointError, match="hypernet_latent_size"):
        convert(src, tmp_path / "out")
    (src / "args.yaml").unlink()
    with pytest.raises(CheckpointError, match="args.yaml"):
        convert(src, tmp_path / "out")
    with pytest.raises(CheckpointError, match="convert official-t2l"):
        TextToLoRA.from_checkpoint(T2L / "t2l_release")


def test_convert_keeps_unrelated_folders(ckpt, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        convert(T2L / "t2l_release", busy)
    assert (busy / "notes.txt").read_text() == "keep me"
    convert(T2L / "t2l_release", ckpt)  # re-converting over a T2L checkpoint replaces it


def test_args_yaml_python_tags_are_data(tmp_path):
    p = tmp_path / "args.yaml"
    p.write_text(
        "model_dir: m\nexploit: !!python/object/apply:os.system ['touch /tmp/t2l_pwned']\n"
        "dtype: !!python/name:torch.float32 ''\n"
    )
    d = read_args_yaml(p)
    assert d["model_dir"] == "m" and d["exploit"]["__tag__"].endswith("os.system")
    assert not Path("/tmp/t2l_pwned").exists()
