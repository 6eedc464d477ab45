"""A loaded-model session: one base model loaded once, a bounded LRU store of named adapters,
lazily loaded Doc-to-LoRA / Text-to-LoRA hypernetworks, and batched chat in which every request
names its own adapters. What `hyperlora-jax chat` (interactive) and `hyperlora-jax serve` run on.

    s = Session("smollm2-135m-instruct")
    s.internalize(open("doc.txt").read(), "doc")          # D2L: a document -> adapter "doc"
    s.generate_adapter("Answer in one word.", "terse")     # T2L: a description -> adapter "terse"
    s.answer([ChatRequest("When does the ferry leave?", adapters=("doc",)),
              ChatRequest("Capital of France?", adapters=("doc", "terse")),   # rank concat
              ChatRequest("Hello!")])                                         # base model

A batch is ONE generation: each request's adapters are composed by rank concatenation (scales
folded into A, so every part has scale 1), the batch's adapters are stacked along a leading axis
[B, L, R, d] with ranks zero-padded to a common bucket (zero rows are exact), and a request
without adapters gets an all-zero row. Shapes are bucketed (batch and rank to powers of two,
prompt length to a power of two, new tokens to a multiple of 16) so a running server compiles
a handful of programs, not one per request.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.api import load_d2l
from hyperlora_jax.embedded import DEFAULT_MODEL, EMBEDDED_D2L, EMBEDDED_T2L
from hyperlora_jax.errors import CheckpointError, ConfigError, InputError
from hyperlora_jax.eval.baselines import full_context_prompt
from hyperlora_jax.hypernet.d2l.checkpoint import trained_chunk_size
from hyperlora_jax.hypernet.t2l.api import TextToLoRA
from hyperlora_jax.lora import adapter as ad
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.lora.storage import load_adapter, read_adapter_meta, save_adapter
from hyperlora_jax.models.decoding import generate
from hyperlora_jax.models.fetch import HUB_ALIASES
from hyperlora_jax.models.load import Base, base_fingerprint, check_fingerprint, load_base
from hyperlora_jax.models.tokenizer import apply_chat, load_tokenizer, stop_token_ids
from hyperlora_jax.precision import get_precision

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ROLES = ("system", "user", "assistant")
NEW_TOKENS_BUCKET = 16  # max_new_tokens rounds up to a multiple of this (then rows are cut)
MIN_PROMPT_BUCKET = 16
MIN_RANK_BUCKET = 16


class UnknownAdapter(InputError):
    """A request names an adapter the store does not hold (HTTP 404 in the server)."""


def _pow2(n: int, low: int = 1) -> int:
    """The smallest power of two >= max(n, low)."""
    return max(low, 1 << max(0, int(n) - 1).bit_length())


def canonical_model_name(model: str) -> str:
    """A model name with hub ids of known models folded to their short names."""
    return HUB_ALIASES.get(str(model), str(model))


# ----------------------------------------------------------------------------- adapter store
@dataclasses.dataclass(frozen=True)
class StoredAdapter:
    """A named adapter held in memory; `meta` is what save_adapter records (base model,
    fingerprint, source); `kind` is "document", "task" or "folder"."""

    name: str
    adapter: Adapter
    kind: str
    meta: dict
    created: float = dataclasses.field(default_factory=time.time)

    @property
    def rank(self) -> int:
        return self.adapter.rank

    @property
    def nbytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.adapter)))

    @functools.cached_property
    def unit(self) -> Adapter:
        """The same delta with scale 1.0 (folded into A), f32: what batches compose."""
        return ad.with_scale(ad.cast(self.adapter, jnp.float32), 1.0)

    def describe(self) -> str:
        src = self.meta.get("source") or {}
        what = src.get("task") or src.get("document") or src.get("path") or ""
        what = " ".join(str(what).split())
        what = f": {what[:50]}{'...' if len(what) > 50 else ''}" if what else ""
        return (
            f"{self.name} ({self.kind}, rank {self.rank} on {','.join(self.adapter.modules)}, "
            f"{self.nbytes / 2**20:.1f} MiB){what}"
        )


class AdapterStore:
    """Named adapters with a bound on their number; the least recently used one is evicted.

    Thread-safe: the server's HTTP threads list, resolve and delete while its worker adds.
    Requests hold the resolved StoredAdapter, so an eviction never breaks one in flight.
    """

    def __init__(self, max_adapters: int = 16):
        if max_adapters < 1:
            raise ConfigError(f"max_adapters must be >= 1, got {max_adapters}")
        self.max_adapters = max_adapters
        self._items: OrderedDict[str, StoredAdapter] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, item: StoredAdapter) -> list[str]:
        """Add or replace `item`; returns the names evicted to stay within the bound."""
        with self._lock:
            self._items.pop(item.name, None)
            self._items[item.name] = item
            evicted = []
            while len(self._items) > self.max_adapters:
                evicted.append(self._items.popitem(last=False)[0])
            return evicted

    def get(self, name: str) -> StoredAdapter:
        """The adapter called `name` (now the most recently used)."""
        with self._lock:
            if name not in self._items:
                have = ", ".join(self._items) or "none"
                raise UnknownAdapter(f"no adapter named {name!r} (loaded: {have})")
            self._items.move_to_end(name)
            return self._items[name]

    def drop(self, name: str) -> StoredAdapter:
        with self._lock:
            if name not in self._items:
                raise UnknownAdapter(f"no adapter named {name!r} to drop")
            return self._items.pop(name)

    def items(self) -> list[StoredAdapter]:
        """Least recently used first (the next to be evicted)."""
        with self._lock:
            return list(self._items.values())

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def check_adapter_name(name: str) -> str:
    """Adapter names appear in URLs and commands: letters, digits and ._- only."""
    ok = isinstance(name, str) and 0 < len(name) <= 64
    ok = ok and all(c.isalnum() or c in "._-" for c in name) and not name.startswith(".")
    if not ok:
        raise InputError(
            f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (not starting "
            "with '.')"
        )
    return name


# ----------------------------------------------------------------------------- requests
@dataclasses.dataclass
class ChatRequest:
    """One chat turn to answer. `messages`: a user message, or [{"role", "content"}, ...];
    `adapters`: names in the session's store (composed by rank concatenation, in order), or
    StoredAdapters; `context`: a document put into the prompt before the last user message."""

    messages: str | list[dict]
    adapters: Sequence[str | StoredAdapter] = ()
    context: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()


@dataclasses.dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (a stop token or string) or "length"
    adapters: tuple[str, ...]
    token_ids: tuple[int, ...] = ()  # the generated ids, a stop token included


@dataclasses.dataclass
class Prepared:
    """A checked request: its prompt ids and its composed adapter (scale 1, or None)."""

    request: ChatRequest
    ids: list[int]
    adapter: Adapter | None
    adapter_names: tuple[str, ...]

    @property
    def sampling(self) -> tuple:
        """Requests batch together only with equal sampling settings (greedy: any seed)."""
        r = self.request
        if r.temperature == 0:
            return (0.0, 1.0, 0)
        return (float(r.temperature), float(r.top_p), int(r.seed))


def normalize_messages(messages: str | list[dict]) -> list[dict[str, str]]:
    """A user message string or OpenAI-style messages (content a string or a list of text
    parts) -> [{"role", "content"}] with string contents; InputError naming what is wrong."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise InputError(f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for p in content:
                if not (isinstance(p, dict) and p.get("type") == "text"):
                    raise InputError(f"messages[{i}].content: only text parts are supported")
                if not isinstance(p.get("text"), str):
                    raise InputError(f"messages[{i}].content: a text part needs a 'text' string")
                parts.append(p["text"])
            content = "\n".join(parts)
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise InputError("the last message must be the user's (role 'user')")
    if not out[-1]["content"].strip():
        raise InputError("the user message is empty")
    return out


