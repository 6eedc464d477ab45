"""HF PEFT interop: export an Adapter as a PEFT LoRA folder (PEFT, vLLM) and import one back.

Key layout: base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight with
lora_A = A[i] [R, d_in] and lora_B = B[i]^T [d_out, R]. PEFT scales the delta by lora_alpha / r
(use_rslora=False) or lora_alpha / sqrt(r) (use_rslora=True); we pick lora_alpha so that this
equals our static scale exactly:
  plain (D2L style):  lora_alpha = scale * R
  rsLoRA (T2L style): lora_alpha = scale * sqrt(R), use_rslora = True

Other PyTorch layouts: `layout=` (a sequence of `PeftTarget`) names each of our modules' torch
module, and a fused one (Phi-3's qkv_proj, gate_up_proj) by its rows of the fused output. Export
writes a fused LoRA exactly, by rank concatenation: lora_A = [A_q; A_k; A_v] and lora_B
block-diagonal (rank = the sum of the parts'); import splits lora_B's rows (each part keeps the
shared lora_A). `hf_layout` is the standard layout (the default), `fused_layout` Phi-3's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import CheckpointError, ConfigError, InputError
from hyperlora_jax.lora.adapter import Adapter, module_path, pad_rank, to_numpy, validate
from hyperlora_jax.lora.storage import atomic_dir, load_safetensors, save_safetensors
from hyperlora_jax.models.config import TARGET_MODULES, ModelConfig
from hyperlora_jax.models.hf import config_from_hf
from hyperlora_jax.paths import Path

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
# Our side file: the base model's fingerprint (models/load.py). Not in adapter_config.json,
# whose unknown keys some PEFT / vLLM versions reject.
BASE = "hyperlora_base.json"

_KEY = re.compile(
    r"^(?P<prefix>.*?)(?:^|\.)layers\.(?P<layer>\d+)\.(?P<group>self_attn|mlp)\."
    r"(?P<module>\w+?)\.lora_(?P<ab>[AB])(?:\.(?P<name>[\w-]+))?\.weight$"
)


@dataclasses.dataclass(frozen=True)
class PeftTarget:
    """Where our module `module` lives in the PyTorch model a PEFT folder is for.

    name: the torch module path with "{layer}", e.g. "model.layers.{layer}.self_attn.qkv_proj"
    (PEFT keys are "base_model.model.<name>.lora_A.weight"). rows / width: for a fused module,
    this module's output features [start, stop) and the fused module's total output features.
    """

    module: str
    name: str
    rows: tuple[int, int] | None = None
    width: int | None = None

    def __post_init__(self):
        if self.module not in TARGET_MODULES:
            raise InputError(f"PeftTarget module {self.module!r} is not one of {TARGET_MODULES}")
        if "{layer}" not in self.name:
            raise InputError(f"PeftTarget name {self.name!r} needs a {{layer}} placeholder")
        if (self.rows is None) != (self.width is None):
            raise InputError(f"PeftTarget {self.name}: give rows and width together (fused)")
        if self.rows is not None and not 0 <= self.rows[0] < self.rows[1] <= self.width:
            raise InputError(f"PeftTarget {self.name}: rows {self.rows} outside width {self.width}")


def hf_layout(
    modules: Sequence[str] = TARGET_MODULES, prefix: str = "model.layers"
) -> tuple[PeftTarget, ...]:
    """The standard HF layout: `{prefix}.{layer}.{self_attn|mlp}.{module}` (Llama, Mistral,
    Qwen, Gemma ...; what export_peft writes without a layout)."""
    return tuple(PeftTarget(m, f"{prefix}.{{layer}}.{module_path(m)}.{m}") for m in modules)


def fused_layout(
    config: ModelConfig,
    *,
    qkv: str = "self_attn.qkv_proj",
    gate_up: str = "mlp.gate_up_proj",
    prefix: str = "model.layers",
) -> tuple[PeftTarget, ...]:
    """Phi-3's layout: q, k, v are rows q | k | v of one `qkv_proj`, gate and up rows gate | up
    of one `gate_up_proj`; o_proj and down_proj as in HF. Widths from `config`."""
    q, kv = config.module_dims("q_proj")[1], config.module_dims("k_proj")[1]
    i = config.intermediate_size
    base = f"{prefix}.{{layer}}."
    return (
        PeftTarget("q_proj", base + qkv, (0, q), q + 2 * kv),
        PeftTarget("k_proj", base + qkv, (q, q + kv), q + 2 * kv),
        PeftTarget("v_proj", base + qkv, (q + kv, q + 2 * kv), q + 2 * kv),
        PeftTarget("o_proj", f"{base}self_attn.o_proj"),
        PeftTarget("gate_proj", base + gate_up, (0, i), 2 * i),
        PeftTarget("up_proj", base + gate_up, (i, 2 * i), 2 * i),
        PeftTarget("down_proj", f"{base}mlp.down_proj"),
    )


def _layout_groups(modules: Sequence[str], layout: Sequence[PeftTarget]) -> dict[str, list]:
    """{torch name template: [PeftTarget of each of `modules` there]}; every module placed once."""
    groups: dict[str, list[PeftTarget]] = {}
    seen = set()
    for t in layout:
        if t.module in modules:
            if t.module in seen:
                raise InputError(f"the PEFT layout places {t.module} twice")
            seen.add(t.module)
            groups.setdefault(t.name, []).append(t)
    missing = sorted(set(modules) - seen)
    if missing:
        raise InputError(f"the PEFT layout has no place for {missing}; add PeftTargets for them")
    for name, ts in groups.items():
        if len(ts) > 1 and any(t.rows is None for t in ts):
            raise InputError(f"{name}: several modules share it, so each needs rows and width")
        if len({t.width for t in ts}) > 1:
            raise InputError(f"{name}: its PeftTargets disagree on the fused width")
    return groups


def layout_tensors(
    adapter: Adapter, layout: Sequence[PeftTarget]
) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """(PEFT state dict {key: array}, rank R, target_modules) of one adapter [L, R, d].

    Each torch module gets lora_A [R', d_in] / lora_B [d_out, R']: a fused one the parts'
    A stacked along the rank and B block-diagonal over its rows (exact). Every module is
    zero-padded to the largest rank R (exact), so one r / lora_alpha fits all.
    """
    a, b = to_numpy(adapter)
    groups = _layout_groups(adapter.modules, layout)
    packed: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> A [L, R', d_in], B [L, R', w]
    for name, ts in groups.items():
        if len(ts) == 1 and ts[0].rows is None:
            packed[name] = (a[ts[0].module], b[ts[0].module])
            continue
        d_ins = {a[t.module].shape[-1] for t in ts}
        if len(d_ins) > 1:
            raise InputError(f"{name}: fused modules {[t.module for t in ts]} differ in d_in")
        n_layers = a[ts[0].module].shape[0]
        ranks = [a[t.module].shape[-2] for t in ts]
        a_f = np.concatenate([a[t.module] for t in ts], axis=-2)
        b_f = np.zeros((n_layers, sum(ranks), ts[0].width), a_f.dtype)
        off = 0
        for t, r in zip(ts, ranks):
            start, stop = t.rows
            if stop - start != b[t.module].shape[-1]:
                raise InputError(
                    f"{name}: {t.module} has d_out={b[t.module].shape[-1]} but rows {t.rows}"
                )
            b_f[:, off : off + r, start:stop] = b[t.module]
            off += r
        packed[name] = (a_f, b_f)
    rank = max(x.shape[-2] for x, _ in packed.values())
    tensors = {}
    for name, (am, bm) in packed.items():
        pad = [(0, 0), (0, rank - am.shape[-2]), (0, 0)]
        am, bm = np.pad(am, pad), np.pad(bm, pad)
        for i in range(am.shape[0]):
            key = f"base_model.model.{name.format(layer=i)}"
            tensors[f"{key}.lora_A.weight"] = am[i]
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(bm[i].T)
    target_modules = sorted({name.rsplit(".", 1)[-1] for name in packed})
    return tensors, rank, target_modules


def peft_key(layer: int, module: str, ab: str) -> str:
    """The state-dict key PEFT's save_pretrained writes for one factor."""
    return f"base_model.model.model.layers.{layer}.{module_path(module)}.{module}.lora_{ab}.weight"


