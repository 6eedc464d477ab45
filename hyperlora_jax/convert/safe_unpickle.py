"""Read `torch.save` files without torch and without executing pickled code.

A restricted `pickle.Unpickler` resolves only an allow-list of globals: torch's tensor rebuild
functions and storage types (tensors come back as numpy arrays, read from the raw storage bytes),
`collections.OrderedDict`, `set`/`frozenset`, `copyreg._reconstructor`, and the configuration
classes that the official D2L/T2L checkpoints pickle (`ctx_to_lora.*`, `hyper_llm_modulator.*`,
PEFT's LoraConfig & co.). Those classes are never imported: they become `PickledObject` records
(class name + constructor args + state). Any other global (os.system, builtins.eval, ...) raises
`CheckpointError` before anything runs. CUDA-tagged storages load like CPU ones.

Both formats are read: the zip format (torch >= 1.6: `<prefix>/data.pkl` + `<prefix>/data/<key>`)
and the legacy stream (magic, protocol, sys_info, pickle, storage keys, raw storages).
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from hyperlora_jax.errors import CheckpointError

# torch storage class name -> numpy dtype of its elements.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}
# numpy dtype -> torch dtype name (how `to_plain` spells a tensor's dtype).
TORCH_DTYPE_NAMES = {
    np.dtype(np.float32): "torch.float32",
    np.dtype(np.float64): "torch.float64",
    np.dtype(np.float16): "torch.float16",
    np.dtype(ml_dtypes.bfloat16): "torch.bfloat16",
    np.dtype(np.int64): "torch.int64",
    np.dtype(np.int32): "torch.int32",
    np.dtype(np.int16): "torch.int16",
    np.dtype(np.int8): "torch.int8",
    np.dtype(np.uint8): "torch.uint8",
    np.dtype(np.bool_): "torch.bool",
}
# torch dtype objects (pickled as e.g. GLOBAL 'torch float32') come back as their name.
TORCH_DTYPE_GLOBALS = {n.split(".")[1] for n in TORCH_DTYPE_NAMES.values()} | {
    "float",
    "double",
    "half",
    "long",
    "int",
}
# Config-class modules whose classes are recorded (never imported).
STUB_MODULE_PREFIXES = ("ctx_to_lora.", "hyper_llm_modulator.")
STUB_MODULE_ROOTS = ("ctx_to_lora", "hyper_llm_modulator")
PEFT_STUB_CLASSES = ("LoraConfig", "LoraRuntimeConfig", "PeftType", "TaskType")

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class PickledObject:
    """A pickled config object recorded as data: `class_name`, constructor `args`, `state`.

    Attribute access reads the state (`cfg.latent_size`), so configs read naturally.
    """

    class_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["args"] = tuple(args)
        obj.__dict__["state"] = dict(kwargs)
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE calls cls(*args); __new__ already stored them
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if not isinstance(state, dict):
            state = {"__state__": state}
        self.__dict__["state"].update(state)

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__.get("state", {})
        if name in state:
            return state[name]
        raise AttributeError(f"{self.class_name} has no field {name!r}")

    def __getitem__(self, name: str) -> Any:
        return self.state[name]

    @property
    def value(self) -> Any:
        """An enum's value (enums pickle as `Class(value)`)."""
        return self.args[0] if len(self.args) == 1 else self.state.get("_value_")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PickledObject)
            and self.class_name == other.class_name
            and self.args == other.args
            and self.state == other.state
        )

    def __hash__(self) -> int:  # enum members end up in sets and dict keys
        return hash((self.class_name, self.args))

    def __repr__(self) -> str:
        return f"PickledObject({self.class_name}, args={self.args!r}, state={self.state!r})"


class PickledSet(set):
    """A set that remembers the order it was pickled in (the saving process's iteration order)."""

    def __init__(self, items=()):
        items = list(items)
        super().__init__(items)
        self.order = items


_STUB_CLASSES: dict[str, type] = {}


def _stub_class(qualname: str) -> type:
    if qualname not in _STUB_CLASSES:
        _STUB_CLASSES[qualname] = type(
            qualname.rsplit(".", 1)[-1], (PickledObject,), {"class_name": qualname}
        )
    return _STUB_CLASSES[qualname]


