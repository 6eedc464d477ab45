"""`hyperlora-jax chat` as a session (hyperlora_jax.session): the model loaded once, adapters made
and chosen by /commands, batched answers equal to one-off answers.

Everything runs on the tiny random Gemma-2 of the official D2L fixture (its outputs are noise, so
the checks compare answers with each other, never with a right answer): its D2L checkpoint, and
a random tiny T2L written for it here with precomputed task embeddings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax.errors import InputError
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.session import (
    AdapterStore,
    ChatRequest,
    Session,
    StoredAdapter,
    UnknownAdapter,
    base_model_for,
)

ROOT = Path(__file__).resolve().parents[1]
D2L = ROOT / "tests" / "fixtures" / "official" / "d2l"
BASE = D2L / "tiny-gemma2"
DOC = "The Merrow ferry leaves at 7:15 and 5:40. Its captain is Ilsa Varga."
TASKS = ("Answer in one word.", "Reply in French.")
QS = ("Who is the captain?", "When does the ferry leave?", "What is the ferry called?")


def write_tiny_t2l(folder: Path) -> tuple[Path, Path]:
    """A random T2L for the tiny Gemma-2 (q_proj, v_proj; rank 8) + embeddings of TASKS."""
    from hyperlora_jax.hypernet.t2l.checkpoint import save_checkpoint
    from hyperlora_jax.hypernet.t2l.model import T2LConfig, init_params

    cfg = T2LConfig(
        modules=("q_proj", "v_proj"),
        in_features=(64, 64),
        out_features=(64, 32),
        num_layers=3,
        task_emb_size=8,
        latent_size=16,
        head_in_size=16,
        head_init="default",
    )
    rng = np.random.default_rng(0)
    embs = folder / "task_embs.jsonl"
    embs.write_text(
        "".join(
            json.dumps({"description": d, "embedding": rng.normal(size=8).tolist()}) + "\n"
            for d in TASKS
        )
    )
    ckpt = save_checkpoint(
        folder / "t2l", cfg, init_params(cfg, jax.random.key(0)), meta={"base_model": str(BASE)}
    )
    return ckpt, embs


def cli_env() -> dict:
    """The test process's XLA flags and a shared compilation cache for CLI subprocesses."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(args: list[str], stdin: str | None = None, timeout: int = 240):
    cmd = [sys.executable, "-m", "hyperlora_jax.cli", *args]
    return subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=timeout
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    (d / "doc.txt").write_text(DOC + "\n")
    t2l, embs = write_tiny_t2l(d)
    return d, t2l, embs


def test_interactive_session_through_the_cli(files):
    """One process, one model load: /internalize, /task, /use, /context, /drop change the answers
    as they should; questions arriving together are answered in one batch equal to one-off
    answers; a bad line is one error and the session goes on (a piped session then exits 2)."""
    d, t2l, embs = files
    script = "\n".join(
        [
            *QS,  # base model (each group of three questions: one batch)
            f"/internalize {d / 'doc.txt'} doc",
            *QS,  # the document adapter
            f"/task {TASKS[0]}",  # -> task-1, now in use
            *QS,  # the task adapter
            "/use doc task-1",
            *QS,  # both, composed by rank concatenation
            f"/save doc {d / 'doc_adapter'}",
            "/adapters",
            "/use none",
            f"/context {d / 'doc.txt'}",
            *QS,  # the document in the prompt
            "/context off",
            "/drop doc",
            "/use doc",  # error: dropped
            "/bogus",  # error: unknown command
            *QS,  # the base model again
            "/quit",
            "never read",
        ]
    )
    flags = ["--model", str(BASE), "--d2l", str(D2L / "pytorch_model.bin"), "--t2l", str(t2l)]
    flags += ["--t2l-encoder", str(embs), "--max-new-tokens", "8", "--jsonl"]
    r = run_cli(["chat", *flags], stdin=script + "\n")
    assert r.returncode == 2, r.stderr  # two lines failed; the session went on
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["prompt"] for x in rows] == list(QS) * 6
    modes = [rows[i : i + 3] for i in range(0, 18, 3)]
    used = [[], ["doc"], ["task-1"], ["doc", "task-1"], [], []]
    assert [[x["adapters"] for x in m] for m in modes] == [[u] * 3 for u in used]
    assert [m[0]["context"] for m in modes] == [None] * 4 + [str(d / "doc.txt"), None]
    base, doc, task, both, in_context, again = [tuple(x["answer"] for x in m) for m in modes]
    assert r.stderr.count("loading ") == 1, r.stderr  # the base model, once
    assert "loaded D2L hypernetwork" in r.stderr and "loaded T2L hypernetwork" in r.stderr
    assert "error: no adapter named 'doc'" in r.stderr and "unknown command /bogus" in r.stderr
    assert "* doc (document, rank 16 on down_proj" in r.stderr  # /adapters marks the one in use
    assert "never read" not in r.stdout
    # each way of answering changes the base model's answers; dropping goes back to them
    assert doc != base and task != base and in_context != base
    assert len({doc, task, both}) == 3  # three different adapters
    assert again == base

    # The batched answers with the adapter equal one-off `chat --prompt --adapter` answers; the
    # saved adapter records its base model, so no --model is needed.
    saved = json.loads((d / "doc_adapter" / "adapter.json").read_text())
    assert saved["base_model"] == str(BASE) and saved["base_fingerprint"]
    one = run_cli(
        [
            "chat",
            "--adapter",
            str(d / "doc_adapter"),
            "--prompt",
            QS[1],
            "--max-new-tokens",
            "8",
            "--jsonl",
        ]
    )
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["answer"] == doc[1]
    assert one.stderr.count("loading ") == 1 and str(BASE) in one.stderr