def peft_alpha(scale: float, rank: int, rslora: bool) -> float:
    """lora_alpha such that PEFT's scaling (alpha/r, or alpha/sqrt(r) for rsLoRA) equals `scale`."""
    return float(scale * (math.sqrt(rank) if rslora else rank))


def peft_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's LoRA scaling for (lora_alpha, r, use_rslora)."""
    return float(alpha / (math.sqrt(rank) if rslora else rank))


def _base_model_config(base_model: str | Path | None) -> tuple[Path | None, dict | None]:
    """(a local base model's config.json path, its contents), or (None, None) for a hub id."""
    if base_model is None:
        return None, None
    p = Path(base_model)
    if not p.is_dir():
        if p.exists():
            raise ConfigError(f"--base-model {p} is a file; give a model folder or a hub id")
        return None, None  # a hub id: nothing local to copy
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ConfigError(
            f"base model folder {p} has no config.json; give a folder saved with save_pretrained"
        )
    try:
        return cfg, json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg} is not valid JSON: {e}") from e


def export_peft(
    adapter: Adapter,
    base_model: str | Path | None,
    out_dir: str | Path,
    *,
    model_config: ModelConfig | None = None,
    rslora: bool = False,
    overwrite: bool = False,
    dtype: Any = None,
    base_model_id: str | None = None,
    base_fingerprint: str | None = None,
    texts: dict[str, str] | None = None,
    layout: Sequence[PeftTarget] | None = None,
) -> Path:
    """Write `adapter` as a PEFT LoRA folder that PeftModel.from_pretrained and vLLM load.

    base_model: a local model folder (its config.json is copied beside the adapter, as vLLM
    wants, and it provides the model config) or a hub id (recorded only). base_model_id: what
    to record as base_model_name_or_path instead (e.g. the hub id of a local copy).
    base_fingerprint: the base model's fingerprint, written to hyperlora_base.json. texts:
    extra text files of the folder (e.g. task_desc.txt). layout: the torch model's module
    names, fused modules included (`fused_layout` for Phi-3; None: the standard HF layout).
    Ranks of the modules are zero-padded to the largest (exact). The folder appears atomically
    or not at all.
    """
    cfg_path, cfg_dict = _base_model_config(base_model)
    if model_config is None and cfg_dict is not None:
        model_config = config_from_hf(cfg_dict)
    validate(adapter, model_config)
    if adapter.batch_shape:
        raise InputError(
            f"export_peft writes one adapter, got batch shape {adapter.batch_shape}; "
            "pick one with hyperlora_jax.lora.adapter.unstack"
        )
    if layout is not None:
        tensors, rank, target_modules = layout_tensors(adapter, layout)
        if dtype is not None:
            tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    else:
        rank = adapter.rank
        adapter = pad_rank(adapter, rank)
        target_modules = list(adapter.modules)
        a, b = to_numpy(adapter)
        tensors = {}
        for m in adapter.modules:
            am, bm = a[m], b[m]
            if dtype is not None:
                am, bm = am.astype(dtype), bm.astype(dtype)
            for i in range(am.shape[0]):
                tensors[peft_key(i, m, "A")] = am[i]
                tensors[peft_key(i, m, "B")] = bm[i].T
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": peft_alpha(adapter.scale, rank, rslora),
        "use_rslora": bool(rslora),
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "base_model_name_or_path": base_model_id
        or (None if base_model is None else str(base_model)),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_safetensors(tensors, tmp / WEIGHTS, {"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        if cfg_path is not None:
            shutil.copyfile(cfg_path, tmp / "config.json")
        if base_fingerprint:
            base = {"base_model": config["base_model_name_or_path"]}
            base["base_fingerprint"] = base_fingerprint
            (tmp / BASE).write_text(json.dumps(base, indent=2))
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)


def read_peft_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json of a PEFT folder, checked for features we cannot represent."""
    p = Path(adapter_dir) / CONFIG
    if not p.is_file():
        raise CheckpointError(f"no {CONFIG} in {adapter_dir}; is it a PEFT LoRA folder?")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({e})") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{p}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("lora_bias", False)):
        if cfg.get(key, ok) != ok:
            raise CheckpointError(f"{p}: {key}={cfg[key]!r} is not supported (plain LoRA only)")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{p}: bias={cfg['bias']!r} is not supported (plain LoRA only)")
    if "r" not in cfg or "lora_alpha" not in cfg:
        raise CheckpointError(f"{p} lacks r or lora_alpha")
    return cfg


def _read_weights(adapter_dir: Path) -> dict[str, np.ndarray]:
    st = adapter_dir / WEIGHTS
    if st.is_file():
        return load_safetensors(st)
    binf = adapter_dir / WEIGHTS_BIN
    if binf.is_file():
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(f"{binf} needs torch to read; convert it to safetensors") from e
        try:  # weights_only: never run code from a pickle
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{binf} is not a readable tensor file ({e})") from e
        return {k: v.float().numpy() for k, v in sd.items()}
    raise CheckpointError(f"no {WEIGHTS} or {WEIGHTS_BIN} in {adapter_dir}")


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: first pattern that matches the module name."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def import_peft(
    adapter_dir: str | Path,
    *,
    model_config: ModelConfig | None = None,
    dtype: Any = jnp.float32,
    layout: Sequence[PeftTarget] | None = None,
) -> Adapter:
    """Read a PEFT LoRA folder (ours, PEFT's own save_pretrained, T2L's) as an Adapter.

    Keys with or without the adapter name (".default") are accepted. The static scale is
    lora_alpha / r (or / sqrt(r) with use_rslora); per-module rank_pattern / alpha_pattern
    scalings are folded into A, ranks padded to the largest, layers the file lacks are zero
    (pass model_config to know the full layer count). layout: the torch model's module names
    (see export_peft); fused modules are split by rows, each part keeping the shared lora_A,
    and parts whose lora_B rows are all zero are left out.
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_peft_config(adapter_dir)
    weights = _read_weights(adapter_dir)
    rslora = bool(cfg.get("use_rslora", False))
    base_r, base_alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = peft_scaling(base_alpha, base_r, rslora)
    if layout is not None:
        return _import_layout(adapter_dir, cfg, weights, layout, model_config, dtype)

    def match(key):
        mt = _KEY.match(key)
        if mt is None or mt["module"] not in TARGET_MODULES:
            raise CheckpointError(
                f"{adapter_dir / WEIGHTS}: unsupported key {key!r}; only LoRA on decoder layers' "
                f"{', '.join(TARGET_MODULES)} is supported"
            )
        if module_path(mt["module"]) != mt["group"]:
            raise CheckpointError(
                f"{key}: {mt['module']} under {mt['group']} is not a known layout"
            )
        return mt["module"], int(mt["layer"]), mt["ab"]

    found, num_layers = _collect_slots(adapter_dir, weights, match, model_config)
    modules = sorted({m for m, _ in found})
    a, b = {}, {}
    for m in modules:
        layers = {layer: slot for (mm, layer), slot in found.items() if mm == m}
        rank, d_in, d_out = 0, None, None
        for layer, slot in layers.items():
            if set(slot) != {"A", "B"}:
                raise CheckpointError(f"{adapter_dir}: layer {layer} {m} lacks lora_A or lora_B")
            ra, din = slot["A"].shape
            dout, rb = slot["B"].shape
            if ra != rb or (d_in not in (None, din)) or (d_out not in (None, dout)):
                raise CheckpointError(
                    f"{adapter_dir}: layer {layer} {m} has lora_A {slot['A'].shape} and lora_B "
                    f"{slot['B'].shape}; expected [r, d_in] and [d_out, r] consistent over layers"
                )
            rank, d_in, d_out = max(rank, ra), din, dout
        am = np.zeros((num_layers, rank, d_in), np.float32)
        bm = np.zeros((num_layers, rank, d_out), np.float32)
        for layer, slot in layers.items():
            name = f"model.layers.{layer}.{module_path(m)}.{m}"
            r_l = int(_pattern_value(cfg.get("rank_pattern"), name, base_r))
            alpha_l = float(_pattern_value(cfg.get("alpha_pattern"), name, base_alpha))
            r_t = slot["A"].shape[0]
            if r_t != r_l:
                raise CheckpointError(
                    f"{adapter_dir}: {name} has rank {r_t} but the config says r={r_l}"
                )
            ratio = peft_scaling(alpha_l, r_l, rslora) / scale if scale else 1.0
            am[layer, :r_t] = slot["A"] * ratio
            bm[layer, :r_t] = slot["B"].T
        a[m], b[m] = jnp.asarray(am, dtype), jnp.asarray(bm, dtype)
    try:
        return validate(Adapter(a, b, scale if scale else 1.0), model_config)
    except InputError as e:
        raise InputError(f"{adapter_dir}: {e}") from e


def _collect_slots(adapter_dir, weights, match, model_config):
    """({(module, layer): {"A": lora_A, "B": lora_B}}, layer count) from a PEFT file's weights;
    match(key) -> (module, layer, "A" | "B") or raises for a key it does not know."""
    found: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for key, x in weights.items():
        name, layer, ab = match(key)
        slot = found.setdefault((name, layer), {})
        if ab in slot:
            raise CheckpointError(f"{key}: a second lora_{ab} for the same module and layer")
        slot[ab] = np.asarray(x, np.float32)
    if not found:
        raise CheckpointError(f"{adapter_dir} holds no LoRA weights")
    max_layer = max(layer for _, layer in found) + 1
    num_layers = model_config.num_layers if model_config is not None else max_layer
    if max_layer > num_layers:
        raise InputError(
            f"{adapter_dir}: the adapter has weights for layer {max_layer - 1} but the model has "
            f"{num_layers} layers; it was made for a different base model"
        )
    return found, num_layers


def _import_layout(
    adapter_dir: Path,
    cfg: dict,
    weights: dict[str, np.ndarray],
    layout: Sequence[PeftTarget],
    model_config: ModelConfig | None,
    dtype: Any,
) -> Adapter:
    """import_peft for an explicit layout (fused modules split by rows)."""
    rslora = bool(cfg.get("use_rslora", False))
    base_r, base_alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = peft_scaling(base_alpha, base_r, rslora) or 1.0
    groups = _layout_groups(sorted({t.module for t in layout}), layout)
    patterns = []
    for name in groups:
        rx = re.escape(name).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
        patterns.append(
            (name, re.compile(rf"^(?:base_model\.model\.)?{rx}\.lora_(?P<ab>[AB])"
                              rf"(?:\.[\w-]+)?\.weight$"))
        )  # fmt: skip

    def match(key):
        hit = [(name, mt) for name, rx in patterns if (mt := rx.match(key)) is not None]
        if not hit:
            raise CheckpointError(
                f"{adapter_dir}: key {key!r} fits no module of the layout ({', '.join(groups)})"
            )
        name, mt = hit[0]
        return name, int(mt["layer"]), mt["ab"]

    found, num_layers = _collect_slots(adapter_dir, weights, match, model_config)
    a, b = {}, {}
    for name, ts in groups.items():
        layers = {layer: slot for (n, layer), slot in found.items() if n == name}
        if not layers:
            continue
        rank = 0
        for layer, slot in layers.items():
            if set(slot) != {"A", "B"}:
                raise CheckpointError(f"{adapter_dir}: layer {layer} {name} lacks lora_A or _B")
            if slot["A"].shape[0] != slot["B"].shape[1]:
                raise CheckpointError(
                    f"{adapter_dir}: layer {layer} {name}: lora_A {slot['A'].shape} and lora_B "
                    f"{slot['B'].shape} disagree on the rank"
                )
            rank = max(rank, slot["A"].shape[0])
        for t in ts:
            d_in = next(iter(layers.values()))["A"].shape[1]
            width = next(iter(layers.values()))["B"].shape[0]
            if t.width is not None and width != t.width:
                raise CheckpointError(
                    f"{adapter_dir}: {name} has {width} output rows, the layout says {t.width}"
                )
            rows = slice(*t.rows) if t.rows is not None else slice(None)
            d_out = len(range(width)[rows])
            am = np.zeros((num_layers, rank, d_in), np.float32)
            bm = np.zeros((num_layers, rank, d_out), np.float32)
            for layer, slot in layers.items():
                full = name.format(layer=layer)
                r_l = int(_pattern_value(cfg.get("rank_pattern"), full, base_r))
                alpha_l = float(_pattern_value(cfg.get("alpha_pattern"), full, base_alpha))
                r_t = slot["A"].shape[0]
                if r_t != r_l:
                    raise CheckpointError(
                        f"{adapter_dir}: {full} has rank {r_t} but the config says r={r_l}"
                    )
                am[layer, :r_t] = slot["A"] * (peft_scaling(alpha_l, r_l, rslora) / scale)
                bm[layer, :r_t] = slot["B"][rows].T
            if t.rows is not None and not np.any(bm):
                continue  # a fused part the adapter did not train
            a[t.module], b[t.module] = jnp.asarray(am, dtype), jnp.asarray(bm, dtype)
    if not a:
        raise CheckpointError(f"{adapter_dir}: every LoRA in it is zero")
    try:
        return validate(Adapter(a, b, scale), model_config)
    except InputError as e:
        raise InputError(f"{adapter_dir}: {e}") from e
