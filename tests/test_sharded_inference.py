"""Sharded inference (issue 26 part 2): on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices
the D2L adapters, logits, generated tokens, T2L adapters and the selfgen teacher equal one
device's (subprocess: the device count is fixed at JAX start); a mesh that does not fit the
devices is one clear line."""

import pytest
from conftest import run_on_fake_devices

from hyperlora_jax.errors import ConfigError
from hyperlora_jax.models import sharding as shd

# Measured (2 CPU cores, f32, matmul precision highest): adapters 1.2e-7 (entries up to 0.06),
# logits 6.2e-6, top-k log-probs 7.6e-6, T2L 0; tokens, teacher answers, top-k indices identical.
ADAPTER_TOL, LOGITS_TOL = 1e-5, 1e-4


@pytest.mark.slow
def test_sharded_inference_equals_single_device():
    res = run_on_fake_devices("_sharded_inference.py")
    assert res["adapter_shape"][0] == 3 and res["t2l_shape"][0] == 5, res  # padding cut off
    assert res["adapter_diff"] <= ADAPTER_TOL and res["adapter_scale"] > 1e-3, res
    assert res["t2l_diff"] <= ADAPTER_TOL, res
    assert res["logits_diff"] <= LOGITS_TOL and res["topk_vals_diff"] <= LOGITS_TOL, res
    assert res["tokens_equal"] and res["eval_adapter_diff"] <= ADAPTER_TOL, res
    assert res["teacher_equal"] and res["topk_idx_equal"], res
    # base weights laid out by the training rules: vocab -> tensor, embed -> fsdp
    assert res["embed_sharding"] == "P('tensor', 'fsdp')" and res["n_devices_base"] == 8, res


def test_mesh_flag_must_fit_the_devices():
    import jax

    n = len(jax.local_devices())
    with pytest.raises(ConfigError, match=f"needs {n + 1} devices but {n} are visible"):
        shd.mesh_from_spec(f"data={n + 1}")
    assert shd.batch_multiple(shd.mesh_from_spec("data=-1")) == n
    assert shd.batch_multiple(None) == 1
