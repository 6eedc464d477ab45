"""Checkpoint folder I/O (atomic writes, nested arrays <-> safetensors + a JSON file) and our
native adapter folder (adapter.safetensors + adapter.json).

save_tree / load_tree / read_json are the one writer and reader of every folder we store: adapters
here, the D2L and T2L hypernetwork checkpoints (hypernet/{d2l,t2l}/checkpoint.py).
adapter.safetensors holds "a.{module}" [*batch, L, R, d_in] and "b.{module}" [*batch, L, R, d_out];
adapter.json holds the static scale, modules, shapes and free-form provenance (base model, source).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import CheckpointError, InputError
from hyperlora_jax.lora.adapter import Adapter, to_numpy, validate
from hyperlora_jax.paths import Path, files_under, is_remote

FORMAT = "hyperlora_jax.adapter"
VERSION = 1
WEIGHTS = "adapter.safetensors"
META = "adapter.json"


def umask() -> int:
    """The process umask. Linux shows it in /proc (no window where it is 0 for other threads);
    elsewhere set-and-restore is the only way to read it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_umask_allows(path: Path, mode: int) -> None:
    """mkdtemp / mkstemp (and safetensors' own temp file) create 0700 / 0600 whatever the umask;
    give `path` the mode a plain mkdir / open would, so other users (a server) can read it."""
    os.chmod(path, mode & ~umask())


def _named(e: OSError, path: Path, tmp: Path | None = None) -> OSError:
    """`e` naming `path` when it names no file or only our temp folder (meaningless to a user)."""
    if e.filename is None or (tmp is not None and str(e.filename).startswith(str(tmp))):
        new = OSError(e.errno, e.strerror or str(e), str(path))  # same subclass, by errno
        new.__cause__ = e
        return new
    return e


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out_dir`; on success it replaces `out_dir`, on error it vanishes.

    Nothing half-written is ever visible at `out_dir` and a replaced folder is restored if the
    swap fails. An existing non-empty `out_dir` is only replaced with overwrite=True. OS errors
    (no space, read-only, no permission) propagate as OSError naming `out_dir` or its parent.
    A remote `out_dir` (gs://...; no atomic rename there) is built in a local temp folder, then
    uploaded with its JSON files last, so a reader never finds the metadata of a partial folder.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} is not empty; choose a new folder or pass overwrite")
    if is_remote(out):
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-") as local:
            yield Path(local)
            _upload(Path(local), out)
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise _named(e, out.parent, out.parent / f".{out.name}.tmp-") from e
    try:
        _as_umask_allows(tmp, 0o777)
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise _named(e, out, tmp) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _upload(local: Path, out: Path) -> None:
    """Copy a finished local folder to the remote `out` (replacing it), JSON files last."""
    if out.exists():
        out.rmtree()
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(files_under(local), key=lambda f: (f.suffix == ".json", str(f))):
        dst = out / f.relative_to(local)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(f.read_bytes())


def save_safetensors(arrays: dict[str, np.ndarray], path: Path, metadata: dict | None = None):
    """Write numpy arrays (bf16 via ml_dtypes included) to a safetensors file (mode per umask).

    safetensors reports I/O failures as SafetensorError "... (os error N) ..."; they are raised
    as the OSError they are, naming `path`, so callers see one kind of I/O error.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save, save_file

    if is_remote(path):  # an object: written whole
        Path(path).write_bytes(
            save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata)
        )
        return
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path), metadata)
    except SafetensorError as e:
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e
    _as_umask_allows(path, 0o666)


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file as numpy arrays; a corrupt or truncated file is a CheckpointError."""
    from safetensors.numpy import load, load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        return load(path.read_bytes()) if is_remote(path) else load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); re-export it"
        ) from e


def flatten_tree(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> flat {"a/b/c": leaf} (leaves untouched)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_tree(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten_tree(flat: dict[str, Any]) -> dict:
    """Flat {"a/b/c": leaf} -> nested dict (inverse of flatten_tree)."""
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def save_tree(
    out_dir: str | Path,
    arrays: dict[str, dict],
    meta_file: str,
    meta: dict[str, Any],
    *,
    overwrite: bool = False,
    texts: dict[str, str] | None = None,
) -> Path:
    """Write a folder atomically: each arrays[file] (a nested dict of numpy arrays) as a
    safetensors file with "/"-joined keys, `meta` (which names its "format") as JSON, and
    texts[file] as text files."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for name, tree in arrays.items():
            flat = {k: np.asarray(v) for k, v in flatten_tree(tree).items()}
            save_safetensors(flat, tmp / name, {"format": meta["format"]})
        (tmp / meta_file).write_text(json.dumps(meta, indent=2, default=_json_default))
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)


def load_tree(path: str | Path) -> dict:
    """A safetensors file written by save_tree as a nested dict of numpy arrays."""
    return unflatten_tree(load_safetensors(Path(path)))


def read_json(path: str | Path, fmt: str, missing_hint: str) -> dict[str, Any]:
    """The JSON metadata file of a folder of format `fmt`; any defect is a CheckpointError."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no {p.name} in {p.parent}; {missing_hint}")
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{p} is not a {fmt} file (format={found!r})")
    return meta


def save_adapter(
    adapter: Adapter,
    out_dir: str | Path,
    metadata: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
    texts: dict[str, str] | None = None,
) -> Path:
    """Write `adapter` to `out_dir` atomically; metadata e.g. base_model, base_fingerprint
    (models/load.py), source, model_config; texts: extra text files of the folder."""
    validate(adapter)
    a, b = to_numpy(adapter)
    arrays = {f"a.{m}": x for m, x in a.items()} | {f"b.{m}": x for m, x in b.items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "scale": float(adapter.scale),
        "modules": list(adapter.modules),
        "shapes": {k: list(v.shape) for k, v in sorted(arrays.items())},
        "dtype": str(adapter.dtype),
        **(metadata or {}),
    }
    return save_tree(out_dir, {WEIGHTS: arrays}, META, meta, overwrite=overwrite, texts=texts)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"cannot store {type(o).__name__} in a checkpoint's JSON file")


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter.json of a native adapter folder."""
    return read_json(
        Path(adapter_dir) / META,
        FORMAT,
        "is it an adapter saved with save_adapter? "
        "(PEFT folders load with hyperlora_jax.lora.peft.import_peft)",
    )


def load_adapter(adapter_dir: str | Path) -> Adapter:
    """Read a folder written by save_adapter; a corrupt file is a CheckpointError naming it."""

    adapter_dir = Path(adapter_dir)
    meta = read_adapter_meta(adapter_dir)
    arrays = load_safetensors(adapter_dir / WEIGHTS)
    modules = meta.get("modules") or []
    expected = {f"{p}.{m}" for m in modules for p in ("a", "b")}
    if set(arrays) != expected:
        raise CheckpointError(
            f"{adapter_dir / WEIGHTS} holds {sorted(arrays)} but {META} lists modules {modules}"
        )
    for k, shape in (meta.get("shapes") or {}).items():
        if k in arrays and list(arrays[k].shape) != list(shape):
            raise CheckpointError(
                f"{adapter_dir / WEIGHTS}: {k} has shape {list(arrays[k].shape)}, "
                f"{META} says {shape}"
            )
    adapter = Adapter(
        {m: jnp.asarray(arrays[f"a.{m}"]) for m in modules},
        {m: jnp.asarray(arrays[f"b.{m}"]) for m in modules},
        float(meta["scale"]),
    )
    try:
        return validate(adapter)
    except InputError as e:
        raise CheckpointError(f"{adapter_dir}: {e}") from e
