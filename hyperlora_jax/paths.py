"""Paths of workdirs, checkpoints, data, adapters and exports: `etils.epath`, so a `gs://` (or
`s3://`) URL works wherever a local path does (gcsfs / s3fs installed, or TensorFlow's gfile).

Local paths behave exactly as before (epath's local backend is os / shutil). Remote object
stores have no atomic rename and no append, which the few writers that need them handle:
lora/storage.py builds a folder locally and uploads it (its JSON metadata last), the trainer
rewrites metrics.jsonl instead of appending to it.
"""

from __future__ import annotations

import io
import os

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """A URL of an object store (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath.Path; a local one made absolute (Orbax and tensorstore need that)."""
    p = epath.Path(path)
    return p if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))


def files_under(folder: epath.Path) -> list[epath.Path]:
    """Every file below `folder`, sorted (epath has no rglob, and its walk() drops the gs://
    of the folders it yields: this lists folder by folder)."""
    out = []
    for p in epath.Path(folder).iterdir():
        out += files_under(p) if p.is_dir() else [p]
    return sorted(out)


def save_figure(fig, path: PathLike, **kw) -> None:
    """fig.savefig to a local or gs:// path (matplotlib writes local files only: render to
    bytes, then write them through epath)."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", **kw)
    path.write_bytes(buf.getvalue())
