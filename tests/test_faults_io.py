"""A full disk, a read-only folder or a file in the way: every writing command exits 1 with one
line naming the path and the fix (no traceback), and leaves no half-written output behind. What
we write honours the umask (mkdtemp / safetensors' temp files would make it 0700 / 0600)."""

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from hyperlora_jax.cli import main

FIX = Path(__file__).parent / "fixtures" / "official"
MISTRAL = FIX / "t2l" / "tiny-mistral"
GEMMA = FIX / "d2l" / "tiny-gemma2"
D2L_BIN = FIX / "d2l" / "pytorch_model.bin"
T2L_RELEASE = FIX / "t2l" / "t2l_release"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A converted T2L checkpoint, task embeddings, and an adapter to export."""
    d = tmp_path_factory.mktemp("made")
    assert main(["convert", "official-t2l", str(T2L_RELEASE), str(d / "ckpt")]) == 0
    embs = np.load(FIX / "t2l" / "golden.npz")["task_embs"]
    np.save(d / "embs.npy", embs[:1])
    np.save(d / "embs2.npy", embs[:2])
    (d / "doc.txt").write_text("The sky over Paris was green on Tuesday.")
    gen = ["generate-adapter", "--hypernet", d / "ckpt", "--task", "t", "--embeddings",
           d / "embs.npy"]  # fmt: skip
    assert main([str(a) for a in [*gen, "--out", d / "ad"]]) == 0
    return d, gen


def _commands(d: Path, gen: list, out: Path) -> dict[str, list]:
    doc, embs2 = ["--doc", d / "doc.txt"], ["--embeddings", d / "embs2.npy"]
    return {
        "convert-t2l": ["convert", "official-t2l", T2L_RELEASE, out],
        "convert-d2l": ["convert", "official-d2l", D2L_BIN, out],
        "internalize": [
            "internalize",
            "--hypernet",
            D2L_BIN,
            "--base-model",
            GEMMA,
            *doc,
            "--out",
            out,
        ],
        "export-peft": ["export-peft", d / "ad", out, "--base-model", MISTRAL],
        "generate-adapter": [*gen, "--out", out],
        "generate-adapter-many": [*gen, "--task", "u", *embs2, "--out", out],
        "generate-adapter-peft": [*gen, "--peft", "--base-model", MISTRAL, "--out", out],
    }


COMMANDS = list(_commands(Path(), [], Path()))


def _one_line_error(argv, capsys, expect_rc=1) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == expect_rc, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err


def _nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_disk_full_while_writing_weights(cmd, made, tmp_path, monkeypatch, capsys):
    import safetensors.numpy

    def full(*a, **k):  # what a write on a full disk raises (no file name attached)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    out = tmp_path / "out"
    err = _one_line_error(_commands(*made, out)[cmd], capsys)
    assert "No space left on device" in err and str(out) in err and "free some space" in err
    _nothing_left(tmp_path, out)


def test_disk_full_in_safetensors_itself(tmp_path):
    """safetensors reports I/O failures as SafetensorError; they become the OSError they are."""
    from hyperlora_jax.lora.storage import save_safetensors

    with pytest.raises(FileNotFoundError) as e:
        save_safetensors({"a": np.zeros(2, np.float32)}, tmp_path / "missing" / "x.safetensors")
    assert e.value.filename == str(tmp_path / "missing" / "x.safetensors")


def test_read_only_file_system(made, tmp_path, monkeypatch, capsys):
    import tempfile

    def erofs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), k.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", erofs)
    out = tmp_path / "out"
    err = _one_line_error(_commands(*made, out)["export-peft"], capsys)
    assert "Read-only file system" in err and str(tmp_path) in err and "writable" in err
    _nothing_left(tmp_path, out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 folder anyway")
@pytest.mark.parametrize("cmd", ["convert-t2l", "export-peft", "generate-adapter"])
def test_read_only_output_folder(cmd, made, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        out = parent / "out"
        err = _one_line_error(_commands(*made, out)[cmd], capsys)
        assert "Permission denied" in err and str(parent) in err and "permission" in err
        _nothing_left(parent, out)
    finally:
        parent.chmod(0o755)


def test_parent_is_a_file(made, tmp_path, capsys):
    (tmp_path / "f.txt").write_text("x")
    out = tmp_path / "f.txt" / "out"
    err = _one_line_error(_commands(*made, out)["export-peft"], capsys)
    assert "f.txt" in err and "file" in err
    assert (tmp_path / "f.txt").read_text() == "x"


def test_failed_swap_restores_the_replaced_folder(tmp_path, monkeypatch):
    from hyperlora_jax.lora import storage

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    real = os.replace

    def fail_into_out(src, dst):
        if Path(dst) == out and ".tmp-" in str(src):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(storage.os, "replace", fail_into_out)
    with pytest.raises(OSError) as e:
        with storage.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert e.value.filename == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "keep.txt").read_text() == "old"


@pytest.mark.parametrize("mask, d_mode, f_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_written_files_honour_umask(mask, d_mode, f_mode, made, tmp_path, capsys):
    d, _ = made
    old = os.umask(mask)
    try:
        assert main(["export-peft", str(d / "ad"), str(tmp_path / "peft")]) == 0
        assert main(["convert", "official-t2l", str(T2L_RELEASE), str(tmp_path / "ckpt")]) == 0
        from hyperlora_jax.lora.storage import load_adapter, save_adapter

        save_adapter(load_adapter(d / "ad"), tmp_path / "ad")
    finally:
        os.umask(old)
    for folder in ("peft", "ckpt", "ad"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == d_mode, folder
        for f in (tmp_path / folder).iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == f_mode, f
