"""D2L hypernetwork (official `HyperLoRA`): Perceiver latents -> per-layer heads -> LoRA A/B rows.

One latent vector per (layer, module, rank row) goes through per-layer residual MLP blocks, is L2
normalised (no epsilon), and a per-layer bias-free head turns it into one row of A and one row of
B for each target module (modules in sorted name order). Learned per-(layer, rank) scalers
multiply A and B; a learned, context-independent rank-r "bias LoRA" is appended once per document
when chunk LoRAs are composed (api.py). With the official init (scaler_B = bias_B = 0)
the adapted model equals the base model exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from hyperlora_jax.errors import ConfigError
from hyperlora_jax.hypernet.d2l.perceiver import (
    PROJ_BLOCK_TOKENS,
    Perceiver,
    PerceiverConfig,
    torch_linear_init,
)
from hyperlora_jax.models import transformer
from hyperlora_jax.models.config import TARGET_MODULES, ModelConfig, get_preset

CTX_ENCODER_TYPES = ("per_layer_activations", "early_exit")


@dataclasses.dataclass(frozen=True)
class D2LConfig:
    """Everything that fixes the hypernetwork's parameter shapes and how context is encoded."""

    num_layers: int  # L of the base model (one LoRA per layer)
    feature_size: int  # hidden size of the context encoder
    module_dims: tuple[tuple[str, int, int], ...]  # (module, d_in, d_out), sorted by module
    rank: int = 8
    lora_alpha: float = 2 * 8**1.5  # used directly: delta = alpha * (x A^T) B
    latent_size: int = 512
    n_latent_queries: int = 8
    num_blocks: int = 9
    num_self_attn_per_block: int = 0
    num_pre_head_layers: int = 1
    per_layer_processing: bool = True
    use_bias: bool = True
    # Context encoder: "per_layer_activations" (layer-to-layer, l2l) or "early_exit".
    ctx_encoder_type: str = "per_layer_activations"
    early_exit_layer: int | None = None  # early_exit: number of encoder layers (default L // 4)
    ctx_encoder_last_layer: int | None = None  # l2l with another encoder: keep layers[:this-1]
    # Initial value of every scaler_B entry. Official: 0, so the adapter starts as the base model
    # and the context path gets no CE gradient until the bias LoRA has moved B off zero (the
    # "context-blind floor" plateau); a small nonzero value lets the Perceiver learn from step 1.
    scaler_b_init: float = 0.0

    def __post_init__(self):
        if self.ctx_encoder_type not in CTX_ENCODER_TYPES:
            raise ConfigError(
                f"unknown ctx_encoder_type {self.ctx_encoder_type!r}; expected one of "
                f"{CTX_ENCODER_TYPES}"
            )
        names = [m for m, _, _ in self.module_dims]
        if not names:
            raise ConfigError("D2L needs at least one target module (e.g. 'down_proj')")
        if names != sorted(names) or len(set(names)) != len(names):
            raise ConfigError(f"module_dims must be sorted and unique by module name: {names}")
        bad = [m for m in names if m not in TARGET_MODULES]
        if bad:
            raise ConfigError(f"unknown target modules {bad}; expected names from {TARGET_MODULES}")

    @property
    def layer_to_layer(self) -> bool:
        return self.ctx_encoder_type == "per_layer_activations"

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(m for m, _, _ in self.module_dims)

    @property
    def d_in(self) -> dict[str, int]:
        return {m: i for m, i, _ in self.module_dims}

    @property
    def d_out(self) -> dict[str, int]:
        return {m: o for m, _, o in self.module_dims}

    @property
    def d_lora(self) -> int:
        return max(i + o for _, i, o in self.module_dims)

    @property
    def queries_per_layer(self) -> int:
        return len(self.module_dims) * self.rank

    def perceiver_config(self) -> PerceiverConfig:
        n_out = self.queries_per_layer
        if not self.layer_to_layer:
            n_out *= self.num_layers
        return PerceiverConfig(
            input_size=self.feature_size,
            latent_size=self.latent_size,
            n_latents=self.n_latent_queries,
            n_output_queries=n_out,
            num_blocks=self.num_blocks,
            num_self_attn_per_block=self.num_self_attn_per_block,
        )

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["module_dims"] = [list(x) for x in self.module_dims]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> D2LConfig:
        d = dict(d)
        if "lora_r" in d:  # checkpoints written before D2L and T2L shared one vocabulary
            d["rank"] = d.pop("lora_r")
        d["module_dims"] = tuple(tuple(x) for x in d["module_dims"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown D2L config fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def for_base(cls, base, modules=("down_proj",), ctx_hidden_size=None, **kw) -> D2LConfig:
        """A config for a base ModelConfig (module dims from it); kw overrides the defaults."""
        dims = tuple((m, *base.module_dims(m)) for m in sorted(modules))
        return cls(
            num_layers=base.num_layers,
            feature_size=ctx_hidden_size or base.hidden_size,
            module_dims=dims,
            **kw,
        )


def ctx_config_from_experiment(exp) -> ModelConfig | None:
    """The context encoder's ModelConfig of a cross-model experiment (`ctx_preset` or an inline
    `ctx_model_config`), None when the base model reads its own context."""
    if exp.get("ctx_preset"):
        return get_preset(exp.ctx_preset)
    if exp.get("ctx_model_config"):
        return ModelConfig(**dict(exp.ctx_model_config))
    return None


def configs_from_experiment(exp) -> tuple[Any, D2LConfig]:
    """(base ModelConfig, D2LConfig) from a configs/d2l.py experiment ConfigDict (features of
    the context encoder's width when it is another model)."""

    if exp.get("base_preset"):
        base = get_preset(exp.base_preset)
    else:
        base = ModelConfig(**dict(exp.base_model_config))
    h = dict(exp.hypernet)
    h["modules"] = tuple(h["modules"])
    ctx = ctx_config_from_experiment(exp)
    hcfg = D2LConfig.for_base(base, ctx_hidden_size=ctx.hidden_size if ctx else None, **h)
    encoder_layers(hcfg, ctx or base)  # the kept depth must give one map per base layer
    return base, hcfg


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def LayerNorm(name: str) -> nn.LayerNorm:  # noqa: N802
    """torch nn.LayerNorm: eps 1e-5, affine, two-pass variance."""
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)


class ResMLPPerLayer(nn.Module):
    """x + LN(Mix2_l(silu(Mix1_l(LN(x))))) with separate Mix weights per layer l (EinMix)."""

    num_layers: int
    d: int

    @nn.compact
    def __call__(self, x: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        """x [..., L, M, r, d]; with `layer`, x [..., 1, M, r, d] is that layer's alone."""
        L, d, h = self.num_layers, self.d, 4 * self.d  # noqa: N806
        w1 = _at(self.param("w1", _uniform(math.sqrt(3 / d)), (L, d, h)), layer)
        b1 = _at(self.param("b1", _uniform(math.sqrt(1 / d)), (L, h)), layer)
        w2 = _at(self.param("w2", _uniform(math.sqrt(3 / h)), (L, h, d)), layer)
        b2 = _at(self.param("b2", _uniform(math.sqrt(1 / h)), (L, d)), layer)
        y = LayerNorm(name="ln_in")(x)
        y = jnp.einsum("...lmrd,ldh->...lmrh", y, w1) + b1[:, None, None, :]
        y = nn.silu(y)
        y = jnp.einsum("...lmrh,lhd->...lmrd", y, w2) + b2[:, None, None, :]
        return x + LayerNorm(name="ln_out")(y)


def _at(w: jax.Array, layer: jax.Array | None) -> jax.Array:
    """A per-layer parameter [L, ...], or only `layer`'s entry as [1, ...]."""
    return w if layer is None else jax.lax.dynamic_slice_in_dim(w, layer, 1, 0)


class ResMLPShared(nn.Module):
    """x + LN(Linear(silu(Linear(LN(x))))) shared across layers (per_layer_processing=False)."""

    d: int

    @nn.compact
    def __call__(self, x, layer=None):  # layer: unused, the weights are every layer's
        y = LayerNorm(name="ln_in")(x)
        y = nn.Dense(
            4 * self.d,
            kernel_init=torch_linear_init,
            bias_init=_uniform(math.sqrt(1 / self.d)),
            name="fc1",
        )(y)
        y = nn.Dense(
            self.d,
            kernel_init=torch_linear_init,
            bias_init=_uniform(math.sqrt(1 / (4 * self.d))),
            name="fc2",
        )(nn.silu(y))
        return x + LayerNorm(name="ln_out")(y)


class PerModule(nn.Module):
    """One parameter per target module, stored as params[name][module]."""

    modules_shapes: tuple[tuple[str, tuple[int, ...], Any], ...]  # (module, shape, init)

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        return {m: self.param(m, init, shape) for m, shape, init in self.modules_shapes}


def _normal(std: float):
    return nn.initializers.normal(std)


class HyperLoRA(nn.Module):
    """The whole D2L hypernetwork. __call__ = batched generation from context features.

    features: l2l [N, L, T, H] or early-exit [N, T, H]; mask [N, T] (True = real token).
    Returns per-chunk (A, B) dicts: A[m] [N, L, r, d_in], B[m] [N, L, r, d_out].
    """

    config: D2LConfig
    dtype: jnp.dtype = jnp.float32  # Perceiver compute dtype (official: bf16 autocast)
    proj_block_tokens: int | None = PROJ_BLOCK_TOKENS  # Perceiver.proj_block_tokens

    def setup(self):
        c = self.config
        self.aggregator = Perceiver(c.perceiver_config(), self.dtype, self.proj_block_tokens)
        if c.per_layer_processing:
            self.pre_head = [
                ResMLPPerLayer(c.num_layers, c.latent_size, name=f"layers_{j}")
                for j in range(c.num_pre_head_layers)
            ]
        else:
            self.pre_head = [
                ResMLPShared(c.latent_size, name=f"layers_{j}")
                for j in range(c.num_pre_head_layers)
            ]
        n_mod, L, r = len(c.module_dims), c.num_layers, c.rank  # noqa: N806
        self.head = self.param(
            "head",
            _normal(0.5 / math.sqrt(c.latent_size + c.d_lora * r)),
            (L, n_mod, c.latent_size, c.d_lora),
        )
        self.bias_A = PerModule(
            tuple((m, (L, r, i), _normal(0.2 / math.sqrt(i * r))) for m, i, _ in c.module_dims)
        )
        self.bias_B = PerModule(
            tuple((m, (L, r, o), nn.initializers.zeros) for m, _, o in c.module_dims)
        )
        self.scaler_A = PerModule(tuple((m, (L, r), nn.initializers.ones) for m in c.modules))
        self.scaler_B = PerModule(
            tuple((m, (L, r), nn.initializers.constant(c.scaler_b_init)) for m in c.modules)
        )

    def __call__(self, features: jax.Array, mask: jax.Array):
        return self.loras_from_latents(self.aggregate(features, mask))

    def init_all(self, features: jax.Array, mask: jax.Array):
        """Touches every parameter (used by init)."""
        return self(features, mask), self.bias_lora()

    def project(self, features: jax.Array) -> jax.Array:
        """The Perceiver's token-wise input projection: [..., T, H] -> [..., T, latent_size]."""
        return self.aggregator.project(features)

    def aggregate(self, features: jax.Array, mask: jax.Array, projected: bool = False) -> jax.Array:
        """Batched Perceiver -> latents [N, L, M, r, d]; l2l: one segment per (layer, chunk).

        features: l2l [N, L, T, H] or early-exit [N, T, H]; projected=True: they are already
        `project`ed (last axis latent_size)."""
        c = self.config
        x = features if projected else self.project(features)
        n = x.shape[0]
        if c.layer_to_layer:
            L, t, d = x.shape[1:]  # noqa: N806
            x = jnp.swapaxes(x, 0, 1).reshape(L * n, t, d)  # layer-major, as official
            m = jnp.tile(mask, (L, 1))
            out = self.aggregator.resample(x, m)  # [(L N), M r, d]
            out = out.reshape(L, n, -1, out.shape[-1]).swapaxes(0, 1)
        else:
            out = self.aggregator.resample(x, mask)  # [N, L M r, d]
        return out.reshape(n, c.num_layers, len(c.module_dims), c.rank, c.latent_size)

    def aggregate_one_layer(
        self, features_l: jax.Array, mask: jax.Array, projected: bool = False
    ) -> jax.Array:
        """Perceiver on one layer's activations [N, T, H] (or projected [N, T, latent_size])
        -> [N, M, r, d] (iterative mode)."""
        c = self.config
        x = features_l if projected else self.project(features_l)
        out = self.aggregator.resample(x, mask)
        return out.reshape(x.shape[0], len(c.module_dims), c.rank, c.latent_size)

    # `layer` (an int scalar, may be traced) in the methods below: the latents are that one
    # layer's, [N, 1, M, r, d], and only its slice of each per-layer weight is read.
    def resmlp(self, latents: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        """The residual MLP blocks (f32) on latents [N, L, M, r, d]."""
        x = latents.astype(jnp.float32)
        for block in self.pre_head:
            x = block(x, layer)
        return x

    def head_inputs(self, latents: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        """ResMLP blocks then L2 normalisation (no eps) -> head input [N, L, M, r, d]."""
        x = self.resmlp(latents, layer)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def head_outputs(self, head_in: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        """Per-layer bias-free head -> [N, L, M, r, d_lora]."""
        return _head_matmul(head_in, _at(self.head, layer))

    def split_head(self, flat: jax.Array, layer: jax.Array | None = None):
        """Raw head output -> (A, B) dicts with the per-(layer, rank) scalers applied."""
        sa, sb = self.scaler_A(), self.scaler_B()
        a, b = {}, {}
        for j, (m, i, o) in enumerate(self.config.module_dims):
            a[m] = flat[:, :, j, :, :i] * _at(sa[m], layer)[None, :, :, None]
            b[m] = flat[:, :, j, :, i : i + o] * _at(sb[m], layer)[None, :, :, None]
        return a, b

    def loras_from_latents(self, latents: jax.Array, layer: jax.Array | None = None):
        x = self.head_outputs(self.head_inputs(latents, layer), layer)
        return self.split_head(x, layer)

    def loras_one_layer(self, features_l: jax.Array, mask: jax.Array, layer: jax.Array):
        """Everything for one layer l: its activations [N, T, H] -> (A, B) [N, 1, r, d]."""
        latents = self.aggregate_one_layer(features_l, mask)[:, None]
        return self.loras_from_latents(latents, layer)

    def bias_lora(self):
        """The learned context-independent LoRA: (A[m] [L, r, d_in], B[m] [L, r, d_out])."""
        return self.bias_A(), self.bias_B()


@jax.custom_vjp
def _head_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum("nlmrd,lmdo->nlmro"), with a backward that returns the head's gradient in the
    head's own [L, M, d, d_lora] layout: JAX's produced it as [L, d_lora, d] and every AdamW
    fusion then read its 32M entries transposed (~0.5 s of a 4.4 s training step, issue 22).
    The head goes first: with x first XLA:CPU copies the whole head transposed on every call
    (123 MB for the official hypernetwork, 5x slower)."""
    return jnp.einsum("lmdo,nlmrd->nlmro", w, x)


def _head_matmul_fwd(x, w):
    return _head_matmul(x, w), (x, w)


def _head_matmul_bwd(res, g):
    x, w = res
    return jnp.einsum("nlmro,lmdo->nlmrd", g, w), jnp.einsum("nlmrd,nlmro->lmdo", x, g)


_head_matmul.defvjp(_head_matmul_fwd, _head_matmul_bwd)


def encoder_layers(config: D2LConfig, ctx_config: ModelConfig) -> int:
    """How many decoder layers of the context model run: L-1 (l2l) or the early-exit depth."""
    if config.layer_to_layer:
        last = config.ctx_encoder_last_layer or ctx_config.num_layers
        k = last - 1
        if k + 1 != config.num_layers:
            raise ConfigError(
                f"l2l context encoder gives {k + 1} activation maps but the hypernetwork has "
                f"{config.num_layers} layers; set ctx_encoder_last_layer to the base model's depth"
            )
    else:
        k = config.early_exit_layer or ctx_config.num_layers // 4
    if not 1 <= k <= ctx_config.num_layers:
        raise ConfigError(f"context encoder depth {k} is outside [1, {ctx_config.num_layers}]")
    return k


def context_features(
    ctx_params: dict,
    ctx_config: ModelConfig,
    config: D2LConfig,
    tokens: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array | None = None,
    *,
    dtype=jnp.float32,
    remat_policy: str | None = None,
    image_embeddings: jax.Array | None = None,
    image_groups: jax.Array | None = None,
    zero_padding: bool = True,
) -> jax.Array:
    """The frozen context encoder: tokens [N, T] -> f32 l2l [N, L, T, H] or early exit [N, T, H].

    segment_ids [N, T]: 0 = padding (a bool mask works); a row may pack several chunks with
    their own segment numbers and positions (training), or hold one chunk (inference). l2l:
    entry l is the residual stream entering layer l, the last entry is final-normed (HF
    hidden_states of the model truncated to L-1 layers). Padded positions are zeroed unless
    zero_padding=False: the hypernetwork never reads them (its attention masks them out), and
    without the zeroing the features stay the one buffer the encoder wrote (internalize: one
    copy of the l2l features fewer, 67 MiB at 1,024 tokens on SmolLM2).
    image_embeddings / image_groups: a Gemma-3 VLM encoder reading images (transformer.forward);
    the activations over the image tokens are features like any others.
    """
    segment_ids = segment_ids.astype(jnp.int32)
    hs = transformer.forward(
        ctx_params,
        ctx_config,
        tokens,
        segment_ids=segment_ids,
        positions=positions,
        num_layers=encoder_layers(config, ctx_config),
        return_hidden_states=True,
        return_logits=False,
        dtype=dtype,
        remat_policy=remat_policy,
        image_embeddings=image_embeddings,
        image_groups=image_groups,
    ).hidden_states  # [N, k+1, T, H]
    real = segment_ids > 0
    if not zero_padding:
        return (hs if config.layer_to_layer else hs[:, -1]).astype(jnp.float32)
    if config.layer_to_layer:
        return jnp.where(real[:, None, :, None], hs, 0).astype(jnp.float32)
    return jnp.where(real[:, :, None], hs[:, -1], 0).astype(jnp.float32)


def init_params(config: D2LConfig, rng: jax.Array) -> dict:
    """Official-init hypernetwork params (f32) for `config`."""
    if config.layer_to_layer:
        feats = jnp.zeros((1, config.num_layers, 1, config.feature_size), jnp.float32)
    else:
        feats = jnp.zeros((1, 1, config.feature_size), jnp.float32)
    mask = jnp.ones((1, 1), bool)
    return HyperLoRA(config).init(rng, feats, mask, method=HyperLoRA.init_all)["params"]


def count_params(config: D2LConfig) -> int:
    """Number of hypernetwork parameters, from shapes only (jax.eval_shape, nothing allocated)."""
    shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def project_features(params: dict, config: D2LConfig, features: jax.Array, *, dtype=jnp.float32):
    """The Perceiver's token-wise input projection alone: [..., T, H] -> [..., T, latent_size].

    Training runs it on the packed context features [B, (L,) Tc, H], before chunk rows are cut
    out (far fewer tokens than padded chunk rows), then generate_chunk_loras(projected=True).
    Below f32 it runs in one shot (no lax.map blocks): the blocked gradient, a scan of small
    weight-gradient matmuls, made the bf16 step 4x slower there (issue 22); f32 keeps the blocks
    (measured as fast, and its parity tests exact as before).
    """
    blk = PROJ_BLOCK_TOKENS if jnp.dtype(dtype) == jnp.float32 else None
    model = HyperLoRA(config, dtype, blk)
    return model.apply({"params": params}, features, method=HyperLoRA.project)


# Layers per Perceiver pass in batched inference (l2l): lax.map over groups of this many layers
# bounds the Perceiver's activations (official hypernetwork, 1,024 tokens, f32: 1.2 GB of XLA
# temporaries with all 30 layers at once) without slowing it: its weights are shared by every
# layer, so a group of layers is already one tall matmul.
LAYER_GROUP = 8


def generate_chunk_loras(
    params: dict,
    config: D2LConfig,
    features: jax.Array,
    mask: jax.Array,
    *,
    iterative: bool = False,
    layer_group: int = LAYER_GROUP,
    dtype=jnp.float32,
    projected: bool = False,
):
    """Per-chunk LoRAs from context features: (A[m] [N, L, r, d_in], B[m] [N, L, r, d_out]).

    features: l2l [N, L, T, H] or early-exit [N, T, H], mask [N, T]; projected=True: features
    are already project_features outputs (last axis latent_size).
    l2l runs the Perceiver over `layer_group` layers at a time with lax.map, over one layer at a
    time with iterative=True (the official iterative mode), or over all at once with
    layer_group=0 (training: a lax.map would put a scan in the gradient); same result each way.
    """
    model = HyperLoRA(config, dtype)
    v = {"params": params}
    group = 1 if iterative else layer_group
    if group and config.layer_to_layer:
        per_layer = jax.lax.map(
            lambda f: model.apply(v, f, mask, projected, method=HyperLoRA.aggregate_one_layer),
            jnp.swapaxes(features, 0, 1),
            batch_size=group if group > 1 else None,
        )  # [L, N, M, r, d]
        latents = jnp.swapaxes(per_layer, 0, 1)
    else:
        latents = model.apply(v, features, mask, projected, method=HyperLoRA.aggregate)
    return model.apply(v, latents, method=HyperLoRA.loras_from_latents)


def streamed_chunk_loras(
    params: dict,
    config: D2LConfig,
    ctx_params: dict,
    ctx_config: ModelConfig,
    tokens: jax.Array,
    mask: jax.Array,
    *,
    dtype=jnp.float32,
    image_embeddings: jax.Array | None = None,
    image_groups: jax.Array | None = None,
):
    """The iterative mode (l2l), streamed: token chunks [N, T] -> (A, B) [N, L, r, d], with the
    Perceiver, ResMLP and head run on each layer's activations inside the frozen encoder's layer
    scan, as it produces them. The official iterative mode (and generate_chunk_loras) first
    materialises all L layers' features: the same LoRAs, but that stack is the mode's largest
    buffer (67 MiB at 1,024 tokens on SmolLM2); streamed, memory is one layer's activations."""
    model = HyperLoRA(config, dtype)
    v = {"params": params}

    def one_layer(h, i):
        a, b = model.apply(v, h.astype(jnp.float32), mask, i, method=HyperLoRA.loras_one_layer)
        return jax.tree.map(lambda x: x[:, 0], (a, b))

    out = transformer.forward(
        ctx_params,
        ctx_config,
        tokens,
        segment_ids=mask.astype(jnp.int32),
        num_layers=encoder_layers(config, ctx_config),
        return_logits=False,
        dtype=dtype,
        image_embeddings=image_embeddings,
        image_groups=image_groups,
        layer_fn=one_layer,
    ).layer_outputs  # [L, N, r, d]
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out)


def bias_lora(params: dict, config: D2LConfig):
    return HyperLoRA(config).apply({"params": params}, method=HyperLoRA.bias_lora)
