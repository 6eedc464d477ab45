"""An OpenAI-compatible HTTP server over a `Session` (standard library only: http.server).

    POST   /v1/chat/completions        OpenAI chat (non-streaming); `model` names the base model or
                                       an adapter (as vLLM serves LoRAs); extension fields
                                       "adapters": [names] (composed by rank concatenation) and
                                       "context": a document put into the prompt
    GET    /v1/models                  the base model and the loaded adapters
    POST   /v1/adapters/internalize    {"name", "document"[, "chunk_size"]}  Doc-to-LoRA
    POST   /v1/adapters/generate       {"name", "description"}              Text-to-LoRA
    DELETE /v1/adapters/{name}
    GET    /health, /stats

Concurrent requests are batched: HTTP threads check and tokenize a request, then hand it to ONE
worker thread, which takes what is queued (waiting at most `batch_window_s` after the first for
more, up to `max_batch`), runs one generation with per-example adapters and answers each.
Adapter creation runs on the same worker, between batches. Client errors are 4xx with an
OpenAI-style body {"error": {"message", "type", "param", "code"}}; the server keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from hyperlora_jax.errors import HyperLoraError, InputError
from hyperlora_jax.session import (
    ChatRequest,
    Prepared,
    Session,
    UnknownAdapter,
    canonical_model_name,
    check_adapter_name,
)

MAX_BODY = 16 * 2**20  # bytes of a request body (a document to internalize fits easily)
OWNER = "hyperlora-jax"


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def api_error(e: BaseException) -> ApiError:
    """The HTTP error for an exception raised while serving a request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UnknownAdapter):
        return ApiError(404, str(e), code="model_not_found")
    if isinstance(e, InputError):
        return ApiError(400, str(e))
    if isinstance(e, HyperLoraError):  # the server's own setup (a hypernetwork for another base)
        return ApiError(500, str(e), "server_error")
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


# ----------------------------------------------------------------------------- the batching worker
@dataclasses.dataclass
class _Job:
    future: concurrent.futures.Future
    prepared: Prepared | None = None  # a chat request
    call: Callable[[], Any] | None = None  # or work to run on the worker (adapter creation)


