"""Token shards: D2L training records stored as token arrays, and the D2L items read from them.

A record is one context's chat-templated ids plus its QAs (student input_ids and the span of
them that is supervised: labels = input_ids inside [start, end), -100 outside, as
`packing.labels_from_span` builds them). Records are written in shards of a fixed number of
records, `shard-00000-of-00004.npz` (a zip of .npy arrays, no pickle; deflated by default, which
makes NIAH shards ~19x smaller: its haystacks repeat one filler block), holding

    meta           uint8 [*]       JSON: format, version, record/QA counts, vocab_size, ctx_prefix /
                                   ctx_suffix (the chunk affixes), what the records are
    ctx_ids        uint16|int32    every context's ids, concatenated (uint16 when the vocab fits)
    ctx_offsets    int32|int64     [records + 1]: record r's context is ctx_ids[o[r]:o[r+1]]
    qa_offsets     int32|int64     [records + 1]: record r's QAs are qa_offsets[r] .. [r+1] - 1
    input_ids      uint16|int32    every QA's student ids, concatenated
    input_offsets  int32|int64     [QAs + 1]
    label_spans    int32 [QAs, 2]  supervised [start, end) within each QA's input_ids
    rec_<name>     int32 [records] optional per-record columns (NIAH: magic, num_blocks, ...)

Shards are written in a fixed layout (zip entries without timestamps), so the same records give
the same bytes. `train --data` reads a shard file or every `*.npz` under a folder
(`find_shards`); `ShardItems` keeps only numpy arrays (tokens, offsets, item sizes) and builds
each D2L item when a packed row is read, with the chunk counts the text path would draw.
"""

from __future__ import annotations

import array
import glob
import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hyperlora_jax.data import packing
from hyperlora_jax.errors import InputError
from hyperlora_jax.models.chat import ctx_affixes, slice_into_chunks
from hyperlora_jax.paths import Path, files_under, is_remote

log = logging.getLogger(__name__)

FORMAT = "hyperlora_jax.d2l_tokens"
VERSION = 1
ARRAYS = ("ctx_ids", "ctx_offsets", "qa_offsets", "input_ids", "input_offsets", "label_spans")
SHARD_NAME = re.compile(r"shard-(\d{5})-of-(\d{5})\.npz$")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry time: identical records give identical bytes


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.npz"


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (SmolLM2: 49,152 ids), else int32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def _offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out.astype(np.int32) if out[-1] < 2**31 else out


def label_span(input_ids: Sequence[int], labels: Sequence[int]) -> tuple[int, int]:
    """(start, end) such that labels == packing.labels_from_span(input_ids, start, end)."""
    pos = [i for i, y in enumerate(labels) if y != packing.IGNORE_INDEX]
    span = (pos[0], pos[-1] + 1) if pos else (0, 0)
    if list(labels) != packing.labels_from_span(input_ids, *span):
        raise InputError("labels are not one contiguous span of the input ids; cannot store them")
    return span


# ----------------------------------------------------------------------------- writing
class ShardBuilder:
    """Collects records (context ids, QAs as (input_ids, (start, end))) into one shard's arrays."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.dtype = ids_dtype(vocab_size)
        self._ctx: list[np.ndarray] = []
        self._inputs: list[np.ndarray] = []
        self._n_qas: list[int] = []
        self._spans: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self._ctx)

    def add(
        self,
        ctx_ids: Sequence[int] | np.ndarray,
        qas: Sequence[tuple[Sequence[int] | np.ndarray, tuple[int, int]]],
    ) -> None:
        if len(ctx_ids) == 0:
            raise InputError("a record has an empty context")
        self._ctx.append(np.asarray(ctx_ids))
        for ids, (s, e) in qas:
            if not 0 <= s <= e <= len(ids):
                raise InputError(f"label span ({s}, {e}) outside a QA of {len(ids)} tokens")
            self._inputs.append(np.asarray(ids))
            self._spans.append((s, e))
        self._n_qas.append(len(qas))

    def arrays(self) -> dict[str, np.ndarray]:
        """The shard's arrays (module docstring); add `rec_<name>` columns to it as needed."""

        def flat(parts: list[np.ndarray]) -> np.ndarray:
            if not parts:
                return np.zeros(0, self.dtype)
            ids = np.concatenate(parts)
            if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
                raise InputError(f"token ids outside the vocabulary [0, {self.vocab_size})")
            return ids.astype(self.dtype)

        return {
            "ctx_ids": flat(self._ctx),
            "ctx_offsets": _offsets([len(x) for x in self._ctx]),
            "qa_offsets": _offsets(self._n_qas),
            "input_ids": flat(self._inputs),
            "input_offsets": _offsets([len(x) for x in self._inputs]),
            "label_spans": np.asarray(self._spans, np.int32).reshape(-1, 2),
        }


