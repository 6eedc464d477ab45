"""One schema per config family, read as written: every key of every preset in configs/d2l.py
and configs/t2l.py is read by the code that consumes it, and bad configs fail in one line."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from hyperlora_jax.cli import main
from hyperlora_jax.data import feeds
from hyperlora_jax.errors import ConfigError
from hyperlora_jax.train import build
from hyperlora_jax.train.config_file import load_config
from hyperlora_jax.train.factory import build_trainer

ROOT = Path(__file__).resolve().parents[1]


def _presets(family: str) -> list[str]:
    spec = importlib.util.spec_from_file_location(
        f"_{family}_presets", ROOT / f"configs/{family}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.PRESETS)


PRESETS = [(f, p) for f in ("d2l", "t2l") for p in _presets(f)]


def _sections(config, prefix=""):
    """{id(section): "dotted.prefix."} and the dotted names of all leaf keys."""
    ids, leaves = {id(config): prefix}, []
    for k in config.keys():
        v = config._fields[k]
        if isinstance(v, ConfigDict):
            sub_ids, sub_leaves = _sections(v, f"{prefix}{k}.")
            ids.update(sub_ids)
            leaves += sub_leaves
        else:
            leaves.append(f"{prefix}{k}")
    return ids, leaves


@contextlib.contextmanager
def _recording(config, monkeypatch):
    """Record every key read from `config` (attribute, item, get, dict(section)); to_dict()
    (the run's record of its config) reads no key."""
    ids, leaves = _sections(config)
    read: set[str] = set()
    copying = []  # inside to_dict: its own reads are no use of a key
    getitem, to_dict = ConfigDict.__getitem__, ConfigDict.to_dict

    def recorded(self, key):
        if id(self) in ids and not copying:
            read.add(f"{ids[id(self)]}{key}")
        return getitem(self, key)

    def unrecorded_to_dict(self, *a, **kw):
        copying.append(1)
        try:
            return to_dict(self, *a, **kw)
        finally:
            copying.pop()

    with monkeypatch.context() as m:
        m.setattr(ConfigDict, "__getitem__", recorded)
        m.setattr(ConfigDict, "to_dict", unrecorded_to_dict)
        yield read
    unread = sorted(set(leaves) - read)
    assert not unread, f"config keys no code reads: {', '.join(unread)}"


def _consume(config) -> build.Parts:
    """The config -> parts / options / optimizer / row shapes / data-feed settings path."""
    parts = build.experiment(config)
    build.train_options(config, parts.hp, "unused")
    build.mesh_spec(config)
    build.make_tx(config, parts, {})
    build.batch_spec(config, parts, 2)
    (feeds.d2l_feed if parts.hp.kind == "d2l" else feeds.t2l_feed)(config, parts)
    return parts


@pytest.mark.parametrize("family,preset", [x for x in PRESETS if x[1] != "tiny"])
def test_every_key_of_a_preset_is_read(family, preset, monkeypatch):
    config = load_config(f"configs/{family}.py:{preset}", [])
    with _recording(config, monkeypatch):
        _consume(config)


@pytest.mark.parametrize("family", ["d2l", "t2l"])
def test_every_key_of_tiny_is_read_by_a_short_run(family, monkeypatch, tmp_path):
    # d2l: the synthetic task has no teacher; t2l: epochs x (n_train_ds // batch) = 2 steps
    over = ["--config.train.steps=1", "--config.train.loss=ce"]
    over = over if family == "d2l" else ["--config.train.epochs=1"]
    config = load_config(f"configs/{family}.py:tiny", over)
    with _recording(config, monkeypatch):
        _consume(config)
        tr = build_trainer(config, workdir=str(tmp_path))
    try:
        rows = tr.run()
    finally:
        tr.close()
    assert rows[-1]["step"] == tr.o.steps


@pytest.mark.parametrize(
    "args,says",
    [
        (
            ["configs/d2l.py:tiny", "--config.train.stepz=3"],
            "unknown key 'stepz'; config.train has",
        ),
        (["configs/t2l.py:tiny", "--config.lora.rank=4"], "unknown key 'rank'; config.lora has"),
        (["configs/d2l.py:tiny", "--config.train.steps=abc"], "invalid literal for int()"),
        (
            ["configs/d2l.py:tiny", "--config.train.learning_rate=0"],
            "learning_rate=0.0: must be > 0",
        ),
        (["configs/t2l.py:tiny", "--config.train.learning_rate=-1"], "must be > 0"),
        (["configs/d2l.py:tiny", "--config.train.steps=0"], "train.steps=0: must be > 0"),
        (["configs/d2l.py:tiny", "--config.train.loss=banana"], "expected one of kl_top16, ce"),
        (["configs/t2l.py:tiny", "--config.train.objective=x"], "expected one of sft, recon, lora"),
        (["configs/nope.py:tiny"], "config file configs/nope.py not found"),
        (["configs/d2l.py:nope"], "unknown d2l preset 'nope'; available: gemma2_2b_qa"),
        (["configs/t2l.py:nope"], "unknown t2l preset 'nope'; available: mistral7b_sft"),
    ],
)
def test_bad_configs_fail_in_one_line(args, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["train", "--config", *args, "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


def test_plan_checks_values_before_compiling(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["plan", "--config", "configs/d2l.py:tiny", "--config.train.steps=-5", "--mesh"]
    assert main([*args, "data=1,fsdp=1,tensor=1"]) == 2
    assert "train.steps=-5: must be > 0" in capsys.readouterr().err


def test_load_config_is_locked():
    config = load_config("configs/t2l.py:tiny", [])
    with pytest.raises(AttributeError):
        config.train.stepz = 3
    with pytest.raises(ConfigError, match="a value, not a group"):
        load_config("configs/t2l.py:tiny", ["--config.train.steps.x=1"])
