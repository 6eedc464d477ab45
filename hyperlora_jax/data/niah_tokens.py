"""NIAH in token space: records built by concatenating token pieces, no tokenizer call per record.

A NIAH context is `SEP.join(blocks)` (filler blocks and one needle), wrapped in the chat turn;
the student sees [system '', QUERY, answer]. Under a pre-tokenizing BPE tokenizer such as
SmolLM2's (ChatML, byte-level) these tokenize piece by piece, so `NiahPieces.from_tokenizer`
derives, once: the chat header / trailer, a filler block followed by SEP and one ending the
context, the needle around its number (and the number's tokens for each of the 10,000 numbers,
stored per digit when they compose), the student ids around the answer with the label span, and
the special tokens `tokenizer(text)` adds. Piece boundaries are found from the tokenizer's own
output (the tokens every needle / student sequence shares before and after its number), and the
derivation fails with a CompositionError unless the composed ids equal the tokenizer's on the
needle of every number, every student sequence, a set of probe contexts (every needle position
of short haystacks, chat-templated and raw) and the block-count range of every requested bin.

The pieces serialise to a small JSON (`save` / `load`), with each bin's block-count range measured
on the raw context text as the official code does, so a machine without the tokenizer can build
the data (`hyperlora-jax data niah --pieces pieces.json --format tokens`). `generate_niah_tokens`
keeps `niah.generate_niah`'s semantics (the same draws from the same seeds: block counts, depth
bins, disjoint needle pools, every example's raw-text length checked against its bin, now composed
from the pieces) and writes the training split as token shards (`token_shards`), built by N worker
processes; the shards are the same bytes for any N. Val / test stay JSONL text for `eval d2l`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hyperlora_jax.data import niah, storage, token_shards
from hyperlora_jax.errors import ConfigError, InputError
from hyperlora_jax.models import chat

log = logging.getLogger(__name__)

PIECES_FORMAT = "hyperlora_jax.niah_pieces"
PIECES_VERSION = 1
MAGICS = tuple(f"{m:04d}" for m in range(10_000))
# The texts the pieces were derived from; a pieces file made for other texts is refused.
TEXTS = {
    "noise_block": niah.NOISE_BLOCK,
    "needle_template": niah.NEEDLE_TEMPLATE,
    "sep": niah.SEP,
    "query": niah.QUERY,
}
DEFAULT_SHARD_SIZE = 50_000
SPEC_COLUMNS = ("magic", "num_blocks", "insert_at", "depth_bin", "token_len")
# The NiahPieces fields that are plain token-id sequences (saved as lists in the JSON).
ID_FIELDS = (
    "ctx_prefix",
    "ctx_suffix",
    "raw_prefix",
    "raw_suffix",
    "filler",
    "filler_last",
    "needle_prefix",
    "needle_suffix",
    "needle_suffix_last",
    "query_prefix",
    "query_suffix",
)

Ids = tuple[int, ...]


class CompositionError(ConfigError):
    """The tokenizer does not tokenize NIAH texts piece by piece: token-space NIAH would not be
    exact for it (use the text path, `--format jsonl`)."""


def _common_split(seqs: Sequence[Sequence[int]], what: str) -> tuple[Ids, list[Ids], Ids]:
    """(shared prefix, the differing middles, shared suffix) of token sequences."""
    seqs = [tuple(s) for s in seqs]
    shortest = min(len(s) for s in seqs)
    pre = len(os.path.commonprefix(seqs))  # of the lexicographic min and max: done in C
    suf = min(len(os.path.commonprefix([s[::-1] for s in seqs])), shortest - pre)
    middles = [s[pre : len(s) - suf] for s in seqs]
    if not all(middles):
        raise CompositionError(f"some {what}s tokenize to the same ids as others")
    return seqs[0][:pre], middles, seqs[0][len(seqs[0]) - suf :]


def _per_digit(table: Sequence[Ids], digit_ids: Sequence[Ids]) -> bool:
    """True when every number's ids are its digits' ids concatenated (then 10 entries suffice)."""
    return all(
        ids == tuple(t for d in m for t in digit_ids[int(d)]) for m, ids in zip(MAGICS, table)
    )


def _digits(table: Sequence[Ids]) -> list[Ids]:
    """Candidate per-digit ids: those of "0000", "1111", ... cut in four (checked by _per_digit)."""
    out = []
    for d in range(10):
        ids = table[d * 1111]
        out.append(ids[: len(ids) // 4] if len(ids) % 4 == 0 else ids)
    return out


def _table_json(table: Sequence[Ids], digit_ids: Sequence[Ids]) -> dict:
    if _per_digit(table, digit_ids):
        return {"digits": [list(d) for d in digit_ids]}
    return {"numbers": [list(t) for t in table]}


def _table_from_json(obj: Any, what: str) -> tuple[Ids, ...]:
    if isinstance(obj, dict) and len(obj.get("digits") or ()) == 10:
        digits = [tuple(int(t) for t in d) for d in obj["digits"]]
        return tuple(tuple(t for d in m for t in digits[int(d)]) for m in MAGICS)
    if isinstance(obj, dict) and len(obj.get("numbers") or ()) == len(MAGICS):
        return tuple(tuple(int(t) for t in ids) for ids in obj["numbers"])
    raise ConfigError(f"pieces: {what} needs 10 'digits' or {len(MAGICS)} 'numbers' id lists")


@dataclass(frozen=True)
class NiahPieces:
    """Token pieces of NIAH contexts and student sequences under one tokenizer (module docs)."""

    tokenizer: str  # where the pieces came from (informational)
    vocab_size: int
    ctx_prefix: Ids  # chat header of a context turn (= the chunk affix prefix)
    ctx_suffix: Ids  # chat trailer (= the chunk affix suffix)
    raw_prefix: Ids  # special tokens tokenizer(text) puts before / after a raw context
    raw_suffix: Ids
    filler: Ids  # NOISE_BLOCK + SEP: a filler block another block follows
    filler_last: Ids  # NOISE_BLOCK ending the context
    needle_prefix: Ids  # the needle sentence before its number
    needle_suffix: Ids  # ... after its number, another block following (". " + SEP)
    needle_suffix_last: Ids  # ... after its number, ending the context
    number_ids: tuple[Ids, ...]  # the number's ids inside the needle, per magic number 0..9999
    query_prefix: Ids  # student ids before the answer
    query_suffix: Ids  # student ids after the answer
    answer_ids: tuple[Ids, ...]  # the answer's ids, per magic number
    suffix_labels: int  # leading query_suffix tokens that are supervised (the end of turn)
    block_ranges: dict[tuple[int, int], tuple[int, int]]  # measured on raw text, per token bin

    # ------------------------------------------------------------------ derivation
    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, bins: Sequence[tuple[int, int]] = ((32, 128), (128, 256))
    ) -> NiahPieces:
        """Derive the pieces (seconds) and prove them exact, or raise CompositionError."""
        from hyperlora_jax.data import selfgen  # imports jax: only the parent derives pieces

        def enc(texts: list[str]) -> list[Ids]:
            return [tuple(x) for x in chat.encode_batch(tokenizer, texts)]

        ctx_prefix, ctx_suffix = (tuple(x) for x in chat.ctx_affixes(tokenizer))
        filler, filler_last = enc([niah.NOISE_BLOCK + niah.SEP, niah.NOISE_BLOCK])
        needles = [niah.NEEDLE_TEMPLATE.format(magic_number=m) for m in MAGICS]
        pre, numbers, suf = _common_split(enc([n + niah.SEP for n in needles]), "needle")
        pre_last, numbers_last, suf_last = _common_split(enc(needles), "needle")
        if (pre, numbers) != (pre_last, numbers_last):
            raise CompositionError(
                "the needle's number tokenizes differently before a separator than at the end"
            )
        raw = tuple(tokenizer(niah.NOISE_BLOCK)["input_ids"])
        at = next((i for i in range(len(raw)) if raw[i : i + len(filler_last)] == filler_last), -1)
        if at < 0:
            raise CompositionError("tokenizer(text) does not contain the text's own ids")
        raw_prefix, raw_suffix = raw[:at], raw[at + len(filler_last) :]

        pieces = cls(
            tokenizer=str(getattr(tokenizer, "name_or_path", "") or ""),
            vocab_size=len(tokenizer),
            ctx_prefix=ctx_prefix,
            ctx_suffix=ctx_suffix,
            raw_prefix=raw_prefix,
            raw_suffix=raw_suffix,
            filler=filler,
            filler_last=filler_last,
            needle_prefix=pre,
            needle_suffix=suf,
            needle_suffix_last=suf_last,
            number_ids=tuple(numbers),
            query_prefix=(),  # the student side follows, once the contexts compose
            query_suffix=(),
            answer_ids=(),
            suffix_labels=0,
            block_ranges={},
        )
        pieces.check_contexts(tokenizer)
        qas = selfgen.qa_ids_and_labels_batch(tokenizer, [niah.QUERY] * len(MAGICS), MAGICS)
        q_pre, answers, q_suf = _common_split([ids for ids, _ in qas], "answer")
        n_labeled = sum(y != -100 for y in qas[0][1]) - len(answers[0])
        for (_, labels), ans in zip(qas, answers):
            want = [-100] * len(q_pre) + list(ans) + list(q_suf[:n_labeled])
            want += [-100] * (len(q_suf) - n_labeled)
            if n_labeled < 0 or list(labels) != want:
                raise CompositionError("the student labels are not the answer + end of turn")
        pieces = dataclasses.replace(
            pieces,
            query_prefix=q_pre,
            query_suffix=q_suf,
            answer_ids=tuple(answers),
            suffix_labels=n_labeled,
        )
        measured = niah.block_ranges(niah.LengthFn(tokenizer), bins)  # the official measurement
        composed = niah.block_ranges_of(pieces.reference_length, bins)
        if measured != composed:
            raise CompositionError(
                f"block-count ranges from the pieces {composed} differ from the tokenizer's "
                f"{measured}"
            )
        return dataclasses.replace(pieces, block_ranges=measured)

    def check_contexts(self, tokenizer: Any) -> None:
        """Composed chat and raw ids == the tokenizer's on probe contexts: every needle position
        of haystacks of 1-5 blocks and some of a 40-block one, several numbers."""

        probes = [
            (k, i, m) for k in (1, 2, 3, 5) for i in range(k) for m in ("0000", "9999", "4096")
        ]
        probes += [(40, i, "1357") for i in (0, 1, 20, 38, 39)]
        texts = [niah.build_context(*p) for p in probes]
        chat_ids = chat.tokenize_ctx_texts(texts, tokenizer)
        raw_ids = tokenizer(texts)["input_ids"]
        for p, want_chat, want_raw in zip(probes, chat_ids, raw_ids):
            if self.context_ids(*p).tolist() != list(want_chat):
                raise CompositionError(
                    f"NIAH context (blocks, needle at, number) = {p} does not tokenize as the "
                    "concatenation of its pieces"
                )
            if self.raw_ids(*p).tolist() != list(want_raw):
                raise CompositionError(f"the raw NIAH context {p} does not tokenize piecewise")

    # ------------------------------------------------------------------ lengths and ids
    def content_length(self, num_blocks: int, insert_at: int, magic: str) -> int:
        """Tokens of the context text itself (no chat turn, no special tokens)."""
        needle = len(self.needle_prefix) + len(self.number_ids[int(magic)])
        if insert_at == num_blocks - 1:
            return (num_blocks - 1) * len(self.filler) + needle + len(self.needle_suffix_last)
        return (
            (num_blocks - 2) * len(self.filler)
            + len(self.filler_last)
            + needle
            + len(self.needle_suffix)
        )

    def raw_length(self, num_blocks: int, insert_at: int, magic: str) -> int:
        """len(tokenizer(context).input_ids), the length NIAH bins are measured in."""
        return (
            len(self.raw_prefix)
            + self.content_length(num_blocks, insert_at, magic)
            + len(self.raw_suffix)
        )

    def reference_length(self, num_blocks: int) -> int:
        """Raw length of `niah.block_ranges`' reference context (needle "0000" last)."""
        return self.raw_length(num_blocks, num_blocks - 1, "0000")

    @functools.cached_property
    def _arrays(self) -> dict[str, Any]:
        a = lambda ids: np.asarray(ids, np.int32)  # noqa: E731
        return {
            "ctx_prefix": a(self.ctx_prefix),
            "ctx_suffix": a(self.ctx_suffix),
            "raw_prefix": a(self.raw_prefix),
            "raw_suffix": a(self.raw_suffix),
            "filler_last": a(self.filler_last),
            "needle_prefix": a(self.needle_prefix),
            "needle_suffix": a(self.needle_suffix),
            "needle_suffix_last": a(self.needle_suffix_last),
            "numbers": [a(x) for x in self.number_ids],
            "fillers": a(self.filler * 64),  # grown on demand by _fillers
        }

    def _fillers(self, n: int) -> np.ndarray:
        """n filler blocks (each followed by SEP) as one array."""
        run = self._arrays["fillers"]
        need = n * len(self.filler)
        if need > len(run):
            run = self._arrays["fillers"] = np.tile(np.asarray(self.filler, np.int32), 2 * n)
        return run[:need]

    def _content_parts(self, num_blocks: int, insert_at: int, magic: str) -> list[np.ndarray]:
        if not 0 <= insert_at < num_blocks:
            raise InputError(f"needle index {insert_at} outside {num_blocks} blocks")
        a = self._arrays
        last = insert_at == num_blocks - 1
        parts = [
            self._fillers(insert_at),
            a["needle_prefix"],
            a["numbers"][int(magic)],
            a["needle_suffix_last" if last else "needle_suffix"],
        ]
        if not last:
            parts += [self._fillers(num_blocks - 2 - insert_at), a["filler_last"]]
        return parts

    def context_ids(self, num_blocks: int, insert_at: int, magic: str) -> np.ndarray:
        """The chat-templated context ids (`chat.tokenize_ctx_text` of the context)."""
        a = self._arrays
        parts = self._content_parts(num_blocks, insert_at, magic)
        return np.concatenate([a["ctx_prefix"], *parts, a["ctx_suffix"]])

    def raw_ids(self, num_blocks: int, insert_at: int, magic: str) -> np.ndarray:
        """`tokenizer(context).input_ids` (special tokens included)."""
        a = self._arrays
        parts = self._content_parts(num_blocks, insert_at, magic)
        return np.concatenate([a["raw_prefix"], *parts, a["raw_suffix"]])

    @functools.cached_property
    def _qa_table(self) -> list[tuple[np.ndarray, tuple[int, int]]]:
        start = len(self.query_prefix)
        return [
            (
                np.asarray(self.query_prefix + ans + self.query_suffix, np.int32),
                (start, start + len(ans) + self.suffix_labels),
            )
            for ans in self.answer_ids
        ]

    def qa(self, magic: str) -> tuple[np.ndarray, tuple[int, int]]:
        """The student's input ids and supervised span (`selfgen.qa_ids_and_labels` of
        (QUERY, magic): labels = ids inside the span, -100 outside)."""
        return self._qa_table[int(magic)]

    def ranges(self, bins: Sequence[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, int]]:
        """Block-count range per bin: the stored (measured) one, else composed from the pieces
        (exact: the derivation proved the composed lengths equal the tokenizer's)."""
        missing = [b for b in bins if tuple(b) not in self.block_ranges]
        composed = niah.block_ranges_of(self.reference_length, missing) if missing else {}
        if missing:
            log.info("block counts of bins %s composed from the pieces (not stored)", missing)
        return {tuple(b): self.block_ranges.get(tuple(b)) or composed[tuple(b)] for b in bins}

    # ------------------------------------------------------------------ JSON
    def __getstate__(self) -> dict:  # worker processes get the pieces, not the cached arrays
        return {k: v for k, v in self.__dict__.items() if k not in ("_arrays", "_qa_table")}

    def to_json(self) -> dict:
        return {
            "format": PIECES_FORMAT,
            "version": PIECES_VERSION,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "texts": TEXTS,
            **{k: list(getattr(self, k)) for k in ID_FIELDS},
            "numbers": _table_json(self.number_ids, _digits(self.number_ids)),
            "answers": _table_json(self.answer_ids, _digits(self.answer_ids)),
            "suffix_labels": self.suffix_labels,
            "block_ranges": [[lo, hi, *r] for (lo, hi), r in sorted(self.block_ranges.items())],
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), separators=(",", ":")) + "\n")
        return path

    @classmethod
    def from_json(cls, obj: dict, where: str = "pieces") -> NiahPieces:
        if not isinstance(obj, dict) or obj.get("format") != PIECES_FORMAT:
            raise ConfigError(f"{where}: not a NIAH pieces file (format {PIECES_FORMAT!r})")
        if obj.get("version") != PIECES_VERSION:
            raise ConfigError(f"{where}: pieces version {obj.get('version')}, expected 1")
        if obj.get("texts") != TEXTS:
            raise ConfigError(f"{where}: made for other NIAH texts than this version's")
        try:
            ids = {k: tuple(int(t) for t in obj[k]) for k in ID_FIELDS}
            ranges = {(int(lo), int(hi)): (int(a), int(b)) for lo, hi, a, b in obj["block_ranges"]}
            pieces = cls(
                tokenizer=str(obj.get("tokenizer", "")),
                vocab_size=int(obj["vocab_size"]),
                number_ids=_table_from_json(obj["numbers"], "numbers"),
                answer_ids=_table_from_json(obj["answers"], "answers"),
                suffix_labels=int(obj["suffix_labels"]),
                block_ranges=ranges,
                **ids,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: malformed NIAH pieces ({type(e).__name__}: {e})") from e
        if not pieces.filler or not pieces.filler_last:
            raise ConfigError(f"{where}: empty filler pieces")
        composed = niah.block_ranges_of(pieces.reference_length, list(ranges))
        if composed != ranges:
            raise ConfigError(f"{where}: its block ranges do not match its own pieces")
        return pieces

    @classmethod
    def load(cls, path: str | os.PathLike) -> NiahPieces:
        try:
            obj = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read NIAH pieces {path}: {e}") from e
        return cls.from_json(obj, str(path))


# ----------------------------------------------------------------------------- shards
def shard_arrays(pieces: NiahPieces, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One shard's arrays from drawn examples (SPEC_COLUMNS, one value per record)."""
    builder = token_shards.ShardBuilder(pieces.vocab_size)
    for magic, k, at in zip(*(columns[c].tolist() for c in ("magic", "num_blocks", "insert_at"))):
        m = MAGICS[magic]
        builder.add(pieces.context_ids(k, at, m), [pieces.qa(m)])
    out = builder.arrays()
    out.update({f"rec_{c}": np.asarray(columns[c], np.int32) for c in SPEC_COLUMNS})
    return out


def _write_shard(pieces: NiahPieces, path: str, columns: dict, meta: dict, compress: bool) -> int:
    return token_shards.write_shard(path, shard_arrays(pieces, columns), meta, compress)


_WORKER_PIECES: NiahPieces | None = None


def _init_worker(pieces: NiahPieces) -> None:
    global _WORKER_PIECES
    _WORKER_PIECES = pieces


def _worker_write(path: str, columns: dict, meta: dict, compress: bool) -> int:
    return _write_shard(_WORKER_PIECES, path, columns, meta, compress)


def spec_columns(specs: Sequence[niah.NiahSpec]) -> dict[str, np.ndarray]:
    """Drawn examples as int32 columns (SPEC_COLUMNS), what a shard worker receives."""
    cols = {
        c: np.fromiter((getattr(s, c) for s in specs), np.int32, len(specs))
        for c in SPEC_COLUMNS[1:]
    }
    cols["magic"] = np.fromiter((int(s.magic) for s in specs), np.int32, len(specs))
    return cols


def generate_niah_tokens(
    pieces: NiahPieces,
    out_dir: str | os.PathLike,
    *,
    bins: Sequence[tuple[int, int]] = ((32, 128), (128, 256)),
    n_train: int = 320_000,
    n_val: int = 1000,
    n_test: int = 1000,
    train_max_hi: int = 1024,
    seed: int = 42,
    prefix: str = "ctx_magic_number",
    workers: int = 1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    compress: bool = True,
) -> dict[str, dict[str, int]]:
    """`niah.generate_niah` in token space: `{out_dir}/{prefix}_{lo}_{hi}/train/shard-*.npz`
    (token shards) and `.../{val,test}.jsonl` (text, for `eval d2l --niah`), plus the pieces as
    `{out_dir}/niah_pieces.json`. Same examples as the text path for the same seed; the draws
    run in this process (they are sequential in the seeded rng), the shards in `workers`
    processes."""
    if workers < 1 or shard_size < 1:
        raise ConfigError(f"workers ({workers}) and shard_size ({shard_size}) must be >= 1")
    out = Path(out_dir)
    pools = niah.needle_pools(seed)
    jobs = niah.split_jobs(
        pieces.ranges(bins),
        bins,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        train_max_hi=train_max_hi,
        prefix=prefix,
    )
    base_meta = {
        "source": "niah",
        "seed": seed,
        "tokenizer": pieces.tokenizer,
        "vocab_size": pieces.vocab_size,
        "ctx_prefix": list(pieces.ctx_prefix),
        "ctx_suffix": list(pieces.ctx_suffix),
    }
    pool = None
    if workers > 1:
        # spawn: no fork of a process whose tokenizer / XLA threads already run; an executor (not
        # a Pool) so a worker that dies fails the run instead of hanging it
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(pieces,),
        )
    summary: dict[str, dict[str, int]] = {}
    pending = []
    try:
        for job in jobs:
            needles = pools[job.split]
            specs = niah.draw_split(
                job.count, job.k_values, needles, job.rng(seed), pieces.raw_length, job.token_bin
            )
            summary.setdefault(job.name, {})[job.split] = len(specs)
            if job.split != "train":
                recs = [
                    niah.spec_example(s).to_record() | {"token_bin": list(job.token_bin)}
                    for s in specs
                ]
                storage.write_records(out / job.name / f"{job.split}.jsonl", recs)
                continue
            folder = out / job.name / job.split
            token_shards.clear_shards(folder)
            cols = spec_columns(specs)
            n_shards = math.ceil(len(specs) / shard_size)
            for s in range(n_shards):
                lo = s * shard_size
                part = {c: v[lo : lo + shard_size] for c, v in cols.items()}
                meta = base_meta | {
                    "token_bin": list(job.token_bin),
                    "split": job.split,
                    "shard": s,
                    "num_shards": n_shards,
                    "first_record": lo,
                }
                args = (str(folder / token_shards.shard_name(s, n_shards)), part, meta, compress)
                if pool is None:
                    _write_shard(pieces, *args)
                else:
                    pending.append(pool.submit(_worker_write, *args))
            log.info(
                "NIAH %s %s: %d examples in %d shard(s)", job.name, job.split, len(specs), n_shards
            )
        for p in pending:
            p.result()
    except BrokenProcessPool as e:
        raise InputError(
            "a NIAH shard worker died; with --workers > 1 call generate_niah_tokens from a "
            "`if __name__ == '__main__':` block (worker processes re-import the main module)"
        ) from e
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    pieces.save(out / "niah_pieces.json")
    return summary