# ----------------------------------------------------------------------------- base model choice
def base_model_for(adapter_dirs: Iterable[str | Path], model: str | None = None) -> str:
    """The base model to load: `model` if given, else the one the adapters' metadata names
    (all must agree: by fingerprint when recorded, else by name), else the embedded default."""
    if model:
        return str(model)
    named: list[tuple[str, str | None, str]] = []  # (base model, fingerprint, adapter folder)
    for d in adapter_dirs:
        meta = read_adapter_meta(d)
        if meta.get("base_model"):
            named.append((str(meta["base_model"]), meta.get("base_fingerprint"), str(d)))
    if not named:
        return DEFAULT_MODEL
    first, fp, where = named[0]
    for other, ofp, owhere in named[1:]:
        same = (
            ofp == fp
            if (fp and ofp)
            else canonical_model_name(other) == canonical_model_name(first)
        )
        if not same:
            raise InputError(
                f"the adapters name different base models: {where} is for {first!r}, {owhere} "
                f"for {other!r}; use adapters made for one base model (or pass --model)"
            )
    return first


# ----------------------------------------------------------------------------- the session
class Session:
    """One base model + named adapters + lazily loaded hypernetworks; see the module docstring.

    model: what load_base takes (a known name, a folder, a .gguf, a hub id); None = the embedded
    default. d2l / t2l: hypernetwork checkpoints (default: the shipped SmolLM2 ones), loaded on
    first use. log: called with one-line progress messages (loads, evictions).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "float32",
        d2l: str | Path | None = None,
        t2l: str | Path | None = None,
        t2l_encoder: str | Path | None = None,
        max_adapters: int = 16,
        max_batch: int = 8,
        chunk_size: int | None = None,
        chat_template: bool = True,
        allow_other_base: bool = False,
        log: Callable[[str], None] | None = None,
        base: Base | None = None,
        precision: str | None = None,
    ):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        # A named policy (hyperlora_jax.precision) overrides dtype: its compute dtype for
        # generation and internalize, its param dtype for the loaded weights.
        self.precision = None if precision is None else get_precision(precision, "generate")
        self._d2l_precision = precision  # "auto" resolves per path: internalize has its own
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.model_name = str(model or DEFAULT_MODEL)
        self.dtype = DTYPES[dtype] if self.precision is None else self.precision.compute
        param_dtype = self.dtype if self.precision is None else self.precision.params
        self.base = base if base is not None else load_base(self.model_name, dtype=param_dtype)
        self.config, self.params, self.tokenizer = self.base[0], self.base[1], self.base[2]
        self.fingerprint = base_fingerprint(self.config, self.params)
        self.store = AdapterStore(max_adapters)
        self.max_batch = max_batch
        self.chunk_size = chunk_size
        self.use_template = chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        self.allow_other_base = allow_other_base
        self.d2l_path = Path(d2l) if d2l else EMBEDDED_D2L
        self.t2l_path = Path(t2l) if t2l else EMBEDDED_T2L
        self.t2l_encoder = t2l_encoder
        self.log = log or (lambda msg: None)
        self._d2l = None
        self._t2l = None
        self._hyper_lock = threading.Lock()
        self._tok_lock = threading.Lock()  # HF fast tokenizers refuse concurrent use
        self._stop_ids = stop_token_ids(self.tokenizer, self.config.eos_token_id)
        self.shapes: set[tuple] = set()
        pads = (self.config.pad_token_id, getattr(self.tokenizer, "pad_token_id", None), 0)
        self._pad_id = int(next(p for p in pads if p is not None))  # as decoding.generate picks

    # -- hypernetworks (loaded on first use)
    @property
    def window(self) -> int:
        return int(self.config.max_position_embeddings)

    def _timed(self, what: str, fn):
        t0 = time.perf_counter()
        out = fn()
        self.log(f"loaded {what} ({time.perf_counter() - t0:.1f} s)")
        return out

    def d2l(self):
        """The Doc-to-LoRA hypernetwork bound to this session's base model."""
        with self._hyper_lock:
            if self._d2l is None:
                self._d2l = self._timed(
                    f"D2L hypernetwork {self.d2l_path}",
                    lambda: load_d2l(
                        self.d2l_path,
                        base_model=(self.config, self.params),
                        # its own tokenizer: chat requests tokenize concurrently with internalize
                        tokenizer=load_tokenizer(self.base.path),
                        dtype=self.dtype,
                        precision=self._d2l_precision,
                        allow_other_base=self.allow_other_base,
                    ),
                )
            return self._d2l

    def t2l(self) -> TextToLoRA:
        """The Text-to-LoRA hypernetwork, checked against this session's base model."""
        with self._hyper_lock:
            if self._t2l is None:
                self._t2l = self._timed(
                    f"T2L hypernetwork {self.t2l_path}",
                    lambda: TextToLoRA.from_checkpoint(
                        self.t2l_path,
                        encoder=self.t2l_encoder,
                        base_model=self.base.path,
                        allow_other_base=self.allow_other_base,
                    ),
                )
            return self._t2l

    # -- adapters
    def _add(self, item: StoredAdapter) -> StoredAdapter:
        for name in self.store.put(item):
            self.log(f"evicted adapter {name!r} (least recently used; --max-adapters)")
        return item

    def _meta(self, source: dict) -> dict:
        """What session-made adapters record: a model folder as an absolute path (usable from
        any folder), a known name or hub id as given."""
        p = Path(self.model_name).expanduser()
        return {
            "base_model": str(p.resolve()) if p.exists() else self.model_name,
            "base_fingerprint": self.fingerprint,
            "source": source,
        }

    def internalize(self, document: str, name: str, chunk_size: int | None = None):
        """Doc-to-LoRA: `document` -> the adapter `name` (replacing one of that name)."""
        check_adapter_name(name)
        if not isinstance(document, str) or not document.strip():
            raise InputError("the document is empty; give it some text")
        d2l = self.d2l()
        size = chunk_size or self.chunk_size or trained_chunk_size(d2l.meta)
        adapter = d2l.internalize(document, size)
        meta = self._meta(
            {
                "kind": "doc-to-lora",
                "hypernet": str(self.d2l_path),
                "document": document[:200],
                "chunk_size": size,
            }
        )
        return self._add(StoredAdapter(name, adapter, "document", meta))

    def generate_adapter(self, description: str, name: str) -> StoredAdapter:
        """Text-to-LoRA: a task description -> the adapter `name`."""
        check_adapter_name(name)
        if not isinstance(description, str) or not description.strip():
            raise InputError("the task description is empty")
        t2l = self.t2l()
        adapter = ad.validate(ad.unstack(t2l.generate([description.strip()]))[0], self.config)
        meta = self._meta(
            {"kind": "t2l", "hypernet": str(self.t2l_path), "task": description.strip()}
        )
        return self._add(StoredAdapter(name, adapter, "task", meta))

    def load_adapter(self, folder: str | Path, name: str | None = None) -> StoredAdapter:
        """An adapter folder (save_adapter format) -> the adapter `name` (default: the folder's
        name); refused when it records another base model's fingerprint."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"no adapter folder at {folder}")
        name = check_adapter_name(name or folder.name)
        meta = read_adapter_meta(folder)
        check_fingerprint(
            meta,
            self.fingerprint,
            self.model_name,
            f"the adapter {folder}",
            allow_other_base=self.allow_other_base,
        )
        adapter = load_adapter(folder)
        if adapter.batch_shape:
            raise InputError(
                f"{folder} holds a batch of {adapter.batch_shape[0]} adapters; chat applies one "
                "adapter per name (save them one per folder)"
            )
        try:
            ad.validate(adapter, self.config)
        except InputError as e:
            raise CheckpointError(f"{folder}: {e}") from e
        meta = {**meta, "source": {**(meta.get("source") or {}), "path": str(folder)}}
        return self._add(StoredAdapter(name, adapter, "folder", meta))

    def save_adapter(self, name: str, folder: str | Path, *, overwrite: bool | None = None) -> Path:
        """Write the adapter `name` to `folder`; overwrite=None replaces only an adapter folder
        (one holding adapter.json), never another non-empty folder."""
        item = self.store.get(name)
        if overwrite is None:
            overwrite = (Path(folder) / "adapter.json").is_file()
        texts = {"task_desc.txt": item.meta["source"]["task"]} if item.kind == "task" else None
        return save_adapter(item.adapter, folder, item.meta, overwrite=overwrite, texts=texts)

    def drop(self, name: str) -> StoredAdapter:
        return self.store.drop(name)

    def adapters(self) -> list[StoredAdapter]:
        return self.store.items()

    def resolve(self, names: Sequence[str | StoredAdapter]) -> tuple[StoredAdapter, ...]:
        """Names -> stored adapters (UnknownAdapter for a missing one); duplicates refused."""
        out = tuple(n if isinstance(n, StoredAdapter) else self.store.get(n) for n in names)
        seen = [a.name for a in out]
        if len(set(seen)) != len(seen):
            raise InputError(f"an adapter is named twice in {seen}")
        return out

    # -- chat
    def prompt_ids(self, messages: str | list[dict], context: str | None = None) -> list[int]:
        """Token ids of the conversation (the tokenizer's chat template, else plain text), the
        context document (if any) put before the last user message."""
        msgs = normalize_messages(messages)
        if context is not None:
            if not context.strip():
                raise InputError("the context document is empty")
            msgs[-1] = {
                "role": "user",
                "content": full_context_prompt(context, msgs[-1]["content"]),
            }
        if self.use_template:
            return apply_chat(self.tokenizer, msgs)
        text = "\n\n".join(m["content"] for m in msgs)
        return list(self.tokenizer(text)["input_ids"])

    def prepare(self, request: ChatRequest) -> Prepared:
        """Check a request and tokenize it; raises InputError (UnknownAdapter) naming the fault."""
        r = request
        if isinstance(r.max_new_tokens, bool) or not isinstance(r.max_new_tokens, int):
            raise InputError(f"max_tokens must be an integer, got {r.max_new_tokens!r}")
        if r.max_new_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {r.max_new_tokens}")
        if not (isinstance(r.temperature, int | float) and 0 <= r.temperature <= 100):
            raise InputError(f"temperature must be a number in [0, 100], got {r.temperature!r}")
        if not (isinstance(r.top_p, int | float) and 0 < r.top_p <= 1):
            raise InputError(f"top_p must be a number in (0, 1], got {r.top_p!r}")
        stored = self.resolve(r.adapters)
        with self._tok_lock:
            ids = self.prompt_ids(r.messages, r.context)
        if len(ids) + r.max_new_tokens > self.window:
            raise InputError(
                f"the prompt has {len(ids):,} tokens and max_tokens is {r.max_new_tokens:,}: "
                f"over the model's window of {self.window:,} tokens; shorten the prompt or ask "
                "for fewer tokens"
            )
        adapter = None
        if stored:
            parts = [s.unit for s in stored]
            adapter = parts[0] if len(parts) == 1 else ad.concat(parts)
        return Prepared(r, ids, adapter, tuple(s.name for s in stored))

    def answer(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Answers in order; requests run in batches of up to max_batch with equal sampling
        settings, each batch one generation with per-example adapters."""
        prepared = [self.prepare(r) for r in requests]
        return self.run(prepared)

    def run(self, prepared: Sequence[Prepared]) -> list[ChatResult]:
        results: list[ChatResult | None] = [None] * len(prepared)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(p.sampling, []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.max_batch):
                part = idx[s : s + self.max_batch]
                for i, res in zip(part, self.run_batch([prepared[i] for i in part])):
                    results[i] = res
        return results  # type: ignore[return-value]

    def batch_adapter(self, prepared: Sequence[Prepared], size: int) -> Adapter | None:
        """The batch's adapters stacked [size, L, R, d], zero rows for requests without adapters
        and for filler rows; None when no request has one and the store is empty (the base
        model exactly, as a one-off chat). The modules are those of every stored adapter and the
        rank a power of two, so batches of a running server share a few compiled programs."""
        own = [p.adapter for p in prepared]
        stored = self.store.items()
        if all(a is None for a in own) and not stored:
            return None
        present = [a for a in own if a is not None] + [s.adapter for s in stored]
        modules = sorted({m for a in present for m in a.modules})
        ranks = [a.rank for a in own if a is not None]
        rank = _pow2(max(ranks, default=1), MIN_RANK_BUCKET)
        zero = ad.zeros(self.config, modules, rank)
        rows = [zero if a is None else ad.pad_rank(a, rank) for a in own]
        rows += [zero] * (size - len(rows))
        return ad.stack(rows)

    def run_batch(self, prepared: Sequence[Prepared]) -> list[ChatResult]:
        """One generation for requests with the same sampling settings."""
        if not prepared:
            return []
        if len({p.sampling for p in prepared}) != 1:
            raise InputError("one batch needs equal sampling settings (temperature, top_p, seed)")
        n = len(prepared)
        size = _pow2(n)
        longest = max(len(p.ids) for p in prepared)
        want = max(p.request.max_new_tokens for p in prepared)
        # rows are cut to their own max_tokens: the tokens a bucket adds are never returned
        new = -(-want // NEW_TOKENS_BUCKET) * NEW_TOKENS_BUCKET
        prompts = [p.ids for p in prepared] + [prepared[0].ids] * (size - n)
        temperature, top_p, seed = prepared[0].sampling
        adapter = self.batch_adapter(prepared, size)
        t_bucket = _pow2(longest, MIN_PROMPT_BUCKET)
        shape = (size, t_bucket, new, None if adapter is None else (adapter.rank, adapter.modules))
        self.shapes.add(shape)  # distinct generation programs so far (each compiled once)
        out = generate(
            self.params,
            self.config,
            prompts,
            max_new_tokens=new,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_ids=self._stop_ids,
            pad_id=self._pad_id,
            adapter=adapter,
            pad_to_multiple=t_bucket,
            # a policy may decode in another dtype than the prompt's (bf16-prefill)
            **({"precision": self.precision} if self.precision else {"dtype": self.dtype}),
        )
        stops = np.asarray(self._stop_ids or (-1,))
        results = []
        for i, p in enumerate(prepared):
            row = out.tokens[i, : p.request.max_new_tokens]
            hit = np.isin(row, stops)
            k = int(hit.argmax()) + 1 if hit.any() else len(row)
            with self._tok_lock:
                text = self.tokenizer.decode(row[:k].tolist(), skip_special_tokens=True)
            reason = "stop" if hit.any() else "length"
            for s in p.request.stop or ():
                if s and s in text:
                    text, reason = text[: text.index(s)], "stop"
            ids = tuple(int(t) for t in row[:k])
            results.append(ChatResult(text, len(p.ids), k, reason, p.adapter_names, ids))
        return results
