"""Dataset files: read corpora (JSONL / Parquet / plain text) with per-record error reports, and
write/read our record datasets as JSONL, Parquet or ArrayRecord (optionally as a TFDS builder).

Records are dicts of str / int / float / (nested) lists / numpy arrays. In ArrayRecord files each
record is msgpack with numpy arrays as an ext type: safe to decode (no pickle), random access.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from hyperlora_jax.errors import InputError
from hyperlora_jax.paths import Path, files_under, is_remote

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")
_NDARRAY_EXT = 1


# ----------------------------------------------------------------------------- error reporting
@dataclass
class BadRecord:
    """One rejected record: where it is and why."""

    file: str
    index: int  # record index in the file (line number - 1 for JSONL), -1 for the whole file
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}" if self.index < 0 else f"{self.file} record {self.index}"
        return f"{where}: {self.reason}"


@dataclass
class ErrorLog:
    """Collects bad records; `on_error='raise'` raises at the first, 'skip' logs a warning each."""

    on_error: str = "raise"
    bad: list[BadRecord] = field(default_factory=list)

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise InputError(f"on_error={self.on_error!r}; use one of {ON_ERROR}")

    def report(self, file: str | os.PathLike, index: int, reason: str) -> None:
        bad = BadRecord(str(file), index, reason)
        if self.on_error == "raise":
            raise InputError(f"{bad} (pass on_error='skip' to skip bad records)")
        log.warning("skipping %s", bad)
        self.bad.append(bad)


# ----------------------------------------------------------------------------- corpus reading
def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by paths, folders (recursively: .jsonl/.json/.parquet/.txt/.md) or globs."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += [
                q
                for q in files_under(p)
                if q.suffix in (".jsonl", ".json", ".parquet", ".txt", ".md")
            ]
        elif p.exists():
            out.append(p)
        else:
            if is_remote(p):  # gs://bucket/dir/*.parquet: a pattern in the last part only
                hits = sorted(p.parent.glob(p.name)) if p.parent.is_dir() else []
            else:
                hits = sorted(Path(h) for h in glob.glob(str(p), recursive=True))
            if not hits:
                raise InputError(f"no such file, folder or glob match: {p}")
            out += [h for h in hits if h.is_file()]
    return out


def _read_text(path: Path, errors: ErrorLog) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        errors.report(path, -1, f"not valid UTF-8 ({e.reason} at byte {e.start}); re-encode it")
        return None


def iter_raw_records(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    text_field: str = "text",
    errors: ErrorLog,
) -> Iterable[tuple[str, int, dict]]:
    """(file, index, record) for every record: a JSONL line, a Parquet row or a whole text file.

    Undecodable files / lines are reported to `errors` (skipped or raised) with file and index.
    """
    for path in expand_paths(paths):
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(io.BytesIO(path.read_bytes()) if is_remote(path) else path)
            except Exception as e:  # pyarrow raises several types
                errors.report(path, -1, f"unreadable Parquet file: {e}")
                continue
            for i, row in enumerate(table.to_pylist()):
                yield str(path), i, row
        elif suffix in (".jsonl", ".json"):
            text = _read_text(path, errors)
            if text is None:
                continue
            for i, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    errors.report(path, i, f"invalid JSON: {e.msg}")
                    continue
                if not isinstance(rec, dict):
                    errors.report(path, i, f"expected a JSON object, got {type(rec).__name__}")
                    continue
                yield str(path), i, rec
        else:  # plain text: one document per file
            text = _read_text(path, errors)
            if text is not None:
                yield str(path), 0, {text_field: text}


def read_documents(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    text_field: str = "text",
    on_error: str = "raise",
    max_chars: int | None = None,
) -> tuple[list[dict], list[BadRecord]]:
    """Documents from a corpus: [{'text', 'source', 'index', ...}], plus the rejected records.

    A record must have a non-empty string `text_field`. `max_chars` keeps documents of at most
    that many characters (the official FineWeb-Edu filter is 2000 characters).
    """
    errors = ErrorLog(on_error)
    docs = []
    for file, i, rec in iter_raw_records(paths, text_field=text_field, errors=errors):
        if text_field not in rec:
            errors.report(file, i, f"missing field {text_field!r} (has {sorted(rec)})")
            continue
        text = rec[text_field]
        if not isinstance(text, str):
            errors.report(file, i, f"field {text_field!r} is {type(text).__name__}, not a string")
            continue
        if not text.strip():
            errors.report(file, i, "empty document")
            continue
        if max_chars is not None and len(text) > max_chars:
            continue  # a length filter, not an error
        docs.append({**rec, text_field: text, "source": file, "index": i})
    return docs, errors.bad


# ----------------------------------------------------------------------------- record codec
def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return obj.tolist()
        header = msgpack.packb([obj.dtype.str, list(obj.shape)])
        return msgpack.ExtType(_NDARRAY_EXT, header + np.ascontiguousarray(obj).tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _NDARRAY_EXT:
        return msgpack.ExtType(code, data)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    dtype, shape = unpacker.unpack()
    offset = unpacker.tell()
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise InputError("record holds an object array; refusing to decode it")
    return np.frombuffer(data[offset:], dtype=dt).reshape(shape).copy()


def encode_record(rec: dict) -> bytes:
    """msgpack bytes of a record (numpy arrays kept with dtype and shape)."""
    return msgpack.packb(rec, default=_default, use_bin_type=True)


def decode_record(data: bytes) -> dict:
    """Inverse of encode_record (no code execution: msgpack + raw numpy buffers)."""
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


# ----------------------------------------------------------------------------- writers
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as JSON lines; numpy arrays become lists. Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(_jsonable(rec), ensure_ascii=False) + "\n")
            n += 1
    return n


def write_parquet(path: str | os.PathLike, records: Sequence[dict]) -> int:
    """Write records as one Parquet file (nested lists become list columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([_jsonable(r) for r in records])
    if is_remote(path):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        path.write_bytes(buf.getvalue())
    else:
        pq.write_table(table, path)
    return len(records)


def write_array_record(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records to one ArrayRecord file (random-access, what grain reads fastest)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    if is_remote(path):  # the writer needs a local file: written here, then uploaded whole
        with tempfile.TemporaryDirectory() as tmp:
            n = write_array_record(os.path.join(tmp, path.name), records)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes((Path(tmp) / path.name).read_bytes())
        return n
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    n = 0
    try:
        for rec in records:
            writer.write(encode_record(rec))
            n += 1
    finally:
        writer.close()
    return n


def write_records(path: str | os.PathLike, records: Sequence[dict]) -> int:
    """Write by extension: .jsonl, .parquet or .array_record."""
    suffix = Path(path).suffix
    writers: dict[str, Callable] = {
        ".jsonl": write_jsonl,
        ".parquet": write_parquet,
        ".array_record": write_array_record,
    }
    if suffix not in writers:
        raise InputError(f"unknown dataset file type {suffix!r} for {path}; use {sorted(writers)}")
    return writers[suffix](path, records)


# ------------------------------------------------------------------------- random-access sources
def _local_copy(path: str) -> str:
    """A gs:// ArrayRecord file copied once to the local temp folder (the reader opens local
    files only); a local path as it is."""
    if not is_remote(path):
        return path
    src = Path(path)
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    local = Path(tempfile.gettempdir()) / f"hyperlora_ar_{key}" / src.name
    if not local.exists() or os.path.getsize(local) != src.stat().length:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f".{src.name}.tmp-{os.getpid()}"
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, local)
    return str(local)


class RecordSource:
    """Random-access records (len / getitem) over a list, JSONL, Parquet or ArrayRecord files.

    What grain.MapDataset.source needs. ArrayRecord files are read lazily; the others are loaded.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        files = expand_paths(paths) if not isinstance(paths, list) or paths else []
        self._files = [str(f) for f in files]
        ar = [f for f in self._files if ".array_record" in Path(f).name]
        if ar and len(ar) != len(self._files):
            raise InputError(
                "mixing ArrayRecord with other file types in one source is not supported"
            )
        self._records: list[dict] | None = None
        self._ar = None
        if ar:
            import grain

            self._ar = grain.sources.ArrayRecordDataSource([_local_copy(f) for f in ar])
        else:
            errors = ErrorLog("raise")
            self._records = [r for _, _, r in iter_raw_records(self._files, errors=errors)]

    def __len__(self) -> int:
        return len(self._ar) if self._ar is not None else len(self._records)

    def __getitem__(self, i: int) -> dict:
        if self._ar is not None:
            return decode_record(self._ar[i])
        return self._records[i]

    def __repr__(self) -> str:
        return f"RecordSource({len(self)} records from {len(self._files)} file(s))"


# ----------------------------------------------------------------------------- TFDS builder
def write_tfds(
    data_dir: str | os.PathLike,
    name: str,
    splits: dict[str, Sequence[dict]],
    version: str = "1.0.0",
) -> Path:
    """Build a TFDS dataset (ArrayRecord files) holding our encoded records, one per example.

    Read it back with `tfds_source(data_dir, name, split)` or with
    `tfds.builder_from_directory(path).as_data_source()`; no TensorFlow needed.
    Note that TFDS reorders examples by a hash of their key when it writes.
    """
    import tensorflow_datasets as tfds

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"record": tfds.features.Tensor(shape=(), dtype=np.object_)}
                ),
                description="hyperlora_jax records (msgpack bytes; decode with decode_record).",
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(recs) for s, recs in splits.items()}

        def _generate_examples(self, recs):
            for i, r in enumerate(recs):
                yield i, {"record": encode_record(r)}

    _Builder.name = name
    # tfds looks for the builder's source file through `importlib_resources` (not installed) when
    # __module__ is a dotted package path; a plain name makes it skip that lookup.
    _Builder.__module__ = "hyperlora_records"
    builder = _Builder(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)


class TfdsSource:
    """Random access to a split written by write_tfds (decoded records)."""

    def __init__(self, builder_dir: str | os.PathLike, split: str):
        import tensorflow_datasets as tfds

        builder_dir = Path(builder_dir)
        if not (builder_dir / "dataset_info.json").exists():
            raise InputError(
                f"{builder_dir} is not a TFDS dataset version folder (no dataset_info.json); "
                "pass <data_dir>/<name>/<version> as returned by write_tfds"
            )
        builder = tfds.builder_from_directory(str(builder_dir))
        self._src = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> dict:
        return decode_record(self._src[i]["record"])


def dir_size(path: str | os.PathLike) -> int:
    """Bytes on disk under path (a file or a folder)."""
    p = Path(path)
    if p.is_file():
        return p.stat().length
    return sum(f.stat().length for f in files_under(p))
