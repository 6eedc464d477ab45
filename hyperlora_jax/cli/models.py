"""`hyperlora-jax fetch-model` and `hyperlora-jax chat` (one prompt, or an interactive session
that keeps the model loaded: hyperlora_jax.session)."""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import sys
import time
from pathlib import Path

from hyperlora_jax.cli.common import (
    MODEL_HELP,
    add_allow_other_base,
    non_negative_float,
    positive_int,
    probability,
)
from hyperlora_jax.errors import HyperLoraError, InputError

# hyperlora_jax.precision.POLICIES + "auto", spelled out: the parser must not import jax
PRECISIONS = ("f32", "bf16", "bf16-params", "bf16-prefill", "auto")


def _fetch_model(args: argparse.Namespace) -> int:
    from hyperlora_jax.models.fetch import fetch_model

    t0 = time.time()
    folder = fetch_model(args.name, dest=args.dest)
    print(f"model ready at {folder} ({time.time() - t0:.1f} s)")
    return 0


# ----------------------------------------------------------------------------- shared with serve
def read_text(path: str | Path, what: str = "document") -> str:
    """A UTF-8 text file that is not empty; InputError naming the path otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"no {what} file at {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p} is not UTF-8 text ({e})") from e
    if not text.strip():
        raise InputError(f"{what} {p} is empty; give it some text")
    return text


def adapter_name(path: str | Path, taken: set[str] = frozenset()) -> str:
    """A store name from a folder or file name: allowed characters only, unique in `taken`."""
    stem = Path(path).name if Path(path).is_dir() else Path(path).stem
    base = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")[:60] or "adapter"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return name


def add_session_args(p: argparse.ArgumentParser, *, max_batch: int) -> None:
    """Flags of a loaded-model session (chat and serve)."""
    p.add_argument(
        "--model",
        default=None,
        help=MODEL_HELP + " (default: the base model the adapters record, else "
        "smollm2-135m-instruct)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="a precision policy (overrides --dtype): bf16 = bf16 matmul inputs with f32 "
        "accumulation, params f32; bf16-params also stores the weights in bf16; bf16-prefill = "
        "bf16 for the prompt, f32 for each new token; auto = the one measured fastest on CPU",
    )
    p.add_argument(
        "--d2l",
        default=None,
        help="Doc-to-LoRA checkpoint for internalizing documents (default: the shipped SmolLM2 "
        "one), loaded on first use",
    )
    p.add_argument(
        "--t2l",
        default=None,
        help="Text-to-LoRA checkpoint for task adapters (default: the shipped SmolLM2 one), "
        "loaded on first use",
    )
    p.add_argument(
        "--t2l-encoder",
        default=None,
        help="T2L task encoder: an embeddings file or a sentence-encoder folder (default: the "
        "checkpoint's own)",
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=None,
        help="D2L chunk size in tokens for long documents (default: the chunk length the "
        "hypernetwork was trained with, where its checkpoint records it, else no chunking)",
    )
    p.add_argument(
        "--max-adapters",
        type=positive_int,
        default=16,
        help="adapters kept in memory; the least recently used is dropped past it",
    )
    p.add_argument(
        "--max-batch", type=positive_int, default=max_batch, help="requests per forward pass"
    )
    add_allow_other_base(p, "adapter or hypernetwork")


def open_session(args: argparse.Namespace, adapter_dirs=(), *, chat_template: bool = True):
    """Load the base model once (load_base reports its progress on stderr)."""
    from hyperlora_jax.session import Session, base_model_for

    for d in adapter_dirs:
        if not Path(d).is_dir():
            raise InputError(f"no adapter folder at {d}")
    model = base_model_for(adapter_dirs, args.model)
    try:
        return Session(
            model,
            dtype=args.dtype,
            precision=args.precision,
            d2l=args.d2l,
            t2l=args.t2l,
            t2l_encoder=args.t2l_encoder,
            max_adapters=args.max_adapters,
            max_batch=args.max_batch,
            chunk_size=args.chunk_size,
            chat_template=chat_template,
            allow_other_base=args.allow_other_base,
            log=_log,
        )
    except HyperLoraError as e:
        if args.model is None and adapter_dirs:  # the name came from the adapters' metadata
            raise type(e)(
                f"{e} (the base model {model!r} is the one the adapters record; pass --model)"
            ) from e
        raise


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- chat
def _chat(args: argparse.Namespace) -> int:
    from hyperlora_jax.session import ChatRequest

    if args.prompt is not None and not args.prompt.strip():
        raise InputError("--prompt is empty")
    context = read_text(args.context, "context document") if args.context else None
    dirs = list(args.adapter or [])
    session = open_session(args, dirs, chat_template=not args.no_chat_template)
    names: list[str] = []
    for d in dirs:
        names.append(session.load_adapter(d, adapter_name(d, set(names))).name)
    if args.prompt is not None:
        req = ChatRequest(
            args.prompt,
            tuple(names),
            context,
            args.max_new_tokens,
            args.temperature,
            args.top_p,
            args.seed,
        )
        res = session.answer([req])[0]
        if args.jsonl:
            row = {
                "prompt": args.prompt,
                "answer": res.text,
                "adapters": list(res.adapters),
                "context": args.context,
            }
            print(json.dumps(row))
        else:
            print(res.text.strip())
        return 0
    repl = Repl(session, args, names, context, args.context)
    return repl.run()


HELP = """\
Type a question to ask it (with the adapters in use and the context document, if any).
Commands:
  /internalize FILE [NAME]  Doc-to-LoRA: turn a document into an adapter, then use it
  /task DESCRIPTION         Text-to-LoRA: an adapter for a task description, then use it
  /load DIR [NAME]          load an adapter folder, then use it
  /use NAME...              the adapters to apply (several: composed); /use none: base model
  /drop NAME                forget an adapter
  /adapters                 list the adapters in memory (* = in use)
  /context FILE | off       put a document into the prompt (the in-context baseline), or stop
  /save NAME DIR            write an adapter to a folder (replacing an adapter folder there)
  /help                     this text
  /quit                     leave (end of input too)"""


class _PipeLines:
    """Lines of a non-terminal stdin; `ready()` tells whether another line can be read without
    waiting, so questions that arrive together are answered in one batch."""

    def __init__(self, fd: int):
        self.fd, self.buf, self.eof = fd, b"", False

    def _fill(self, timeout: float | None) -> None:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if r:
            chunk = os.read(self.fd, 1 << 16)
            self.eof = not chunk
            self.buf += chunk

    def ready(self) -> bool:
        if b"\n" in self.buf or self.eof:
            return bool(self.buf)
        self._fill(0)
        return b"\n" in self.buf or (self.eof and bool(self.buf))

    def readline(self) -> str | None:
        while b"\n" not in self.buf and not self.eof:
            self._fill(None)
        if not self.buf:
            return None
        line, sep, rest = self.buf.partition(b"\n")
        self.buf = rest
        return line.decode("utf-8", errors="replace")


class Repl:
    """The interactive loop: questions (batched when they arrive together on a pipe) and
    /commands; an error is printed and the loop goes on."""

    def __init__(self, session, args, active: list[str], context: str | None, context_path):
        self.session = session
        self.args = args
        self.active = list(active)
        self.context = context
        self.context_path = context_path
        self.tasks = 0
        self.errors = 0
        self.tty = sys.stdin.isatty()

    # -- output
    def say(self, text: str) -> None:
        if self.args.jsonl:
            print(text, file=sys.stderr, flush=True)
        else:
            print(text, flush=True)

    def error(self, e: BaseException) -> None:
        from hyperlora_jax.cli import os_error_message

        self.errors += 1
        msg = os_error_message(e) if isinstance(e, OSError) else " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr, flush=True)

    def _in_use(self) -> str:
        used = ", ".join(self.active) if self.active else "base model (no adapter)"
        if self.context is not None:
            used += f"; context document {self.context_path}"
        return used

    # -- questions
    def ask(self, questions: list[str]) -> None:
        from hyperlora_jax.session import ChatRequest

        a = self.args
        reqs = [
            ChatRequest(
                q,
                tuple(self.active),
                self.context,
                a.max_new_tokens,
                a.temperature,
                a.top_p,
                a.seed,
            )
            for q in questions
        ]
        for q, r in zip(questions, self.session.answer(reqs)):
            if a.jsonl:
                row = {
                    "prompt": q,
                    "answer": r.text,
                    "adapters": list(r.adapters),
                    "context": None if self.context is None else str(self.context_path),
                }
                print(json.dumps(row), flush=True)
            else:
                print(r.text.strip() or "(empty answer)", flush=True)

    # -- commands
    def command(self, line: str) -> bool:
        """Run one /command; False means leave."""
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        s = self.session
        if word in ("/quit", "/exit", "/q"):
            return False
        if word == "/help":
            self.say(HELP)
        elif word == "/internalize":
            if not rest:
                raise InputError("usage: /internalize FILE [NAME]")
            path, _, name = rest.partition(" ")
            doc = read_text(path)
            t0 = time.perf_counter()
            item = s.internalize(doc, name.strip() or adapter_name(path))
            self._made(item, f"internalized {path}", t0)
        elif word == "/task":
            if not rest:
                raise InputError("usage: /task DESCRIPTION")
            self.tasks += 1
            name = f"task-{self.tasks}"
            while name in s.store:
                self.tasks += 1
                name = f"task-{self.tasks}"
            t0 = time.perf_counter()
            self._made(s.generate_adapter(rest, name), "task adapter", t0)
        elif word == "/load":
            if not rest:
                raise InputError("usage: /load DIR [NAME]")
            path, _, name = rest.partition(" ")
            t0 = time.perf_counter()
            self._made(
                s.load_adapter(path, name.strip() or adapter_name(path)), f"loaded {path}", t0
            )
        elif word == "/use":
            names = rest.split()
            if names in ([], ["none"]):
                self.active = []
            else:
                s.resolve(names)  # unknown names refused before anything changes
                self.active = names
            self.say(f"now answering with: {self._in_use()}")
        elif word == "/drop":
            if not rest:
                raise InputError("usage: /drop NAME")
            for name in rest.split():
                s.drop(name)
                if name in self.active:
                    self.active.remove(name)
                self.say(f"dropped {name}; now answering with: {self._in_use()}")
        elif word == "/adapters":
            items = s.adapters()
            if not items:
                self.say("no adapters loaded")
            for it in items:
                self.say(f"{'*' if it.name in self.active else ' '} {it.describe()}")
        elif word == "/context":
            if not rest:
                raise InputError("usage: /context FILE  or  /context off")
            if rest == "off":
                self.context, self.context_path = None, None
            else:
                self.context, self.context_path = read_text(rest, "context document"), rest
            self.say(f"now answering with: {self._in_use()}")
        elif word == "/save":
            name, _, folder = rest.partition(" ")
            if not name or not folder.strip():
                raise InputError("usage: /save NAME DIR")
            out = s.save_adapter(name, folder.strip())
            self.say(f"wrote {out}")
        else:
            raise InputError(f"unknown command {word}; /help lists the commands")
        return True

    def _made(self, item, what: str, t0: float) -> None:
        self.active = [item.name]
        self.say(
            f"{what} -> adapter {item.name!r} (rank {item.rank}, "
            f"{time.perf_counter() - t0:.1f} s); now answering with: {self._in_use()}"
        )

    # -- the loop
    def run(self) -> int:
        _log(
            f"chat with {self.session.model_name}; using {self._in_use()}. /help lists the "
            "commands, /quit leaves."
        )
        try:
            if self.tty:
                self._run_tty()
            else:
                self._run_pipe()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        # a script fed through a pipe learns that something failed; a person saw it
        return 2 if self.errors and not self.tty else 0

    def _handle(self, line: str) -> bool:
        try:
            return self.command(line)
        except (HyperLoraError, OSError) as e:
            self.error(e)
            return True

    def _ask(self, questions: list[str]) -> None:
        try:
            self.ask(questions)
        except (HyperLoraError, OSError) as e:
            self.error(e)

    def _run_tty(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                print(file=sys.stderr)
                return
            if not line or line.startswith("#"):
                continue
            if line.startswith("/"):
                if not self._handle(line):
                    return
            else:
                self._ask([line])

    def _run_pipe(self) -> None:
        try:
            lines = _PipeLines(sys.stdin.fileno())
        except (AttributeError, OSError, ValueError):  # not a real file: no look-ahead
            lines = None
        it = iter(sys.stdin) if lines is None else None
        pending: list[str] = []
        while True:
            raw = lines.readline() if lines is not None else next(it, None)
            if raw is None:
                break
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not line.startswith("/"):
                pending.append(line)
                more = lines is not None and lines.ready()
                if len(pending) >= self.args.max_batch or not more:
                    self._ask(pending)
                    pending = []
                continue
            if pending:
                self._ask(pending)
                pending = []
            if not self._handle(line):
                return
        if pending:
            self._ask(pending)


def register(subparsers) -> None:
    """Add this area's subcommands to the `hyperlora-jax` parser."""
    from hyperlora_jax.models.fetch import KNOWN_MODELS

    p = subparsers.add_parser(
        "fetch-model",
        help="download and convert a small base model into a ready folder",
        description="Known models: "
        + "; ".join(f"{k}: {v.description}" for k, v in KNOWN_MODELS.items())
        + ". Also accepts a .gguf file or a Hugging Face hub id (online only). Default "
        "destination: $HYPERLORA_CACHE/models/NAME (~/.cache/hyperlora_jax/models/NAME).",
    )
    p.add_argument("name", help=f"one of {', '.join(KNOWN_MODELS)}, a .gguf file, or a hub id")
    p.add_argument("--dest", default=None, help="output folder (default: the cache)")
    p.set_defaults(func=_fetch_model)

    p = subparsers.add_parser(
        "chat",
        help="chat with a base model (+ adapters): one --prompt, or an interactive session",
        description="With --prompt: print one answer and exit. Without: an interactive session "
        "reading questions and /commands from stdin (a terminal or a pipe; /help lists the "
        "commands) with the model loaded once; questions that arrive together on a pipe are "
        "answered in one batch. Exit status of a piped session: 2 if any line failed.",
    )
    p.add_argument("--prompt", default=None, help="the user message (omit for a session)")
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        help="adapter folder (hyperlora-jax format); repeat to compose several by rank "
        "concatenation",
    )
    p.add_argument(
        "--context", default=None, help="a document put into the prompt (the in-context baseline)"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    p.add_argument(
        "--jsonl",
        action="store_true",
        help="answers as JSON lines {prompt, answer, adapters, context} (the answer as generated, "
        "not stripped); session messages go to stderr",
    )
    add_session_args(p, max_batch=8)
    p.set_defaults(func=_chat)
