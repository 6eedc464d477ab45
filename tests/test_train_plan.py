"""`hyperlora-jax plan` compiles a real-size (SmolLM2-135M, 30 layers) D2L training step on 4 fake
CPU devices from abstract inputs and reports per-device memory and FLOPs."""

import json

import pytest

from hyperlora_jax.cli import main


@pytest.mark.slow
def test_plan_smollm2_qa_on_fake_mesh(capsys):
    rc = main(
        [
            "plan",
            "--config",
            "configs/d2l.py:smollm2_qa",
            "--config.train.global_packs_per_step=4",
            "--config.train.grad_accum_steps=2",
            "--config.train.max_packed_inp_len=64",
            "--config.train.max_packed_ctx_len=64",
            "--mesh",
            "data=2,fsdp=2,tensor=1",
            "--json",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["devices"] == 4 and res["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert 134e6 < res["base_params"] < 136e6  # SmolLM2-135M
    assert 5.5e6 < res["hypernet_params"] < 6.5e6  # configs/d2l.py: 6.04M
    mem = res["per_device_GiB"]
    assert mem["arguments"] > 0.1 and mem["temporaries"] > 0 and mem["total"] > mem["arguments"]
    assert res["flops_per_device_per_step"] > 1e9


def test_plan_rejects_bad_mesh(capsys):
    assert main(["plan", "--config", "configs/d2l.py:tiny", "--mesh", "gpus=8"]) == 2
    assert "bad mesh spec" in capsys.readouterr().err
