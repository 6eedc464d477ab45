"""`hyperlora-jax serve`: an OpenAI-compatible HTTP server over one loaded base model, with
adapters made on request (hyperlora_jax.serve has the routes and the batching worker)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from hyperlora_jax.cli.common import name_value_pairs, non_negative_float, positive_int
from hyperlora_jax.cli.models import add_session_args, open_session


def _serve(args: argparse.Namespace) -> int:
    from hyperlora_jax.serve import Server

    preload = name_value_pairs(args.adapter or [], "--adapter", "doc=out/doc_adapter")
    session = open_session(args, list(preload.values()))
    for name, folder in preload.items():
        session.load_adapter(folder, name)
    if args.default_max_tokens > args.max_tokens:
        args.default_max_tokens = args.max_tokens
    server = Server(
        session,
        max_batch=args.max_batch,
        batch_window_s=args.batch_window_ms / 1000,
        max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens,
    )
    httpd = server.make_http(args.host, args.port)
    host, port = httpd.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host

    def stop(*_):  # SIGTERM: finish the requests being answered, then exit 0
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(
        f"serving {session.model_name} at http://{shown}:{port}/v1 (OpenAI-compatible; "
        f"adapters: {', '.join(preload) or 'none yet'}; Ctrl-C to stop)",
        flush=True,
    )
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        print(file=sys.stderr)
    finally:
        httpd.server_close()
        server.close()
    return 0


def register(subparsers) -> None:
    """Add `serve` to the `hyperlora-jax` parser."""
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server: chat with per-request adapters, batched",
        description="POST /v1/chat/completions (model = the base model or an adapter name; "
        'extension fields "adapters": [names] composed by rank concatenation, "context": a '
        "document in the prompt), GET /v1/models, POST /v1/adapters/internalize {name, "
        "document}, POST /v1/adapters/generate {name, description}, DELETE /v1/adapters/NAME. "
        "Concurrent requests are answered in batches with per-example adapters. Greedy unless "
        "the request sets a temperature.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        help="NAME=DIR: an adapter folder to load at start (repeatable)",
    )
    p.add_argument(
        "--batch-window-ms",
        type=non_negative_float,
        default=10.0,
        help="how long the first request of a batch waits for others",
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=512,
        help="largest max_tokens a request may ask for",
    )
    p.add_argument(
        "--default-max-tokens",
        type=positive_int,
        default=128,
        help="max_tokens of a request that sets none",
    )
    add_session_args(p, max_batch=16)
    p.set_defaults(func=_serve)