class BatchWorker:
    """One thread that owns the accelerator: chat requests batched, other work in between."""

    def __init__(self, session: Session, max_batch: int = 8, batch_window_s: float = 0.01):
        self.session = session
        self.max_batch = max_batch
        self.window = batch_window_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._backlog: deque[_Job] = deque()
        self.stats = {"requests": 0, "batches": 0, "batch_sizes": {}}
        self._stats_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="hyperlora-batch", daemon=True)
        self._thread.start()

    def submit(self, prepared: Prepared) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(fut, prepared=prepared))
        return fut

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(fut, call=fn))
        return fut

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _next(self, timeout: float | None) -> _Job | None:
        if self._backlog:
            return self._backlog.popleft()
        return self._queue.get(timeout=timeout)

    def _loop(self) -> None:
        while True:
            job = self._next(None)
            if job is None:
                return
            if job.call is not None:
                self._run_call(job)
                continue
            batch, deferred = [job], []
            key = job.prepared.sampling
            deadline = time.monotonic() + self.window
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._next(max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if nxt.prepared is not None and nxt.prepared.sampling == key:
                    batch.append(nxt)
                else:
                    deferred.append(nxt)
            self._run_batch(batch)
            self._backlog.extendleft(reversed(deferred))
            if stop:
                self._backlog.append(None)  # type: ignore[arg-type]

    def _run_call(self, job: _Job) -> None:
        try:
            job.future.set_result(job.call())
        except BaseException as e:  # handed to the waiting HTTP thread
            job.future.set_exception(e)

    def _run_batch(self, batch: list[_Job]) -> None:
        try:
            results = self.session.run_batch([j.prepared for j in batch])
        except BaseException as e:
            for j in batch:
                j.future.set_exception(e)
            return
        with self._stats_lock:
            self.stats["requests"] += len(batch)
            self.stats["batches"] += 1
            sizes = self.stats["batch_sizes"]
            sizes[len(batch)] = sizes.get(len(batch), 0) + 1
        for j, r in zip(batch, results):
            j.future.set_result(r)


# ----------------------------------------------------------------------------- request parsing
def _field(body: dict, name: str, kind, default=None, *, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"missing required field {name!r}", param=name)
        return default
    value = body[name]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ApiError(400, f"field {name!r} must be {names}, got {value!r}"[:300], param=name)
    return value


class Server:
    """The routes above over a Session and a BatchWorker; `make_http` builds the HTTP server."""

    def __init__(
        self,
        session: Session,
        *,
        max_batch: int = 8,
        batch_window_s: float = 0.01,
        max_tokens: int = 512,
        default_max_tokens: int = 128,
    ):
        self.session = session
        self.worker = BatchWorker(session, max_batch, batch_window_s)
        self.max_tokens = max_tokens
        self.default_max_tokens = min(default_max_tokens, max_tokens)
        self.created = int(time.time())
        self.model_id = session.model_name

    # -- routes
    def models(self) -> dict:
        base = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": OWNER,
            "root": self.model_id,
            "parent": None,
            "max_model_len": self.session.window,
        }
        data = [base]
        for item in self.session.adapters():
            data.append(self._adapter_card(item))
        return {"object": "list", "data": data}

    def _adapter_card(self, item) -> dict:
        return {
            "id": item.name,
            "object": "model",
            "created": int(item.created),
            "owned_by": OWNER,
            "root": self.model_id,
            "parent": self.model_id,
            "kind": item.kind,
            "rank": item.rank,
            "modules": list(item.adapter.modules),
        }

    def chat_completions(self, body: dict) -> dict:
        model = _field(body, "model", str, required=True)
        if _field(body, "stream", bool, False):
            raise ApiError(400, "stream: true is not supported; send stream: false", param="stream")
        if _field(body, "n", int, 1) != 1:
            raise ApiError(400, "only n = 1 is supported", param="n")
        if _field(body, "logprobs", bool, False):
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        names = list(_field(body, "adapters", list, []))
        if not all(isinstance(n, str) for n in names):
            raise ApiError(400, "'adapters' must be a list of adapter names", param="adapters")
        if canonical_model_name(model) != canonical_model_name(
            self.model_id
        ):  # the base model (a hub id of it too) or ...
            if model not in self.session.store:  # ... an adapter, as vLLM names LoRAs
                raise ApiError(
                    404,
                    f"the model {model!r} does not exist; GET /v1/models lists the base model "
                    "and the loaded adapters",
                    param="model",
                    code="model_not_found",
                )
            names = [model] + [n for n in names if n != model]
        limit = _field(body, "max_completion_tokens", int, None)
        limit = _field(body, "max_tokens", int, limit)
        limit = self.default_max_tokens if limit is None else limit
        if not 1 <= limit <= self.max_tokens:
            raise ApiError(
                400,
                f"max_tokens must be in [1, {self.max_tokens}] (this server's --max-tokens), got "
                f"{limit}",
                param="max_tokens",
            )
        stop = _field(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of at most 4", param="stop")
        temperature = _field(body, "temperature", (int, float), 0.0)
        if not 0 <= temperature <= 2:
            raise ApiError(
                400, f"temperature must be in [0, 2], got {temperature}", param="temperature"
            )
        request = ChatRequest(
            messages=_field(body, "messages", list, required=True),
            adapters=tuple(names),
            context=_field(body, "context", str, None),
            max_new_tokens=limit,
            temperature=float(temperature),
            top_p=float(_field(body, "top_p", (int, float), 1.0)),
            seed=_field(body, "seed", int, 0),
            stop=tuple(stop),
        )
        prepared = self.session.prepare(request)
        result = self.worker.submit(prepared).result()
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
            "adapters": list(result.adapters),
        }

    def _new_name(self, body: dict) -> str:
        name = _field(body, "name", str, required=True)
        try:
            check_adapter_name(name)
        except InputError as e:
            raise ApiError(400, str(e), param="name") from None
        if name == self.model_id:
            raise ApiError(
                400, f"{name!r} is the base model's id; choose another name", param="name"
            )
        return name

    def internalize(self, body: dict) -> dict:
        name = self._new_name(body)
        doc = _field(body, "document", str, required=True)
        chunk = _field(body, "chunk_size", int, None)
        if chunk is not None and chunk < 1:
            raise ApiError(400, f"chunk_size must be >= 1, got {chunk}", param="chunk_size")
        item = self.worker.call(lambda: self.session.internalize(doc, name, chunk)).result()
        return self._adapter_card(item)

    def generate(self, body: dict) -> dict:
        name = self._new_name(body)
        desc = _field(body, "description", str, required=True)
        item = self.worker.call(lambda: self.session.generate_adapter(desc, name)).result()
        return self._adapter_card(item)

    def delete(self, name: str) -> dict:
        self.session.drop(name)
        return {"id": name, "object": "model", "deleted": True}

    def stats(self) -> dict:
        with self.worker._stats_lock:
            s = json.loads(json.dumps(self.worker.stats))
        s["adapters"] = len(self.session.store)
        s["batch_shapes"] = len(self.session.shapes)  # generation programs compiled so far
        s["mean_batch"] = round(s["requests"] / s["batches"], 3) if s["batches"] else 0.0
        return s

    def close(self) -> None:
        self.worker.stop()

    def make_http(self, host: str, port: int) -> ThreadingHTTPServer:
        server = self

        class Handler(_Handler):
            app = server

        return _HTTPServer((host, port), Handler)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: many clients connect at once (default 5)


