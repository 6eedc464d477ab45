"""Shared test setup: f32 matmuls at full precision, absl flags parsed (grain needs it), paths."""

from pathlib import Path

import jax
import pytest

FIXTURES = Path(__file__).parent / "fixtures"

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    from absl import flags

    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
