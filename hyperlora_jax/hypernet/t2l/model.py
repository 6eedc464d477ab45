"""Text-to-LoRA HyperModulator: task embedding -> LoRA A/B for every layer and target module.

A faithful Flax port of SakanaAI/text-to-lora `src/hyper_llm_modulator/hyper_modulator.py`:
task encoder (Linear + LN), layer-depth and layer-type embeddings (Embedding + LN), a mixer MLP,
two pre-LN residual MLP blocks, an output MLP and one linear head per target module. Three head
sizes: "L" emits A and B at once (width r*(in+out)), "M" is one head shared by A and B (width
r*max(in,out), selected by a learned A/B embedding), "S" emits one rank row per call (width
max(in,out)) with a rotary or learned rank position code. All layers, all target modules and all
task embeddings of a batch run in one forward pass. Parameters stay f32, like the original.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import ConfigError
from hyperlora_jax.lora.adapter import Adapter

HEAD_SIZES = ("L", "M", "S")
# "trained": what T2L trained with and PEFT applies (alpha/r, times sqrt(r) under rsLoRA).
# "vllm054": alpha/r, what vLLM 0.5.4 applied when the README numbers were measured (§3.4).
SCALE_MODES = ("trained", "vllm054")


@dataclasses.dataclass(frozen=True)
class T2LConfig:
    """Architecture and LoRA settings of one T2L hypernetwork (hashable: a static jit argument).

    `modules` is the layer-type index order (official `module_to_int`); `in_features` and
    `out_features` are each module's (d_in, d_out) in that order.
    """

    modules: tuple[str, ...]
    in_features: tuple[int, ...]
    out_features: tuple[int, ...]
    num_layers: int
    task_emb_size: int = 1024
    latent_size: int = 128
    head_in_size: int = 512
    head: str = "L"
    learnable_pos_emb: bool = False  # S only: learned rank embedding instead of rotary
    head_use_bias: bool = True
    # "sft": zero head weights + PEFT-style bias (bias-HyperInit); "default": torch defaults.
    head_init: str = "sft"
    rank: int = 8
    lora_alpha: float = 16.0
    use_rslora: bool = True
    dropout_rate: float = 0.05
    layer_norm_eps: float = 1e-5
    # Output transform of recon checkpoints (official convert_to_raw_scale); "sft" adds AB_offset.
    training_task: str = "sft"
    factorized: bool = False
    pred_z_score: bool = False
    delta_w_scaling: float = 10000.0

    def __post_init__(self):
        if self.head not in HEAD_SIZES:
            raise ConfigError(f"unknown T2L head size {self.head!r}; expected one of {HEAD_SIZES}")
        if not (len(self.modules) == len(self.in_features) == len(self.out_features) > 0):
            raise ConfigError(
                f"T2L modules {self.modules} need one in/out feature size each, got "
                f"{self.in_features} / {self.out_features}"
            )
        if self.latent_size % 4:
            raise ConfigError(f"latent_size={self.latent_size} must be a multiple of 4")
        if self.learnable_pos_emb and self.head != "S":
            raise ConfigError("learnable_pos_emb only applies to the S head")
        if self.head_init not in ("sft", "default"):
            raise ConfigError(f"head_init={self.head_init!r}; expected 'sft' or 'default'")
        if self.training_task not in ("sft", "recon"):
            raise ConfigError(f"training_task={self.training_task!r}; expected 'sft' or 'recon'")

    def dims(self, module: str) -> tuple[int, int]:
        i = self.modules.index(module)
        return self.in_features[i], self.out_features[i]

    def head_width(self, module: str) -> int:
        d_in, d_out = self.dims(module)
        if self.head == "L":
            return self.rank * (d_in + d_out)
        if self.head == "M":
            return self.rank * max(d_in, d_out)
        return max(d_in, d_out)

    def scale(self, mode: str = "trained") -> float:
        """The LoRA scale the generated adapter is meant for (see SCALE_MODES)."""
        if mode not in SCALE_MODES:
            raise ConfigError(f"unknown scale mode {mode!r}; expected one of {SCALE_MODES}")
        s = self.lora_alpha / self.rank
        if mode == "trained" and self.use_rslora:
            s *= math.sqrt(self.rank)
        return s

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> T2LConfig:
        d = dict(d)
        for k in ("modules", "in_features", "out_features"):
            d[k] = tuple(d[k])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown T2L config fields {sorted(unknown)}")
        return cls(**d)


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dense(
    features: int, fan_in: int, name: str | None = None, use_bias: bool = True, **kw
) -> nn.Dense:
    """nn.Linear with PyTorch's default init: weight and bias U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    kw.setdefault("kernel_init", _uniform(bound))
    kw.setdefault("bias_init", _uniform(bound))
    return nn.Dense(features, use_bias=use_bias, name=name, **kw)


