"""The restricted torch.save reader: official checkpoints load; pickled code is refused, unrun."""

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

from hyperlora_jax.convert.safe_unpickle import PickledObject, load_torch_file, to_plain
from hyperlora_jax.errors import CheckpointError


def test_d2l_checkpoint_configs_and_shapes(fixtures_dir):
    d = fixtures_dir / "official" / "d2l"
    sd = load_torch_file(d / "pytorch_model.bin")
    expected = json.loads((d / "pickled_configs.json").read_text())
    configs = {k: to_plain(v) for k, v in sd.items() if not isinstance(v, np.ndarray)}
    assert configs == expected["non_tensor_entries"]
    shapes = {k: list(v.shape) for k, v in sd.items() if isinstance(v, np.ndarray)}
    assert shapes == expected["tensor_shapes"]
    hc = sd["hypernet_config"]
    assert isinstance(hc, PickledObject) and hc.latent_size == 32
    assert hc.lora_config.peft_type.value == "LORA"
    assert hc.lora_config.target_modules == {"down_proj"}


def test_t2l_checkpoint_matches_torch_weights_only(fixtures_dir):
    path = fixtures_dir / "official" / "t2l" / "t2l_release" / "hypermod.pt"
    ours = load_torch_file(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(ref)  # key order matters (T2L module order)
    for k, v in ref.items():
        assert ours[k].dtype == np.float32 and np.array_equal(ours[k], v.numpy()), k


def _roundtrip_objects():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "t": base,
        "transposed": base.t(),  # non-contiguous view
        "slice": base[1:3, 2:],  # offset view into the same storage
        "bf16": torch.linspace(-1, 1, 7).to(torch.bfloat16),
        "i64": torch.tensor([3, -1, 7]),
        "bool": torch.tensor([True, False]),
        "param": torch.nn.Parameter(torch.ones(2, 3)),
        "empty": torch.zeros(0, 5),
        "nested": {"list": [torch.tensor(1.5), 2], "set": {"q_proj", "v_proj"}},
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_roundtrip_against_torch(tmp_path, zip_format):
    objs = _roundtrip_objects()
    path = tmp_path / "x.pt"
    torch.save(objs, path, _use_new_zipfile_serialization=zip_format)
    ours = load_torch_file(path)
    for k in ("t", "transposed", "slice", "i64", "bool", "param", "empty"):
        ref = objs[k].detach().numpy()
        assert ours[k].shape == ref.shape and np.array_equal(ours[k], ref), k
    assert np.array_equal(ours["bf16"].astype(np.float32), objs["bf16"].float().numpy())
    assert str(ours["bf16"].dtype) == "bfloat16"
    assert float(ours["nested"]["list"][0]) == 1.5 and ours["nested"]["list"][1] == 2
    assert ours["nested"]["set"] == {"q_proj", "v_proj"}


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def _evil_zip(tmp_path, payload) -> str:
    """A torch-style zip whose data.pkl holds `payload` (pickled with its __reduce__)."""
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": payload}, protocol=2))
        z.writestr("archive/byteorder", "little")
    return path


@pytest.mark.parametrize("kind", ["os.system", "posix.system", "eval", "subprocess", "exec"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, kind):
    import builtins
    import os
    import posix
    import subprocess

    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    payload = {
        "os.system": _Evil(os.system, cmd),
        "posix.system": _Evil(posix.system, cmd),
        "eval": _Evil(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "subprocess": _Evil(subprocess.call, ["touch", str(marker)]),
        "exec": _Evil(builtins.exec, f"open({str(marker)!r}, 'w')"),
    }[kind]
    path = _evil_zip(tmp_path, payload)
    with pytest.raises(CheckpointError, match="refusing to unpickle global"):
        load_torch_file(path)
    assert not marker.exists()


def test_malicious_legacy_stream_is_refused(tmp_path):
    import os

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(obj, buf, protocol=2)
    pickle.dump(_Evil(os.system, f"touch {marker}"), buf, protocol=2)
    path = tmp_path / "legacy.pt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="refusing to unpickle global"):
        load_torch_file(path)
    assert not marker.exists()


def test_overrunning_tensor_and_missing_file_raise(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.ones(4, 4)}, path)
    # Shrink the storage so the tensor overruns it: must be refused, never read out of bounds.
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    key = next(n for n in members if n.endswith("data/0"))
    members[key] = members[key][:16]
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(bad, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(CheckpointError, match="overruns its storage"):
        load_torch_file(bad)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_torch_file(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError):
        load_torch_file(tmp_path / "junk.pt")
