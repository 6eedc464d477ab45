"""`hyperlora-jax eval d2l|t2l` end to end on the tiny official fixtures: JSON, table, PNGs."""

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from hyperlora_jax.cli import main
from hyperlora_jax.errors import ConfigError

D2L = "tests/fixtures/official/d2l"
T2L = "tests/fixtures/official/t2l"


def _png_ok(path):
    assert path.stat().st_size > 5000
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and float(np.std(img[..., :3])) > 0.05


@pytest.mark.slow
def test_eval_d2l_cli_end_to_end(tmp_path, fixtures_dir):
    out = tmp_path / "d2l"
    rc = main([
        "eval", "d2l", "--base", f"{D2L}/tiny-gemma2", "--checkpoint", f"{D2L}/pytorch_model.bin",
        "--niah-bins", "128-256", "--niah-per-bin", "1", "--chunk-size", "64",
        "--methods", "d2l,full_context,no_context,cd_oracle", "--max-new-tokens", "2",
        "--cd-iterations", "1", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "rougeL_f1"
    assert set(res["summary"]) == {"d2l", "full_context", "no_context", "cd_oracle"}
    assert list(res["summary"]["d2l"]["bins"]) == ["128-256"]
    d2l_rec = next(r for r in res["records"] if r["method"] == "d2l")
    assert d2l_rec["chunks"] >= 2  # a 128-256 token haystack split at 64 tokens
    assert d2l_rec["adapter_bytes"] > 0
    assert next(r for r in res["records"] if r["method"] == "full_context")["kv_cache_bytes"] > 0
    assert {"context_encoding", "hypernetwork", "composition", "generation", "cd_distill"} <= set(
        res["stages"]
    )
    md = (out / "results.md").read_text()
    assert "| 128-256 |" in md and "| stage |" in md
    assert (out / "tracked_stats.csv").read_text().startswith("example,stage")
    _png_ok(out / "accuracy_vs_length.png")
    _png_ok(out / "memory_vs_length.png")


def test_eval_t2l_cli_end_to_end(tmp_path):
    from hyperlora_jax.convert.official_t2l import convert
    from hyperlora_jax.eval.tasks import TASKS

    ckpt = convert(f"{T2L}/t2l_release", tmp_path / "t2l", base_model=f"{T2L}/tiny-mistral")
    rng = np.random.default_rng(0)
    emb = tmp_path / "emb.jsonl"
    emb.write_text(
        "\n".join(
            json.dumps({"description": d, "embedding": rng.normal(size=1024).tolist()})
            for d in TASKS["boolq"].descriptions
        )
    )
    data = tmp_path / "boolq.jsonl"
    rows = [{"passage": "Water is wet.", "question": "is water wet", "answer": True}] * 2
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    rc = main([
        "eval", "t2l", "--base", f"{T2L}/tiny-mistral", "--checkpoint", ckpt,
        "--encoder", str(emb), "--task", f"boolq={data}", "--max-new-tokens", "2",
        "--parity", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["parity"] is True and res["tasks"]["boolq"]["n"] == 2
    assert len(res["tasks"]["boolq"]["t2l_each"]) == 3
    for m in ("base", "base_desc", "t2l"):
        assert 0.0 <= res["tasks"]["boolq"][m] <= 1.0
    assert "| t2l |" in (out / "results.md").read_text()
    _png_ok(out / "accuracy_by_task.png")
    # --mesh (here a 1-device mesh: the sharded code path; 8 devices: test_sharded_inference)
    rc = main([
        "eval", "t2l", "--base", f"{T2L}/tiny-mistral", "--checkpoint", ckpt,
        "--encoder", str(emb), "--task", f"boolq={data}", "--max-new-tokens", "2",
        "--parity", "--mesh", "data=1,fsdp=1,tensor=1", "--out", str(tmp_path / "mesh"),
    ])  # fmt: skip
    assert rc == 0
    on_mesh = json.loads((tmp_path / "mesh" / "results.json").read_text())
    assert on_mesh["samples"] == res["samples"]


def test_eval_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(ConfigError, match="needs --checkpoint"):
        from hyperlora_jax.cli import build_parser

        args = build_parser().parse_args(
            [
                "eval",
                "d2l",
                "--base",
                f"{D2L}/tiny-gemma2",
                "--niah-bins",
                "32-128",
                "--out",
                str(tmp_path),
            ]  # fmt: skip
        )
        args.func(args)
    rc = main(["eval", "t2l", "--base", "x", "--task", "mmlu=x.jsonl", "--out", str(tmp_path)])
    assert rc == 2 and "unknown T2L benchmark 'mmlu'" in capsys.readouterr().err
    rc = main(["eval", "t2l", "--base", "x", "--task", "boolq", "--out", str(tmp_path)])
    assert rc == 2 and "--task 'boolq': write NAME=VALUE" in capsys.readouterr().err
    rc = main(["eval", "t2l", "--base", "x", "--modes", "base,oops", "--out", str(tmp_path)])
    assert rc == 2 and "unknown mode(s) ['oops']" in capsys.readouterr().err
    data = tmp_path / "boolq.jsonl"
    data.write_text(json.dumps({"passage": "p", "question": "q", "answer": True}) + "\n")
    rc = main(["eval", "t2l", "--base", str(tmp_path / "no-model"), "--modes", "base",
               "--task", f"boolq={data}", "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "no-model" in err and "smollm2-135m-instruct" in err, err
