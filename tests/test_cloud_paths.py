"""`gs://` workdirs, checkpoints and exports (hyperlora_jax/paths.py: etils.epath) against a fake
Cloud Storage: the tiny D2L run trains, resumes and exports with every path a `gs://` URL.

The fake is local-backed: an fsspec filesystem registered for the gs/gcs protocols (what
epath's fsspec backend opens for gs:// when TensorFlow is absent) maps gs://BUCKET/KEY to
ROOT/BUCKET/KEY, and Orbax's two direct GCS calls (tensorstore's kvstore spec, the bucket's
hierarchical-namespace probe) point at the same folder. Everything above that (our code, epath,
Orbax's GCS code path: commit-file atomicity, no renames) runs as it does against GCS.
"""

import json
import shutil
import sys
from pathlib import Path

import fsspec.registry  # noqa: F401 - the fake registers itself there
import jax
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from hyperlora_jax.cli import main
from hyperlora_jax.hypernet.d2l.checkpoint import load_checkpoint
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.lora.storage import load_adapter, save_adapter

ROOT = Path(__file__).parents[1]


class FakeGCS(DirFileSystem):
    """gs://BUCKET/KEY -> FakeGCS.root/BUCKET/KEY."""

    protocol = ("gs", "gcs")
    cachable = False
    root = ""

    def __init__(self, *args, **kwargs):  # gcsfs options (finalize_on_close, ...) ignored
        super().__init__(path=FakeGCS.root, fs=LocalFileSystem())


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import gcs_utils

    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.setattr(FakeGCS, "root", str(root))
    registry = sys.modules["fsspec.registry"]._registry  # fsspec.registry is a read-only view
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, FakeGCS)
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setattr(
        gcs_utils,
        "get_kvstore_for_gcs",
        lambda p: {"driver": "file", "path": str(root / p.removeprefix("gs://"))},
    )
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False)
    # nothing may land in the working directory (a "gs:" folder: a URL taken for a local path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    assert not any(cwd.iterdir()), sorted(cwd.iterdir())


def _train(work: str, steps: int) -> int:
    return main(
        [
            "train",
            "--config",
            f"{ROOT}/configs/d2l.py:tiny",
            f"--config.train.steps={steps}",
            "--config.train.loss=ce",  # the synthetic task has no teacher
            f"--workdir={work}",
        ]
    )


def test_tiny_run_resume_and_export_on_gs(fake_gcs):
    work = "gs://bucket/runs/tiny"
    run = fake_gcs / "bucket" / "runs" / "tiny"
    assert _train(work, 2) == 0

    def steps():
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in rows if "loss" in r]

    assert steps() == [1, 2]
    ckpt = run / "checkpoints" / "2"
    assert (ckpt / "sha256.json").is_file() and (ckpt / "state").is_dir()
    assert json.loads((run / "rebuild.json").read_text())["kind"] == "d2l"
    assert any((run / "tb").iterdir())  # TensorBoard events, written through epath

    assert _train(work, 3) == 0  # resumes from step 2: one more step
    assert steps() == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "3",
    ]

    out = "gs://bucket/exports/tiny"
    assert main(["export-run", f"--workdir={work}", f"--out={out}"]) == 0
    ck = load_checkpoint(out)  # read back through epath
    assert ck.meta["training"]["step"] == 3 and ck.meta["training"]["workdir"] == work
    local = load_checkpoint(fake_gcs / "bucket" / "exports" / "tiny")
    assert ck.config == local.config
    for a, b in zip(jax.tree.leaves(ck.params), jax.tree.leaves(local.params)):
        np.testing.assert_array_equal(a, b)
    # an export never overwrites a folder unasked
    assert main(["export-run", f"--workdir={work}", f"--out={out}"]) == 2


def test_convert_and_internalize_on_gs(fake_gcs, monkeypatch):
    """An official checkpoint converted to gs://, read back from there by `internalize` with a
    gs:// document, base model and adapter: the same adapter as the local run."""
    monkeypatch.setenv("HYPERLORA_CACHE", str(fake_gcs.parent / "cache"))
    fx = ROOT / "tests/fixtures/official/d2l"
    base = ["--base-model", str(fx / "tiny-gemma2")]
    convert = ["convert", "official-d2l", str(fx / "pytorch_model.bin"), "gs://b/d2l"]
    assert main([*convert, *base]) == 0
    (fake_gcs / "b" / "doc.txt").write_text("Tamsin Holloway keeps a tortoise in Redcliff.")
    shutil.copytree(fx / "tiny-gemma2", fake_gcs / "b" / "models" / "tiny-gemma2")
    on_gs = ["--hypernet", "gs://b/d2l", "--doc", "gs://b/doc.txt", "--out", "gs://b/ad"]
    here = fake_gcs.parent / "local"
    on_disk = ["--hypernet", str(fake_gcs / "b/d2l"), "--doc", str(fake_gcs / "b/doc.txt")]
    assert main(["internalize", *on_gs, "--base-model", "gs://b/models/tiny-gemma2"]) == 0
    assert len(list((fake_gcs.parent / "cache" / "models").iterdir())) == 1  # copied once
    no_model = ["--base-model", "gs://b/nothing", "--out", "gs://b/ad2"]
    assert main(["internalize", *on_gs[:4], *no_model]) == 2  # one line: no config.json there
    assert main(["internalize", *on_disk, "--out", str(here), *base]) == 0
    remote, local = load_adapter("gs://b/ad"), load_adapter(here)
    assert list(remote.a) == list(local.a)
    for m in remote.a:
        np.testing.assert_array_equal(remote.a[m], local.a[m])
        np.testing.assert_array_equal(remote.b[m], local.b[m])


