"""`hyperlora-jax serve` driven by the real `openai` client: adapters made over HTTP, chat with a
document adapter, a task adapter and both, /v1/models, concurrent requests batched with the same
greedy answers as one at a time, and bad requests answered 4xx with an OpenAI-style JSON error.

The server is the real CLI in a subprocess on a free loopback port, over the tiny random Gemma-2
of the official D2L fixture (outputs are noise: answers are compared with each other).
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import openai
import portpicker
import pytest
from test_chat_session import BASE, D2L, DOC, QS, TASKS, cli_env, write_tiny_t2l

from benchmarks.serve_load import call, start_server

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    t2l, embs = write_tiny_t2l(d)
    port = portpicker.pick_unused_port()
    cmd = [sys.executable, "-m", "hyperlora_jax.cli", "serve", "--model", str(BASE)]
    cmd += ["--d2l", str(D2L / "pytorch_model.bin"), "--t2l", str(t2l), "--t2l-encoder", str(embs)]
    cmd += ["--port", str(port), "--max-batch", "16", "--batch-window-ms", "100"]
    cmd += ["--max-tokens", "32", "--max-adapters", "4"]
    proc, url, _ = start_server(cmd, timeout=180, env=cli_env())
    try:
        assert url == f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        yield url, client, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ask(client, q: str, model: str, adapters=None) -> str:
    extra = {"adapters": adapters} if adapters else None
    out = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": q}],
        max_tokens=MAX_TOKENS,
        extra_body=extra,
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    return out.choices[0].message.content


@pytest.fixture(scope="module")
def adapters(server):
    url, client, _ = server
    status, card = call(url, "POST", "/v1/adapters/internalize", {"name": "doc", "document": DOC})
    assert status == 200 and card["id"] == "doc" and card["kind"] == "document", card
    assert card["rank"] == 16 and card["modules"] == ["down_proj"] and card["parent"] == str(BASE)
    task = {"name": "task", "description": TASKS[0]}
    status, card = call(url, "POST", "/v1/adapters/generate", task)
    assert status == 200 and card["kind"] == "task" and card["modules"] == ["q_proj", "v_proj"]
    ids = [m.id for m in client.models.list().data]
    assert ids == [str(BASE), "doc", "task"]  # the base model, then adapters as vLLM lists LoRAs
    # one at a time: the answers every later check compares with
    modes = {"base": (str(BASE), None), "doc": ("doc", None), "task": ("task", None)}
    modes["both"] = ("doc", ["task"])  # `model` names one adapter, the extension field more
    return {k: tuple(ask(client, q, *v) for q in QS) for k, v in modes.items()}, modes


def test_chat_with_document_task_and_both(server, adapters):
    url, client, _ = server
    seq, _ = adapters
    assert seq["doc"] != seq["base"] and seq["task"] != seq["base"]
    assert len({seq["doc"], seq["task"], seq["both"]}) == 3
    # the same composition named only by the extension field, on the base model
    assert ask(client, QS[0], str(BASE), ["doc", "task"]) == seq["both"][0]
    # the document in the prompt (extension field "context"): the in-context baseline
    out = client.chat.completions.create(
        model=str(BASE),
        messages=[{"role": "user", "content": QS[0]}],
        max_tokens=MAX_TOKENS,
        extra_body={"context": DOC},
    )
    assert (
        out.usage.prompt_tokens
        > 20
        + client.chat.completions.create(
            model=str(BASE), messages=[{"role": "user", "content": QS[0]}], max_tokens=1
        ).usage.prompt_tokens
    )
    status, card = call(url, "GET", "/v1/models/doc")
    assert status == 200 and card["root"] == str(BASE)


def test_concurrent_requests_are_batched_like_sequential_ones(server, adapters):
    url, client, _ = server
    seq, modes = adapters
    before = call(url, "GET", "/stats")[1]
    jobs = [(mode, i) for mode in modes for i in range(len(QS))]  # 12 requests, 4 adapter sets
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futs = {job: pool.submit(ask, client, QS[job[1]], *modes[job[0]]) for job in jobs}
        got = {job: f.result() for job, f in futs.items()}
    assert {job: got[job] for job in jobs} == {(m, i): seq[m][i] for m, i in jobs}
    after = call(url, "GET", "/stats")[1]
    batches = after["batches"] - before["batches"]
    assert after["requests"] - before["requests"] == len(jobs)
    assert batches < len(jobs), after  # several requests shared a forward pass


def test_bad_requests_get_4xx_json_errors(server, adapters):
    url, client, proc = server
    chat = "/v1/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    cases = [
        ("POST", chat, None, b'{"model": ', 400),  # malformed JSON
        ("POST", chat, None, b"[1, 2]", 400),  # not an object
        ("POST", chat, {"messages": msg}, None, 400),  # missing model
        ("POST", chat, {"model": str(BASE)}, None, 400),  # missing messages
        ("POST", chat, {"model": str(BASE), "messages": []}, None, 400),
        (
            "POST",
            chat,
            {"model": str(BASE), "messages": [{"role": "bot", "content": "x"}]},
            None,
            400,
        ),
        ("POST", chat, {"model": "nope", "messages": msg}, None, 404),  # unknown model
        ("POST", chat, {"model": str(BASE), "messages": msg, "adapters": ["nope"]}, None, 404),
        ("POST", chat, {"model": str(BASE), "messages": msg, "adapters": "doc"}, None, 400),
        ("POST", chat, {"model": str(BASE), "messages": msg, "max_tokens": 1000}, None, 400),
        ("POST", chat, {"model": str(BASE), "messages": msg, "max_tokens": "8"}, None, 400),
        ("POST", chat, {"model": str(BASE), "messages": msg, "stream": True}, None, 400),
        ("POST", chat, {"model": str(BASE), "messages": msg, "n": 2}, None, 400),
        ("POST", chat, {"model": str(BASE), "messages": msg, "temperature": -1}, None, 400),
        ("POST", "/v1/adapters/internalize", {"name": "x"}, None, 400),  # no document
        ("POST", "/v1/adapters/internalize", {"name": "x", "document": "  "}, None, 400),
        ("POST", "/v1/adapters/internalize", {"name": "a/b", "document": DOC}, None, 400),
        ("POST", "/v1/adapters/generate", {"name": "x", "description": "unknown task"}, None, 400),
        ("DELETE", "/v1/adapters/nope", None, None, 404),
        ("GET", "/v1/nothing", None, None, 404),
        ("GET", chat, None, None, 405),
    ]
    for method, path, body, raw, want in cases:
        status, payload = call(url, method, path, body, raw)
        assert status == want, (method, path, body, raw, payload)
        err = payload["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err
    # too many tokens: the prompt and max_tokens over the model's window of 2,048
    long = [{"role": "user", "content": "ferry " * 2100}]
    with pytest.raises(openai.BadRequestError, match="window"):
        client.chat.completions.create(model=str(BASE), messages=long, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=msg)
    # an adapter made and deleted: then unknown
    assert call(url, "POST", "/v1/adapters/internalize", {"name": "tmp", "document": DOC})[0] == 200
    gone = {"id": "tmp", "object": "model", "deleted": True}
    assert call(url, "DELETE", "/v1/adapters/tmp") == (200, gone)
    with pytest.raises(openai.NotFoundError):
        ask(client, QS[0], "tmp")
    assert call(url, "GET", "/health") == (200, {"status": "ok"}) and proc.poll() is None
    assert ask(client, QS[0], "doc") == adapters[0]["doc"][0]  # still serving, same answers