def _head_bias_init(cfg: T2LConfig, module: str):
    """bias-HyperInit (official `match_lora_init`): the head bias is PEFT's LoRA init.

    L: [A0.flatten(), 0] so the step-0 adapter is (A0, 0), a zero update. M: A0.flatten()/sqrt(2),
    shared by A and B. S: A0.flatten()[:width]/sqrt(2)/sqrt(r). A0 ~ U(+-1/sqrt(d_in)) (kaiming
    uniform, a=sqrt(5)). The official M/S init needs d_in >= d_out; otherwise we draw A0 over the
    full head width (the official code would crash there).
    """
    d_in, d_out = cfg.dims(module)
    r, width = cfg.rank, cfg.head_width(module)

    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / math.sqrt(d_in)
        if cfg.head == "L":
            a0 = jax.random.uniform(key, (r * d_in,), dtype, -bound, bound)
            return jnp.concatenate([a0, jnp.zeros((r * d_out,), dtype)])
        a0 = jax.random.uniform(key, (max(r * d_in, width),), dtype, -bound, bound)[:width]
        if cfg.head == "M":
            return a0 / math.sqrt(2)
        return a0 / math.sqrt(2) / math.sqrt(r)

    return init


class _ResidualMLP(nn.Module):
    """Official MLPResidualBlock (pre-LN, post-dropout): x + Drop(SiLU(W2 Drop(SiLU(W1 LN(x)))))."""

    width: int
    rate: float
    eps: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        h = nn.LayerNorm(epsilon=self.eps, name="norm")(x)
        h = nn.silu(_dense(4 * self.width, self.width, "fc1")(h))
        h = nn.Dropout(self.rate)(h, deterministic=deterministic)
        h = nn.silu(_dense(self.width, 4 * self.width, "fc2")(h))
        h = nn.Dropout(self.rate)(h, deterministic=deterministic)
        return x + h


