"""`hyperlora-jax plan`'s analytic memory plan (hyperlora_jax/train/memory.py): its parameter,
optimizer-state and batch terms are exactly the compiled step's per-device argument bytes; the
analytic-only mode sizes a real preset from shapes alone and says which chips it fits."""

import json

from hyperlora_jax.cli import main
from hyperlora_jax.train.memory import CHIPS, USABLE, GiB


def _plan(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_analytic_terms_equal_the_compiled_arguments(capsys):
    res = _plan(
        capsys, "--config", "configs/d2l.py:tiny", "--mesh", "data=2,fsdp=2,tensor=1", "--rows", "4"
    )
    a = res["analytic"]
    terms = a["bytes"]
    # parameters + optimizer state + batch (+ the 20 bytes of step, RNG and guard counters) are
    # the compiled program's arguments, byte for byte, on each of the 4 devices
    assert a["arguments"] == res["per_device_bytes"]["arguments"]
    assert a["arguments"] == sum(
        terms[k]
        for k in ("base_params", "hypernet_params", "optimizer_state", "batch", "step_counters")
    )
    assert terms["step_counters"] == 20
    # the sharding is counted: fsdp=2 halves the base model (f32 here: 4 bytes a parameter)
    assert terms["base_params"] < 4 * res["base_params"]
    assert terms["hypernet_params"] <= 4 * res["hypernet_params"]
    # AdamW: two f32 moments per parameter, plus its step counters
    assert (
        2 * terms["hypernet_params"] <= terms["optimizer_state"] < 2 * terms["hypernet_params"] + 64
    )
    assert terms["gradients"] == 2 * terms["hypernet_params"]  # gradient + update, no accumulation
    assert all(terms[k] > 0 for k in terms if k.startswith("activations_"))
    assert a["total"] == sum(terms.values())
    assert set(a["fits"]) == set(CHIPS) and all(f["fits"] for f in a["fits"].values())


def test_analytic_only_sizes_gemma2_2b_on_a_v5e_8_mesh(capsys):
    base = ["--config", "configs/d2l.py:gemma2_2b_qa", "--mesh", "data=1,fsdp=8,tensor=1"]
    fit = [
        "--config.train.remat_policy=full",
        "--config.train.max_ctx_chunk_len=1024",
        "--config.train.max_chunks_per_pack=8",
        "--config.train.max_contexts_per_pack=8",
        "--config.train.max_label_len=1024",
    ]
    preset = _plan(capsys, *base, "--analytic_only")
    assert "per_device_bytes" not in preset and "compile_s" not in preset  # nothing compiled
    tuned = _plan(capsys, *base, *fit, "--analytic_only")
    for res in (preset, tuned):
        t = res["analytic"]["bytes"]
        # bf16 Gemma-2 2B over fsdp=8 (a few small norms stay replicated), f32 hypernet
        assert 2 * 2.614e9 / 8 < t["base_params"] < 1.05 * 2 * 2.614e9 / 8
        assert 4 * 315.2e6 / 8 <= t["hypernet_params"] < 1.1 * 4 * 315.2e6 / 8
        assert t["gradients"] == 3 * t["hypernet_params"]  # + the accumulation buffer
    # without remat the 26 layers' intermediates and 4096 x 256K f32 logits do not fit 16 GiB
    assert not preset["analytic"]["fits"]["v5e"]["fits"]
    assert tuned["analytic"]["bytes"]["activations_student"] < (
        preset["analytic"]["bytes"]["activations_student"] / 4
    )
    total = tuned["analytic"]["total"]
    assert tuned["analytic"]["fits"]["v5e"]["fits"] and total <= USABLE * 16 * GiB


def test_plan_text_shows_the_breakdown_and_one_chip(capsys):
    args = ["--config", "configs/d2l.py:tiny", "--mesh", "data=2,fsdp=1,tensor=1"]
    assert main(["plan", *args, "--analytic_only", "--chip", "H100"]) == 0
    out = capsys.readouterr().out
    assert "optimizer_state" in out and "activations_student" in out and "total" in out
    assert "H100 80 GiB yes" in out and "v5e" not in out


def test_plan_rejects_an_unknown_chip(capsys):
    args = ["--config", "configs/d2l.py:tiny", "--mesh", "data=2,fsdp=1,tensor=1"]
    assert main(["plan", *args, "--analytic_only", "--chip", "tpu9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tpu9" in err and "v5e" in err