class _Handler(BaseHTTPRequestHandler):
    app: Server
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    server_version = "hyperlora-jax"

    def log_message(self, format: str, *args: Any) -> None:  # quiet; errors are logged below
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "bad Content-Length header") from None
        if n > MAX_BODY:
            self.close_connection = True  # the unread body must not become the next request
            raise ApiError(413, f"request body of {n:,} bytes is over the limit of {MAX_BODY:,}")
        raw = self.rfile.read(n) if n > 0 else b""
        self._consumed = True
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        app = self.app
        self._consumed = method in ("GET",)
        try:
            if method == "GET" and path == "/v1/models":
                out = app.models()
            elif method == "GET" and path.startswith("/v1/models/"):
                want = path[len("/v1/models/") :]
                found = [m for m in app.models()["data"] if m["id"] == want]
                if not found:
                    raise ApiError(
                        404, f"the model {want!r} does not exist", code="model_not_found"
                    )
                out = found[0]
            elif method == "GET" and path == "/health":
                out = {"status": "ok"}
            elif method == "GET" and path == "/stats":
                out = app.stats()
            elif method == "POST" and path == "/v1/chat/completions":
                out = app.chat_completions(self._body())
            elif method == "POST" and path == "/v1/adapters/internalize":
                out = app.internalize(self._body())
            elif method == "POST" and path == "/v1/adapters/generate":
                out = app.generate(self._body())
            elif method == "DELETE" and path.startswith("/v1/adapters/"):
                out = app.delete(path[len("/v1/adapters/") :])
            else:
                known = {"/v1/models", "/v1/chat/completions", "/v1/adapters/internalize"}
                if path in known or path.startswith("/v1/adapters/"):
                    raise ApiError(405, f"{method} is not allowed on {path}")
                raise ApiError(404, f"no route {method} {path}", code="not_found")
            self._send(200, out)
        except Exception as e:  # every failure is one JSON answer; the server keeps going
            err = api_error(e)
            if not self._consumed:  # an unread body must not be taken for the next request
                self.close_connection = True
            if err.status >= 500:
                print(f"error serving {method} {path}:", file=sys.stderr)
                traceback.print_exception(e, file=sys.stderr)
            try:
                self._send(err.status, err.body())
            except OSError:  # the client went away
                pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")