def _rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """LlamaRotaryEmbedding(dim=x.shape[-1]) + apply_rotary_pos_emb on the last axis."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [r, dim]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class HyperModulator(nn.Module):
    """task embeddings [B, E] -> ({m: A [B, L, r, d_in]}, {m: B [B, L, r, d_out]}) raw outputs.

    The outputs are the head outputs reshaped to our layout (B is PEFT's lora_B transposed);
    `postprocess` applies a checkpoint's AB_offset / recon un-scaling.
    """

    config: T2LConfig

    def setup(self):
        cfg = self.config
        d = cfg.latent_size
        eps, rate = cfg.layer_norm_eps, cfg.dropout_rate
        self.task_linear = _dense(d // 2, cfg.task_emb_size)
        self.task_norm = nn.LayerNorm(epsilon=eps, name="task_norm")
        emb_init = nn.initializers.normal(stddev=1.0)  # torch nn.Embedding default
        self.depth_embed = nn.Embed(cfg.num_layers, d // 4, embedding_init=emb_init)
        self.depth_norm = nn.LayerNorm(epsilon=eps)
        self.type_embed = nn.Embed(len(cfg.modules), d // 4, embedding_init=emb_init)
        self.type_norm = nn.LayerNorm(epsilon=eps)
        self.mixer_fc1 = _dense(4 * d, d)
        self.mixer_fc2 = _dense(d, 4 * d)
        self.mlp1 = _ResidualMLP(d, rate, eps)
        self.mlp2 = _ResidualMLP(d, rate, eps)
        self.mlp3_norm = nn.LayerNorm(epsilon=eps)
        self.mlp3_fc1 = _dense(4 * d, d)
        self.mlp3_fc2 = _dense(cfg.head_in_size, 4 * d)
        self.dropout = nn.Dropout(rate)
        if cfg.head in ("M", "S"):
            # Learned A/B selector embeddings per module, N(0, 1) like the official out_emb.
            self.out_emb = self.param("out_emb", emb_init, (len(cfg.modules), 2, d))
            self.out_emb_norm = nn.LayerNorm(epsilon=eps)
        if cfg.learnable_pos_emb:
            self.pos_embed = nn.Embed(cfg.rank, d, embedding_init=emb_init)
            self.pos_norm = nn.LayerNorm(epsilon=eps)
        heads = {}
        for m in cfg.modules:
            kw = {}
            if cfg.head_init == "sft":
                kw = {"kernel_init": nn.initializers.zeros_init()}
                if cfg.head_use_bias:
                    kw["bias_init"] = _head_bias_init(cfg, m)
            heads[m] = _dense(cfg.head_width(m), cfg.head_in_size, use_bias=cfg.head_use_bias, **kw)
        self.heads = heads

    def encode_task(self, task_emb: jax.Array) -> jax.Array:
        """Official TaskEncoder ("linear"): LN(Linear(e)), no activation. [B, E] -> [B, D/2]."""
        return self.task_norm(self.task_linear(task_emb.astype(jnp.float32)))

    def _mlp3(self, x, deterministic):
        h = nn.silu(self.mlp3_fc1(self.mlp3_norm(x)))
        h = self.dropout(h, deterministic=deterministic)
        return nn.silu(self.mlp3_fc2(h))

    def trunk(self, encoded: jax.Array, deterministic: bool = True) -> jax.Array:
        """mlp1(mixer(cat[task, depth, type])) for every (sample, module, layer): [B, M, L, D]."""
        cfg = self.config
        b, n_mod, n_layers = encoded.shape[0], len(cfg.modules), cfg.num_layers
        depth = self.depth_norm(self.depth_embed(jnp.arange(n_layers)))  # [L, D/4]
        types = self.type_norm(self.type_embed(jnp.arange(n_mod)))  # [M, D/4]
        shape = (b, n_mod, n_layers)
        x = jnp.concatenate(
            [
                jnp.broadcast_to(encoded[:, None, None, :], (*shape, encoded.shape[-1])),
                jnp.broadcast_to(depth[None, None], (*shape, depth.shape[-1])),
                jnp.broadcast_to(types[None, :, None], (*shape, types.shape[-1])),
            ],
            axis=-1,
        )
        x = self.dropout(x, deterministic=deterministic)
        x = nn.silu(self.mixer_fc1(x))
        x = self.dropout(x, deterministic=deterministic)
        x = nn.silu(self.mixer_fc2(x))
        x = self.dropout(x, deterministic=deterministic)
        return self.mlp1(x, deterministic)

    def __call__(
        self,
        task_emb: jax.Array,
        deterministic: bool = True,
        encoded: jax.Array | None = None,
        return_head_out: bool = False,
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]] | tuple[Any, ...]:
        cfg = self.config
        r = cfg.rank
        if encoded is None:
            encoded = self.encode_task(task_emb)
        h = self.trunk(encoded, deterministic)  # [B, M, L, D]
        b = h.shape[0]
        if cfg.head == "L":
            head_in = self._mlp3(self.mlp2(h, deterministic), deterministic)  # [B, M, L, Hin]
        else:
            sel = self.out_emb_norm(self.out_emb)  # [M, 2, D]
            h = self.mlp2(h[:, :, None] + sel[None, :, :, None, :], deterministic)  # [B,M,2,L,D]
            if cfg.head == "S":
                h = jnp.broadcast_to(h[..., None, :], (*h.shape[:-1], r, h.shape[-1]))
                if cfg.learnable_pos_emb:
                    pos = self.pos_norm(self.pos_embed(jnp.arange(r)))
                    h = h + self.mlp2(pos, deterministic)
                else:
                    h = self.mlp2(_rotary(h, jnp.arange(r)), deterministic)
            head_in = self._mlp3(h, deterministic)
        a_out, b_out, raw = {}, {}, {}
        for i, m in enumerate(cfg.modules):
            d_in, d_out = cfg.dims(m)
            out = self.heads[m](head_in[:, i])
            raw[m] = out
            if cfg.head == "L":  # [B, L, r*(in+out)]: A rows then B rows, both rank-major
                a_out[m] = out[..., : r * d_in].reshape(b, cfg.num_layers, r, d_in)
                b_out[m] = out[..., r * d_in :].reshape(b, cfg.num_layers, r, d_out)
            else:  # M: [B, 2, L, r*w] ; S: [B, 2, L, r, w]
                out = out.reshape(b, 2, cfg.num_layers, r, -1)
                a_out[m], b_out[m] = out[:, 0, ..., :d_in], out[:, 1, ..., :d_out]
        if return_head_out:
            return a_out, b_out, raw, encoded
        return a_out, b_out


def postprocess(
    cfg: T2LConfig,
    a: dict[str, jax.Array],
    b: dict[str, jax.Array],
    constants: dict[str, jax.Array] | None,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Official output transform: SFT adds AB_offset; recon undoes the target normalisation.

    `constants` holds `ab_offset.{a|b}.{m}`, `mean.{a|b}.{m}`, `std.{a|b}.{m}` in our layout
    ([L, r, d]); missing entries are zeros (the official SFT release stores zeros).
    """
    c = constants or {}

    def get(kind, ab, m, like):
        v = c.get(f"{kind}.{ab}.{m}")
        return None if v is None else jnp.asarray(v, like.dtype)

    a2, b2 = {}, {}
    for m in a:
        for ab, src, dst in (("a", a, a2), ("b", b, b2)):
            x = src[m]
            if cfg.training_task == "sft":
                off = get("ab_offset", ab, m, x)
                dst[m] = x if off is None else x + off
            elif cfg.factorized:
                if cfg.pred_z_score:
                    mean, std = get("mean", ab, m, x), get("std", ab, m, x)
                    x = x * ((0.0 if std is None else std) + 1e-10) + (
                        0.0 if mean is None else mean
                    )
                off = get("ab_offset", ab, m, x)
                dst[m] = x if off is None else x + off
            else:
                if cfg.pred_z_score:
                    raise ConfigError(
                        "recon checkpoint with factorized=False and pred_z_score=True cannot be "
                        "un-normalised (the official convert_to_raw_scale raises too); set "
                        "pred_z_score: false in args.yaml if the model was trained that way"
                    )
                dst[m] = x / math.sqrt(cfg.delta_w_scaling)
    return a2, b2


def init_params(cfg: T2LConfig, rng: jax.Array) -> dict:
    """Fresh hypernetwork params (official init for `cfg.head_init`)."""
    return _init_jit(cfg, rng)


@partial(jax.jit, static_argnums=0)
def _init_jit(cfg: T2LConfig, rng: jax.Array) -> dict:
    dummy = jnp.zeros((1, cfg.task_emb_size), jnp.float32)
    return HyperModulator(cfg).init(rng, dummy)["params"]


@partial(jax.jit, static_argnums=(0, 3))
def apply(
    cfg: T2LConfig, params: dict, task_embs: jax.Array, deterministic: bool = True, rng=None
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Jitted raw forward: task embeddings [B, E] -> (A dict, B dict) (see HyperModulator)."""
    rngs = None if rng is None else {"dropout": rng}
    return HyperModulator(cfg).apply(
        {"params": params}, task_embs, deterministic=deterministic, rngs=rngs
    )


def param_count(cfg: T2LConfig) -> int:
    """Trainable parameter count, computed with jax.eval_shape (no memory used)."""
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


def generate_adapter(
    cfg: T2LConfig,
    params: dict,
    task_embs: jax.Array,
    constants: dict | None = None,
    scale_mode: str = "trained",
) -> Adapter:
    """Task embeddings [B, E] -> Adapter with a[m] [B, L, r, d_in], b[m] [B, L, r, d_out]."""
    a, b = HyperModulator(cfg).apply({"params": params}, task_embs, deterministic=True)
    a, b = postprocess(cfg, a, b, constants)
    return Adapter(a, b, cfg.scale(scale_mode))
