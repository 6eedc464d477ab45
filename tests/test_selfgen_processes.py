"""`data selfgen` in parts (issue 26 part 2): two processes (--num-processes 2 --process-index I),
each on its own 2-device mesh (--mesh data=2), write disjoint parts of the dataset whose records,
concatenated, equal one single-device process's records."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import XLA_TEST_FLAGS

from hyperlora_jax.cli import main
from hyperlora_jax.data import storage

ROOT = Path(__file__).parents[1]
TINY = ROOT / "tests" / "fixtures" / "official" / "d2l" / "tiny-gemma2"
DOCS = [
    ("The Eiffel Tower in Paris was completed in 1889.", ["How tall is it?", "When?"]),
    ("Marie Curie won the Nobel Prize in 1903.", ["When did she win?"]),
    ("The Nile flows north into the sea.", ["Where?", "Which way does it flow?"]),
    ("Bees make honey from nectar.", ["What do bees make?"]),
    ("Mount Everest is 8849 metres high.", ["How high is it?", "Where is it?"]),
]
LP_TOL = 1e-5  # top-k log-probs: one device vs a 2-device mesh (measured 3.1e-6)


def _stopping_model(dst: Path) -> Path:
    """tiny-gemma2 whose stop tokens (<eos> 1, <end_of_turn> 5) copy, 1.1x, the embeddings of the
    tokens its greedy answers repeat (363, 76): the random model then ends some answers, so the
    teacher keeps them (unfinished answers are dropped)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(TINY, dst)
    w = load_file(TINY / "model.safetensors")
    emb = w["model.embed_tokens.weight"].copy()
    emb[5], emb[1] = 1.1 * emb[363], 1.1 * emb[76]
    w["model.embed_tokens.weight"] = emb
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _records(path: Path) -> list[dict]:
    src = storage.RecordSource(path)
    return [src[i] for i in range(len(src))]


@pytest.mark.multiprocess
def test_two_processes_write_the_one_process_dataset(tmp_path, capsys):
    model = _stopping_model(tmp_path / "model")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d, "qs": q}) + "\n" for d, q in DOCS))
    args = ["data", "selfgen", "--model", str(model), "--docs", str(docs), "--questions-field"]
    args += ["qs", "--max-new-tokens", "24", "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "one.parquet")]) == 0
    one = _records(tmp_path / "one.parquet")

    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{XLA_TEST_FLAGS} --xla_force_host_platform_device_count=2",
    }
    cmd = [sys.executable, "-m", "hyperlora_jax.cli", *args, "--out", str(tmp_path / "sg.parquet")]
    cmd += ["--mesh", "data=2", "--num-processes", "2", "--process-index"]
    procs = [
        subprocess.Popen(
            [*cmd, str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    ranges = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        ranges.append(json.loads(out[out.index("{") :])["document_range"])
    assert ranges == [[0, 2], [2, 5]]  # contiguous, disjoint, all documents
    parts = [_records(tmp_path / f"sg-{i:05d}-of-00002.parquet") for i in range(2)]
    assert all(parts), [len(p) for p in parts]  # each process kept answers of its documents
    assert {r["context"] for r in parts[0]}.isdisjoint(r["context"] for r in parts[1])
    both = parts[0] + parts[1]
    assert len(both) == len(one) >= 3
    for a, b in zip(one, both):
        assert a.keys() == b.keys()
        for k in a:
            if k == "logprobs_vals":
                diff = [np.abs(np.subtract(x, y, dtype=np.float64)) for x, y in zip(a[k], b[k])]
                assert max(float(np.max(d)) for d in diff) <= LP_TOL
            elif isinstance(a[k], str):
                assert a[k] == b[k], k
            else:
                assert [np.asarray(x).tolist() for x in a[k]] == [
                    np.asarray(x).tolist() for x in b[k]
                ], k
