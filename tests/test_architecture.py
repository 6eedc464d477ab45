"""The package's layer contract ([tool.importlinter] in pyproject.toml), checked by import-linter:
models < lora < hypernet < data < train | convert < eval < api < cli."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under `root` (found through PYTHONPATH), no cache files."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(root / "pyproject.toml")]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_layers_contract_kept():
    r = _lint(ROOT)
    assert r.returncode == 0, f"import contract broken:\n{r.stdout}\n{r.stderr}"
    assert "1 kept, 0 broken" in r.stdout


def test_contract_catches_an_upward_import(tmp_path):
    """The same contract on a copy of the package with models importing cli must fail, naming
    the import: the check above cannot pass vacuously (wrong package, empty layers)."""
    shutil.copytree(
        ROOT / "hyperlora_jax",
        tmp_path / "hyperlora_jax",
        ignore=lambda d, names: [n for n in names if not (n.endswith(".py") or "." not in n)],
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.rmtree(tmp_path / "hyperlora_jax" / "checkpoints", ignore_errors=True)
    config = tmp_path / "hyperlora_jax" / "models" / "config.py"
    config.write_text(config.read_text() + "\nfrom hyperlora_jax.cli import main  # noqa\n")
    r = _lint(tmp_path)
    assert r.returncode != 0, r.stdout
    assert "hyperlora_jax.models is not allowed to import hyperlora_jax.cli" in r.stdout
    assert "hyperlora_jax.models.config -> hyperlora_jax.cli" in r.stdout


def test_cli_parser_imports_no_heavy_modules():
    """`hyperlora-jax --help` builds the whole parser: it must not import jax, transformers or
    torch (that costs seconds; the command modules import them inside their functions)."""
    code = (
        "import sys; from hyperlora_jax.cli import build_parser; build_parser(); "
        "print(sorted({'jax', 'transformers', 'torch', 'numpy'} & set(sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
