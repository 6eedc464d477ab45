"""Sharded training step on 8 fake CPU devices equals the single-device step, and parameters are
laid out as the logical-axis rules say (subprocess: the device count is fixed at JAX start)."""

import pytest
from conftest import run_on_fake_devices

from hyperlora_jax.errors import ConfigError
from hyperlora_jax.train import sharding as shd


@pytest.mark.slow
def test_sharded_step_equals_single_device_and_follows_rules():
    res = run_on_fake_devices("_sharded_step.py")
    assert abs(res["loss1"] - res["loss8"]) <= 1e-5, res
    assert res["param_diff"] <= 1e-5, res
    # rules: vocab -> tensor, embed -> fsdp, mlp/heads -> tensor, layers replicated
    assert res["embedding"] == "P('tensor', 'fsdp')", res
    assert res["down_proj"] == "P(None, 'tensor', 'fsdp')", res
    assert res["q_proj"] == "P(None, 'fsdp', 'tensor')", res
    # unannotated big hypernet weight: FSDP on its largest divisible dim; Adam moments follow
    assert "fsdp" in res["head"] and res["head_mu"] == res["head"], res
    assert res["batch"] == "P(('data', 'fsdp'), None)", res
    assert all("Auto" in t for t in res["axis_types"]), res


def test_mesh_spec_and_errors():
    assert shd.parse_mesh_spec("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ConfigError, match="bad mesh spec"):
        shd.parse_mesh_spec("dp=2")
    with pytest.raises(ConfigError, match="needs 6 devices"):
        shd.make_mesh(data=2, fsdp=3)
