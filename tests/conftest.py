"""Shared test setup: f32 matmuls at full precision, absl flags parsed (grain needs it), paths."""

import os
import sys
from pathlib import Path

# `benchmarks` (a package at the repository root) is imported by the tests of its harness and of
# the server, from whatever folder pytest runs in.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Most of a clean test run is XLA:CPU compilation. LLVM at -O1 compiles faster (tiny D2L
# training step 16.7 -> 13.4 s) and runs as fast as the default -O2 (SmolLM2 decoding); -O0
# halves compilation but slows the real-model tests by 60%. Set before the backend starts;
# the subprocess tests (several processes, fake devices, notebooks) inherit it.
XLA_TEST_FLAGS = "--xla_backend_optimization_level=1"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def run_on_fake_devices(script: str, n: int = 8) -> dict:
    """Run tests/SCRIPT in a fresh process on n fake CPU devices (the device count is fixed at
    JAX start) and return the JSON it prints after "RESULT "."""
    import json
    import subprocess

    env = {
        **os.environ,
        "XLA_FLAGS": f"{XLA_TEST_FLAGS} --xla_force_host_platform_device_count={n}",
        "JAX_PLATFORMS": "cpu",
    }
    r = subprocess.run(
        [sys.executable, str(Path(__file__).parent / script)],
        cwd=Path(__file__).parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT ", 1)[1])


def packed_d2l_row(vocab_size: int) -> tuple[dict, list[dict]]:
    """(one packed D2L batch row [1, ...], its items): two contexts (2 chunks + 1 chunk), one QA
    each, random ids below vocab_size (tests comparing the training path's chunk LoRAs with
    DocToLoRA's)."""
    import jax.numpy as jnp
    import numpy as np

    from hyperlora_jax.data import packing

    rng = np.random.default_rng(0)
    tok = lambda n: [int(x) for x in rng.integers(3, vocab_size, size=n)]  # noqa: E731
    items = [
        {"ctx_chunks": [tok(5), tok(3)], "input_ids": [tok(4)], "labels": [[-100, -100, 7, 8]]},
        {"ctx_chunks": [tok(6)], "input_ids": [tok(5)], "labels": [[-100] * 4 + [5]]},
    ]
    pc = packing.PackConfig(
        max_inp_len=12, max_ctx_len=16, max_contexts=2, max_chunks=4, max_qas=2, top_k=0
    )
    return {k: jnp.asarray(v)[None] for k, v in packing.pack_row(items, pc).items()}, items


jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same tiny programs; a compilation cache inside the checkout lets the
# pytest-xdist workers share them (a clean clone starts with an empty cache, as CI does;
# JAX_COMPILATION_CACHE_DIR=<empty dir> measures that locally).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir", str(Path(__file__).parent.parent / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_configure(config):
    from absl import flags

    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def pytest_collection_modifyitems(config, items):
    # The long tests first, so the two xdist workers do not end on one of them.
    long = ("slow", "multiprocess")
    items.sort(key=lambda item: not any(item.get_closest_marker(m) for m in long))