def write_shard(
    path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict, compress: bool = False
) -> int:
    """Write one shard (atomically: a temporary file, then a rename); returns its bytes."""
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise InputError(f"shard arrays lack {missing}")
    n = len(arrays["ctx_offsets"]) - 1
    meta = {
        **meta,
        "format": FORMAT,
        "version": VERSION,
        "records": n,
        "qas": len(arrays["label_spans"]),
        "ids_dtype": str(arrays["ctx_ids"].dtype),
    }
    entries = {"meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)}
    entries.update(arrays)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # an object store has no rename: the shard is built in memory and written whole
    tmp = io.BytesIO() if is_remote(path) else path.with_name(path.name + ".tmp")
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(tmp, "w", mode) as zf:
        for name, arr in entries.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.compress_type = mode
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    if is_remote(path):
        return path.write_bytes(tmp.getvalue())
    os.replace(tmp, path)
    return os.path.getsize(path)


def clear_shards(folder: str | os.PathLike) -> None:
    """Remove a folder's shards, so a rewrite with fewer shards leaves no stale ones."""
    for f in Path(folder).glob("shard-*-of-*.npz"):
        if SHARD_NAME.search(f.name):
            f.unlink()


def write_text_qa_shards(
    records: Sequence[dict],
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    meta: dict,
    shard_size: int = 50_000,
    compress: bool = True,
) -> dict[str, int]:
    """Text QA records {context, prompt(s), response(s)} -> token shards in out_dir, tokenized
    with batched tokenizer calls (`pipeline.text_qa_tokens`: the ids `text_qa_item` makes)."""
    from hyperlora_jax.data.pipeline import text_qa_tokens  # jax + grain: not in shard workers

    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    prefix, suffix = ctx_affixes(tokenizer)
    meta = {**meta, "vocab_size": len(tokenizer), "ctx_prefix": prefix, "ctx_suffix": suffix}
    meta.setdefault("tokenizer", str(getattr(tokenizer, "name_or_path", "") or ""))
    out = Path(out_dir)
    clear_shards(out)
    n_shards = max(1, -(-len(records) // shard_size))
    total = 0
    for s in range(n_shards):
        lo = s * shard_size
        builder = ShardBuilder(len(tokenizer))
        for ctx, qas in text_qa_tokens(records[lo : lo + shard_size], tokenizer):
            builder.add(ctx, [(ids, label_span(ids, labels)) for ids, labels in qas])
        shard_meta = {**meta, "shard": s, "num_shards": n_shards, "first_record": lo}
        total += write_shard(out / shard_name(s, n_shards), builder.arrays(), shard_meta, compress)
    return {"records": len(records), "shards": n_shards, "bytes": total}


# ----------------------------------------------------------------------------- reading
@dataclass
class Shard:
    """One shard's arrays, checked (see the module docstring for the layout)."""

    path: Path
    meta: dict
    ctx_ids: np.ndarray
    ctx_offsets: np.ndarray
    qa_offsets: np.ndarray
    input_ids: np.ndarray
    input_offsets: np.ndarray
    label_spans: np.ndarray
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ctx_offsets) - 1

    def context(self, r: int) -> np.ndarray:
        return self.ctx_ids[self.ctx_offsets[r] : self.ctx_offsets[r + 1]]

    def qas(self, r: int) -> range:
        return range(int(self.qa_offsets[r]), int(self.qa_offsets[r + 1]))

    def input(self, q: int) -> np.ndarray:
        return self.input_ids[self.input_offsets[q] : self.input_offsets[q + 1]]


def _check_offsets(path: Path, name: str, off: np.ndarray, total: int) -> None:
    if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != total:
        raise InputError(f"{path}: {name} do not span their array (corrupt shard?)")
    if np.any(np.diff(off) < 0):
        raise InputError(f"{path}: {name} decrease (corrupt shard?)")


def read_shard(path: str | os.PathLike) -> Shard:
    """Load and check one shard; anything malformed is an InputError naming the file."""
    path = Path(path)
    try:
        src = io.BytesIO(path.read_bytes()) if is_remote(path) else path
        with np.load(src, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{path}: not a readable token shard ({e})") from e
    try:
        meta = json.loads(bytes(data.pop("meta")).decode())
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise InputError(
            f"{path}: no token-shard metadata; is it a `--format tokens` shard?"
        ) from e
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise InputError(f"{path}: token shard version {meta.get('version')}, expected {VERSION}")
    if not isinstance(meta.get("vocab_size"), int):
        raise InputError(f"{path}: token shard metadata lacks vocab_size")
    missing = [k for k in ARRAYS if k not in data]
    if missing:
        raise InputError(f"{path}: token shard lacks {missing}")
    shard = Shard(path, meta, *(data.pop(k) for k in ARRAYS), columns={})
    shard.columns = {k.removeprefix("rec_"): v for k, v in data.items() if k.startswith("rec_")}
    n = len(shard)
    _check_offsets(path, "ctx_offsets", shard.ctx_offsets, len(shard.ctx_ids))
    _check_offsets(path, "qa_offsets", shard.qa_offsets, len(shard.label_spans))
    _check_offsets(path, "input_offsets", shard.input_offsets, len(shard.input_ids))
    if n != meta.get("records") or np.any(np.diff(shard.ctx_offsets) == 0):
        raise InputError(f"{path}: record count or an empty context (corrupt shard?)")
    spans, lens = shard.label_spans, np.diff(shard.input_offsets)
    if (
        spans.shape != (len(lens), 2)
        or np.any(spans[:, 0] < 0)
        or np.any(spans[:, 0] > spans[:, 1])
    ):
        raise InputError(f"{path}: label_spans malformed (corrupt shard?)")
    if np.any(spans[:, 1] > lens):
        raise InputError(f"{path}: a label span runs past its QA (corrupt shard?)")
    if any(len(v) != n for v in shard.columns.values()):
        raise InputError(f"{path}: a rec_* column does not have one value per record")
    return shard


def find_shards(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Token shards named by paths: .npz files, globs, or folders (every *.npz under them).

    Empty when none of the paths holds shards; an InputError when only some do (token shards and
    text records cannot be mixed in one run) or when a folder is missing shards of a set."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    without: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            hits = [f for f in files_under(p) if f.suffix == ".npz"]
        elif p.exists():
            hits = [p] if p.suffix == ".npz" else []
        elif is_remote(p):  # gs://bucket/dir/*.npz: a pattern in the last part only
            hits = sorted(h for h in p.parent.glob(p.name) if h.suffix == ".npz")
        else:
            hits = sorted(Path(h) for h in glob.glob(str(p), recursive=True) if h.endswith(".npz"))
        if hits:
            found += hits
        else:
            without.append(str(p))
    if found and without:
        raise InputError(
            f"{without} hold no token shards but other --data paths do; token shards cannot be "
            "mixed with text or self-gen records (write them all with --format tokens)"
        )
    _check_complete(found)
    return found


def _check_complete(files: list[Path]) -> None:
    sets: dict[tuple[Path, int], set[int]] = {}
    for f in files:
        m = SHARD_NAME.search(f.name)
        if m:
            sets.setdefault((f.parent, int(m.group(2))), set()).add(int(m.group(1)))
    for (folder, count), have in sets.items():
        lacking = sorted(set(range(count)) - have)
        if lacking:
            raise InputError(f"{folder}: shard(s) {lacking} of {count} are missing")


class TokenData:
    """Several shards read as one sequence of records (in the order given)."""

    def __init__(self, files: Sequence[str | os.PathLike]):
        if not files:
            raise InputError("no token shards given")
        self.shards = [read_shard(f) for f in files]
        first = self.shards[0].meta
        for s in self.shards[1:]:
            for key in ("ctx_prefix", "ctx_suffix", "vocab_size"):
                if s.meta.get(key) != first.get(key):
                    raise InputError(
                        f"{s.path}: {key} differs from {self.shards[0].path}'s; the shards were "
                        "built for different tokenizers"
                    )
        self.ctx_prefix = tuple(first.get("ctx_prefix") or ())
        self.ctx_suffix = tuple(first.get("ctx_suffix") or ())
        self.vocab_size = int(first["vocab_size"])
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[Shard, int]:
        """(shard, index in it) of global record i."""
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shards[s], i - int(self.starts[s])

    def max_id(self) -> int:
        return max(
            max(int(s.ctx_ids.max(initial=0)), int(s.input_ids.max(initial=0))) for s in self.shards
        )


# ----------------------------------------------------------------------------- lazy D2L items
class ShardItems:
    """The D2L items `pipeline.build_items` + `text_qa_item` would make of these records, built
    on demand. Sizes, chunk counts and QA groups are computed once, as numpy arrays: record i's
    chunk count is drawn with `pipeline.record_rng(seed, i)` by `packing.choose_num_chunks`, and
    its QAs are grouped by `packing.split_qa_groups`, exactly as the text path does.

    Implements what `pipeline.PackedRows` needs: len, getitem (an item dict) and `sizes`."""

    def __init__(
        self,
        data: TokenData,
        chunk: Any,  # pipeline.ChunkConfig (its prefix / suffix are the affixes re-wrapping chunks)
        *,
        seed: int = 0,
        max_qas_len: int = -1,
        max_qas_per_sample: int = -1,
    ):

        from hyperlora_jax.data.pipeline import record_rng  # jax + grain: not in shard workers

        self._data, self._prefix, self._suffix = data, tuple(chunk.prefix), tuple(chunk.suffix)
        n_chunks = array.array("i")
        item_record, qa_flat, qa_count = array.array("q"), array.array("q"), array.array("q")
        sizes = array.array("q")
        chunk_lens: dict[tuple[int, int], list[int]] = {}  # (tokens, chunks) -> chunk lengths
        i = 0
        for shard in data.shards:
            ctx_len = np.diff(shard.ctx_offsets).tolist()
            qa_len = np.diff(shard.input_offsets).tolist()
            qa_off = shard.qa_offsets.tolist()
            for r, n in enumerate(ctx_len):
                rng = record_rng(seed, i) if chunk.num_chunk_probs is not None else None
                k = packing.choose_num_chunks(
                    n,
                    max_chunk_len=chunk.max_chunk_len,
                    num_chunk_probs=chunk.num_chunk_probs,
                    min_chunk_len=chunk.min_chunk_len,
                    rng=rng,
                )
                if (n, k) not in chunk_lens:  # lengths only: slice a stand-in of n tokens
                    pieces = slice_into_chunks(range(n), k, self._prefix, self._suffix)
                    chunk_lens[(n, k)] = [len(c) for c in pieces]
                lens = chunk_lens[(n, k)]
                n_chunks.append(k)
                first = qa_off[r]
                groups = packing.split_qa_groups(
                    qa_len[first : qa_off[r + 1]], max_qas_len, max_qas_per_sample
                )
                for g in groups:
                    item_record.append(i)
                    qa_count.append(len(g))
                    qa_flat.extend(first + j for j in g)  # QA index in the record's shard
                    sizes.extend((sum(qa_len[first + j] for j in g), sum(lens), len(lens), len(g)))
                i += 1
        self._n_chunks = np.frombuffer(n_chunks, np.int32)
        self._item_record = np.frombuffer(item_record, np.int64)
        self._qa_flat = np.frombuffer(qa_flat, np.int64)
        self._qa_offsets = _offsets(np.frombuffer(qa_count, np.int64)).astype(np.int64)
        self.sizes = np.frombuffer(sizes, np.int64).reshape(-1, 4)
        self.longest_chunk = max((max(v) for v in chunk_lens.values()), default=0)

    def __len__(self) -> int:
        return len(self._item_record)

    def __getitem__(self, j: int) -> dict:
        i = int(self._item_record[j])
        shard, r = self._data.locate(i)
        ctx = shard.context(r).tolist()
        chunks = slice_into_chunks(ctx, int(self._n_chunks[i]), self._prefix, self._suffix)
        inputs, labels = [], []
        for q in self._qa_flat[self._qa_offsets[j] : self._qa_offsets[j + 1]].tolist():
            ids = shard.input(q).tolist()
            s, e = shard.label_spans[q]
            inputs.append(ids)
            labels.append(packing.labels_from_span(ids, int(s), int(e)))
        return {"ctx_chunks": chunks, "input_ids": inputs, "labels": labels}