def test_adapter_folder_round_trip_on_gs(fake_gcs):
    rng = np.random.default_rng(0)
    ad = Adapter(
        {"q_proj": rng.standard_normal((2, 4, 8)).astype(np.float32)},
        {"q_proj": rng.standard_normal((2, 4, 16)).astype(np.float32)},
        2.0,
    )
    save_adapter(ad, "gs://bucket/adapters/one", {"source": "test"})
    files = sorted(p.name for p in (fake_gcs / "bucket" / "adapters" / "one").iterdir())
    assert files == ["adapter.json", "adapter.safetensors"]
    back = load_adapter("gs://bucket/adapters/one")
    np.testing.assert_array_equal(back.a["q_proj"], ad.a["q_proj"])
    np.testing.assert_array_equal(back.b["q_proj"], ad.b["q_proj"])
    assert back.scale == 2.0


def test_records_on_gs_write_and_read_back(fake_gcs):
    from hyperlora_jax.data.storage import RecordSource, read_documents, write_records

    recs = [{"text": f"document {i}", "n": i} for i in range(3)]
    assert write_records("gs://bucket/data/a.jsonl", recs) == 3
    assert write_records("gs://bucket/data/b.parquet", recs) == 3
    assert (fake_gcs / "bucket" / "data" / "b.parquet").is_file()
    # a folder, a glob and a file, each a gs:// URL
    assert len(RecordSource("gs://bucket/data")) == 6
    assert [r["n"] for r in RecordSource("gs://bucket/data/*.parquet")[:3]] == [0, 1, 2]
    docs, bad = read_documents("gs://bucket/data/a.jsonl")
    assert [d["text"] for d in docs] == ["document 0", "document 1", "document 2"] and not bad
    assert docs[0]["source"] == "gs://bucket/data/a.jsonl"
    # ArrayRecord: written locally then uploaded; read from a local copy made once
    assert write_records("gs://bucket/ar/c.array_record", recs) == 3
    assert (fake_gcs / "bucket" / "ar" / "c.array_record").is_file()
    assert [RecordSource("gs://bucket/ar/c.array_record")[i]["n"] for i in range(3)] == [0, 1, 2]


def test_token_shards_on_gs(fake_gcs):
    from hyperlora_jax.data import token_shards as ts

    for s in range(2):
        b = ts.ShardBuilder(vocab_size=100)
        b.add([1, 2, 3 + s], [([4, 5, 6], (1, 3))])
        n = ts.write_shard(
            f"gs://bucket/tok/{ts.shard_name(s, 2)}", b.arrays(), {"vocab_size": 100}
        )
        assert n > 0
    names = sorted(p.name for p in (fake_gcs / "bucket" / "tok").iterdir())
    assert names == [ts.shard_name(0, 2), ts.shard_name(1, 2)]  # no temporary left behind
    for where in ("gs://bucket/tok", "gs://bucket/tok/*.npz"):
        found = ts.find_shards(where)
        assert [str(f) for f in found] == [f"gs://bucket/tok/{n}" for n in names]
    shard = ts.read_shard(found[1])
    assert shard.ctx_ids.tolist() == [1, 2, 4] and shard.meta["vocab_size"] == 100


def test_eval_results_on_gs(fake_gcs):
    """`eval d2l --out gs://...` writes its results, table and plots through epath."""
    fx = ROOT / "tests/fixtures/official/d2l"
    rc = main([
        "eval", "d2l", "--base", str(fx / "tiny-gemma2"), "--checkpoint",
        str(fx / "pytorch_model.bin"), "--niah-bins", "32-128", "--niah-per-bin", "1",
        "--methods", "d2l,no_context", "--max-new-tokens", "2", "--out", "gs://b/eval",
    ])  # fmt: skip
    assert rc == 0
    out = fake_gcs / "b" / "eval"
    assert set(json.loads((out / "results.json").read_text())["summary"]) == {"d2l", "no_context"}
    pngs = sorted(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