def test_scripted_errors_are_one_line(tmp_path, capsys):
    """Bad input before the model loads: one `error:` line, exit 2."""
    from hyperlora_jax.cli import main

    def run(*args):
        rc = main(["chat", *args])
        return rc, capsys.readouterr().err.strip()

    assert run("--prompt", "  ") == (2, "error: --prompt is empty")
    rc, err = run("--prompt", "hi", "--adapter", str(tmp_path / "missing"))
    assert rc == 2 and err == f"error: no adapter folder at {tmp_path / 'missing'}"
    rc, err = run("--prompt", "hi", "--context", str(tmp_path / "missing.txt"))
    assert rc == 2 and err.startswith("error: no context document file at")
    # two adapters made for different base models: refused by name, before any load
    for name, base in (("a", "smollm2-135m-instruct"), ("b", "gemma-3-270m")):
        (tmp_path / name).mkdir()
        meta = {"format": "hyperlora_jax.adapter", "base_model": base}
        (tmp_path / name / "adapter.json").write_text(json.dumps(meta))
    rc, err = run(
        "--prompt", "hi", "--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "b")
    )
    assert rc == 2 and len(err.splitlines()) == 1 and "name different base models" in err


def test_base_model_choice(tmp_path):
    def adapter(name, **meta):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter.json").write_text(
            json.dumps({"format": "hyperlora_jax.adapter", **meta})
        )
        return tmp_path / name

    plain = adapter("plain")
    hub = adapter("hub", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    short = adapter("short", base_model="smollm2-135m-instruct")
    assert base_model_for([]) == "smollm2-135m-instruct"  # the embedded default
    assert base_model_for([plain]) == "smollm2-135m-instruct"
    assert base_model_for([hub, short, plain]) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_for([hub], "other") == "other"  # --model wins
    fp1 = adapter("fp1", base_model="x/one", base_fingerprint="aaaa-bbbb")
    fp2 = adapter("fp2", base_model="x/two", base_fingerprint="aaaa-bbbb")
    fp3 = adapter("fp3", base_model="x/one", base_fingerprint="aaaa-cccc")
    assert base_model_for([fp1, fp2]) == "x/one"  # same fingerprint, other name: same model
    with pytest.raises(InputError, match="different base models"):
        base_model_for([fp1, fp3])


def _tiny_adapter(rank: int, value: float = 1.0) -> Adapter:
    return Adapter({"q_proj": jnp.full((2, rank, 4), value)}, {"q_proj": jnp.ones((2, rank, 4))})


def test_adapter_store_is_a_bounded_lru():
    store = AdapterStore(2)
    for name in "abc":
        evicted = store.put(StoredAdapter(name, _tiny_adapter(1), "task", {}))
    assert evicted == ["a"] and [x.name for x in store.items()] == ["b", "c"]
    store.get("b")  # used: c is now the oldest
    assert store.put(StoredAdapter("d", _tiny_adapter(1), "task", {})) == ["c"]
    assert [x.name for x in store.items()] == ["b", "d"]
    with pytest.raises(UnknownAdapter, match="no adapter named 'c'"):
        store.get("c")
    store.drop("b")
    assert "b" not in store and len(store) == 1


def test_batch_with_different_adapters_equals_one_at_a_time(files):
    """In-process: a batch mixing no adapter, a document adapter (rank 16, down_proj), a task
    adapter (rank 8, q/v) and both with the document in the prompt (ranks padded with zeros in
    one stacked adapter) gives every request the tokens it gets alone."""
    _, t2l, embs = files
    s = Session(str(BASE), d2l=D2L / "pytorch_model.bin", t2l=t2l, t2l_encoder=embs)
    s.internalize(DOC, "doc")
    s.generate_adapter(TASKS[1], "fr")
    reqs = [
        ChatRequest(QS[0], (), max_new_tokens=6),
        ChatRequest(QS[1], ("doc",), max_new_tokens=6),
        ChatRequest(QS[0], ("fr",), max_new_tokens=4),
        ChatRequest(QS[2], ("doc", "fr"), context=DOC, max_new_tokens=6),
    ]
    batched = s.answer(reqs)
    alone = [s.answer([r])[0] for r in reqs]
    assert [(b.token_ids, b.text) for b in batched] == [(a.token_ids, a.text) for a in alone]
    assert batched[2].completion_tokens <= 4 and batched[3].adapters == ("doc", "fr")
    with pytest.raises(UnknownAdapter):
        s.answer([ChatRequest(QS[0], ("nope",))])
    with pytest.raises(InputError, match="window"):
        s.answer([ChatRequest(QS[0], max_new_tokens=s.window)])