class _StorageType:
    """Marker for a torch storage class: carries its element dtype, builds nothing."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    """A flat typed buffer (numpy 1-D array); `None` data during the legacy format's first pass."""

    def __init__(self, data: np.ndarray | None, dtype: np.dtype):
        self.data = data
        self.dtype = dtype


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    """torch._utils._rebuild_tensor_v2, safely: a bounds-checked strided copy of the storage."""
    if not isinstance(storage, _Storage):
        raise CheckpointError("malformed checkpoint: a tensor whose storage is not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if storage.data is None:  # legacy first pass: shapes only
        return None
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"malformed checkpoint: tensor size {size} / stride {stride}")
    offset = int(storage_offset)
    n = storage.data.shape[0]
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((sz - 1) * st for sz, st in zip(size, stride))
    if offset < 0 or last >= n:
        raise CheckpointError(
            f"malformed checkpoint: tensor of size {size} at offset {offset} overruns its storage "
            f"of {n} elements (truncated or corrupt file)"
        )
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage.data[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_parameter):
        raise CheckpointError("refusing to unpickle: _rebuild_from_type_v2 with a foreign function")
    return func(*args)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor, allowed only for recorded config classes."""
    if isinstance(cls, type) and issubclass(cls, PickledObject):
        obj = cls.__new__(cls)
        if state is not None:
            obj.__dict__["args"] = (state,)
        return obj
    raise CheckpointError(f"refusing to unpickle: copyreg._reconstructor of {cls!r}")


class _TensorMarker:
    """torch.Tensor / torch.nn.Parameter as a type argument of _rebuild_from_type_v2."""


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorMarker,
    ("torch.nn.parameter", "Parameter"): _TensorMarker,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): PickledSet,
    ("__builtin__", "set"): PickledSet,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "frozenset"): frozenset,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
}


def _resolve_global(module: str, name: str) -> Any:
    """The allow-list; everything else is refused by name."""
    key = (module, name)
    if key in _ALLOWED:
        return _ALLOWED[key]
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageType(name)
    if module == "torch" and name in TORCH_DTYPE_GLOBALS:
        return f"torch.{name}"
    if module == "torch" and name == "device":
        return str
    qualname = f"{module}.{name}"
    valid_name = name.isidentifier() and all(p.isidentifier() for p in module.split("."))
    if valid_name and (module in STUB_MODULE_ROOTS or module.startswith(STUB_MODULE_PREFIXES)):
        return _stub_class(qualname)
    if valid_name and module.split(".")[0] == "peft" and name in PEFT_STUB_CLASSES:
        return _stub_class(qualname)
    raise CheckpointError(
        f"refusing to unpickle global {qualname}: it is not on the allow-list of tensors and "
        "official config classes. The file may be malicious, or of a kind this loader does not "
        "read; convert it with trusted tools first."
    )


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load):
        super().__init__(file, encoding="utf-8")
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        return _resolve_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent(pid)


def _unpickle(data: bytes | io.BufferedIOBase, persistent_load, path: Path) -> Any:
    f = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return _RestrictedUnpickler(f, persistent_load).load()
    except CheckpointError:
        raise
    except Exception as e:  # malformed streams raise all sorts of things
        raise CheckpointError(f"cannot read {path}: corrupt or unsupported pickle ({e!r})") from e


def _storage_pid(pid: Any) -> tuple[_StorageType, str, Any]:
    if not (isinstance(pid, tuple) and len(pid) >= 5):
        raise CheckpointError(f"malformed checkpoint: unexpected persistent id {pid!r}")
    typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if typename != "storage" or not isinstance(pid[1], _StorageType):
        raise CheckpointError(f"malformed checkpoint: unexpected persistent id {pid!r}")
    return pid[1], str(pid[2]), pid[4]


def _load_zip(path: Path) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: corrupt torch zip checkpoint ({e})") from e
    with zf:
        names = zf.namelist()
        pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode().strip()
        cache: dict[str, _Storage] = {}

        def persistent_load(pid):
            stype, key, _numel = _storage_pid(pid)
            if key not in cache:
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise CheckpointError(f"{path}: storage {member} is missing (truncated file?)")
                raw = zf.read(member)
                dtype = stype.dtype.newbyteorder("<" if byteorder == "little" else ">")
                if len(raw) % dtype.itemsize:
                    raise CheckpointError(f"{path}: storage {member} has a partial element")
                arr = np.frombuffer(raw, dtype=dtype).astype(stype.dtype, copy=False)
                cache[key] = _Storage(arr, stype.dtype)
            return cache[key]

        return _unpickle(zf.read(pkls[0]), persistent_load, path)


def _load_legacy(path: Path) -> Any:
    """torch < 1.6 stream: magic, protocol, sys_info, main pickle, storage keys, raw storages."""

    def plain(f):
        return _unpickle(f, lambda pid: None, path)

    with open(path, "rb") as f:
        if plain(f) != _LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
        plain(f)  # protocol version
        sys_info = plain(f)
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        start = f.tell()
        roots: dict[str, tuple[_StorageType, int]] = {}
        views: dict[str, tuple[str, int, int]] = {}

        def record(pid):
            stype, key, numel = _storage_pid(pid)
            roots.setdefault(key, (stype, int(numel)))
            view = pid[5] if len(pid) > 5 else None
            if view is not None:
                views[str(view[0])] = (key, int(view[1]), int(view[2]))
            return _Storage(None, stype.dtype)

        _unpickle(f, record, path)  # first pass: learn the storages (tensors not built yet)
        keys = [str(k) for k in plain(f)]
        data: dict[str, np.ndarray] = {}
        for key in keys:
            if key not in roots:
                raise CheckpointError(f"{path}: storage key {key} was never referenced")
            stype, _ = roots[key]
            header = f.read(8)
            if len(header) != 8:
                raise CheckpointError(f"{path}: truncated storage {key}")
            (numel,) = struct.unpack("<q" if little else ">q", header)
            nbytes = numel * stype.dtype.itemsize
            raw = f.read(nbytes)
            if numel < 0 or len(raw) != nbytes:
                raise CheckpointError(f"{path}: truncated storage {key}")
            dtype = stype.dtype.newbyteorder("<" if little else ">")
            data[key] = np.frombuffer(raw, dtype=dtype).astype(stype.dtype, copy=False)
        f.seek(start)

        def resolve(pid):
            stype, key, _ = _storage_pid(pid)
            view = pid[5] if len(pid) > 5 else None
            if view is not None:
                root, off, size = views[str(view[0])]
                return _Storage(data[root][off : off + size], stype.dtype)
            if key not in data:
                raise CheckpointError(f"{path}: storage {key} is missing")
            return _Storage(data[key], stype.dtype)

        return _unpickle(f, resolve, path)


def load_torch_object(path: str | Path) -> Any:
    """Whatever a trusted `torch.save` stored, with tensors as numpy arrays; refuses code."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint file at {p}")
    if zipfile.is_zipfile(p):
        return _load_zip(p)
    return _load_legacy(p)


def load_torch_file(path: str | Path) -> dict:
    """A torch.save'd dict (state dict or checkpoint) as {key: numpy array | config record}."""
    obj = load_torch_object(path)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a dict of tensors; expected a state dict"
        )
    return obj


def to_plain(obj: Any) -> Any:
    """JSON-able view of a loaded value: records -> {"__class__", ...state} (enums: "__args__"),
    sets -> {"__set__": [pickled order]}, arrays -> {"__tensor__": list, "dtype": torch name}."""
    if isinstance(obj, PickledObject):
        out: dict[str, Any] = {"__class__": obj.class_name}
        if obj.args:
            out["__args__"] = [to_plain(a) for a in obj.args]
        out.update({k: to_plain(v) for k, v in obj.state.items()})
        return out
    if isinstance(obj, PickledSet):
        return {"__set__": [to_plain(x) for x in obj.order]}
    if isinstance(obj, set | frozenset):
        return {"__set__": sorted(to_plain(x) for x in obj)}
    if isinstance(obj, np.ndarray):
        return {
            "__tensor__": obj.tolist(),
            "dtype": TORCH_DTYPE_NAMES.get(obj.dtype, str(obj.dtype)),
        }
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(x) for x in obj]
    return obj
