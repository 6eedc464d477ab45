"""Execute each Colab notebook top to bottom in TINY mode (CPU, local fixtures) with nbclient.

The parameters cell (tagged `parameters`) gets `TINY = True` and the repo path (`REPO_SOURCE`)
appended, papermill style; the kernel is this interpreter's (ipykernel), its working dir a tmp
dir. Each test checks that no cell raised and that the notebook produced its key output, and
that the notebooks as shipped stop with a clear message before anything runs unconfigured.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"


def _kernel_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_notebook(name: str, tmp_path: Path) -> tuple[str, Path]:
    """Run colab/NAME in TINY mode inside tmp_path; return all stream/text output and WORK dir."""
    nb = nbformat.read(COLAB / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0] is code[0], "the first code cell must be `parameters`"
    assert "TINY = False" in params[0].source, "notebooks ship with TINY = False"
    # REPO_SOURCE: the checkout our notebooks install from
    params[0].source += f"\n\n# injected by tests\nTINY = True\nREPO_SOURCE = {str(REPO)!r}\n"
    env = {
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "HYPERLORA_CACHE": str(tmp_path / "cache"),
        "MPLBACKEND": "Agg",
        "TQDM_DISABLE": "1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cpu0, t0 = _kernel_cpu_s(), time.perf_counter()
    try:
        client = nbclient.NotebookClient(
            nb,
            timeout=900,
            kernel_name="python3",
            resources={"metadata": {"path": str(tmp_path)}},
        )
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    wall, cpu = time.perf_counter() - t0, _kernel_cpu_s() - cpu0
    print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s kernel CPU", file=sys.stderr)
    text = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            assert o.get("output_type") != "error", f"{name}: {o.get('ename')}: {o.get('evalue')}"
            if o.get("output_type") == "stream":
                text.append(o["text"])
            elif "data" in o and "text/plain" in o["data"]:
                text.append(o["data"]["text/plain"])
    return "".join(text), tmp_path / "work"


@pytest.mark.slow
def test_convert_official(tmp_path):
    out, work = run_notebook("convert_official.ipynb", tmp_path)
    assert "D2L adapter: rank 16" in out  # 1 chunk + the learned bias LoRA, r = 8 each
    assert "T2L adapter: rank 8" in out
    assert (work / "d2l_ckpt" / "params.safetensors").is_file()
    assert (work / "t2l_ckpt" / "t2l.json").is_file()
    d2l = json.loads((work / "d2l_peft" / "adapter_config.json").read_text())
    t2l = json.loads((work / "t2l_peft" / "adapter_config.json").read_text())
    # fixtures: D2L alpha 2*8**1.5 applied directly, rank 16; T2L alpha 16, rsLoRA
    assert d2l["r"] == 16 and d2l["lora_alpha"] == pytest.approx(2 * 8**1.5 * 16)
    assert t2l["use_rslora"] and t2l["lora_alpha"] == pytest.approx(16.0)
    assert (work / "t2l_peft" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_internalize_your_document(tmp_path):
    out, work = run_notebook("internalize_your_document.ipynb", tmp_path)
    assert "hypernetwork:" in out and "rank 8 LoRA" in out
    for label in ("no context", "D2L adapter", "doc in context"):
        assert label in out
    assert (work / "my_doc_adapter" / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_meta_train_tpu(tmp_path):
    out, work = run_notebook("meta_train_tpu.ipynb", tmp_path)
    assert "resumed from step" in out
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == max(steps)  # no step trained twice
    assert (work / "loss_curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_images_as_documents(tmp_path):
    """Tiny VLM encoder -> tiny Gemma-2 base: one image's answer, then the Imagenette eval."""
    out, work = run_notebook("images_as_documents.ipynb", tmp_path)
    assert (
        "soft tokens; base: gemma2" in out and "adapter rank 16 on ['down_proj']" in out
    )  # chunk + bias LoRA, r = 8 each
    assert "| tench | 2 |" in out and "| golf ball | 2 |" in out and "(paper: 75.03%)" in out
    res = json.loads((work / "imagenette_eval" / "results.json").read_text())
    assert res["summary"]["n"] == 4 and len(res["records"]) == 4
    assert (work / "imagenette_eval" / "confusion.png").stat().st_size > 5000


@pytest.mark.parametrize(
    "name",
    [
        "convert_official.ipynb",
        "internalize_your_document.ipynb",
        "meta_train_tpu.ipynb",
        "lora_any_flax_model.ipynb",
        "images_as_documents.ipynb",
    ],
)
def test_setup_cell_refuses_an_unset_repo_source(name, tmp_path, monkeypatch):
    """As shipped (REPO_SOURCE unset, full mode), the setup cell stops at once with the fix, and
    a folder that is no checkout is named; nothing is cloned or installed before that."""
    nb = nbformat.read(COLAB / name, as_version=4)
    params, setup = [c.source for c in nb.cells if c.cell_type == "code"][:2]
    assert 'REPO_SOURCE = ""' in params and "constraints.txt" in setup
    assert "devices[0].platform" in setup  # the runtime check
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(params, env)
    with pytest.raises(ValueError, match="Set REPO_SOURCE in the first cell"):
        exec(setup, env)
    env["REPO_SOURCE"] = str(tmp_path)
    with pytest.raises(ValueError, match="is not a checkout of hyperlora_jax"):
        exec(setup, env)
