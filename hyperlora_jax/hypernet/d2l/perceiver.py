"""D2L's Perceiver aggregator (the official `Idefics2Perceiver` variant), in Flax Linen.

Context activations [N, T, H] (one row per (layer, chunk) segment, padding masked) are projected
to the latent width by a SwiGLU MLP, compressed by an encoder of cross-attention blocks over
learned latents, then read out by a one-block decoder with `n_output_queries` learned queries.
Differences from upstream Idefics2 that matter for parity: keys/values come from the context
only, no positional encodings anywhere, RMSNorm is plain `w * x / rms(x)` (eps 1e-6), attention is
GQA with 16 x 128 query heads and 4 kv heads regardless of the latent width.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from hyperlora_jax.errors import ConfigError
from hyperlora_jax.precision import matmul

# PyTorch nn.Linear default init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    """Shape of one Perceiver (encoder + decoder). Defaults are the official Idefics2 ones."""

    input_size: int  # hidden size of the context encoder (H_ctx)
    latent_size: int = 512  # d
    n_latents: int = 8  # encoder latent queries
    n_output_queries: int = 8  # decoder queries (r per module in l2l mode, L*r otherwise)
    num_blocks: int = 9  # encoder cross-attention blocks
    num_self_attn_per_block: int = 0  # latent self-attention layers after each block
    n_heads: int = 16
    head_dim: int = 128
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    intermediate_factor: int = 4  # SwiGLU widths: 4 * input_size (projection), 4 * d (blocks)

    def __post_init__(self):
        if self.n_heads % self.num_kv_heads:
            raise ConfigError(
                f"perceiver n_heads={self.n_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.num_blocks < 1:
            raise ConfigError(f"perceiver num_blocks must be >= 1, got {self.num_blocks}")


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: w * x / sqrt(mean(x^2) + eps), w starts at 1 (not Gemma's 1 + w)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (w * y.astype(x.dtype)).astype(x.dtype)


# Tokens per lax.map step of the modality projection: keeps its [tokens, 4H] SwiGLU
# activations in cache instead of materialising [N, T, 4H] (~1.5x faster on CPU, far less memory).
PROJ_BLOCK_TOKENS = 256


class _Kernel(nn.Module):
    """A bias-free linear layer's kernel [d_in, d_out] (same tree as nn.Dense: {'kernel': w})."""

    shape: tuple[int, int]

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", torch_linear_init, self.shape, jnp.float32)


def _matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x @ w with inputs in `dtype` and f32 accumulation (bf16 inputs run ~1.85x the f32 rate
    on this project's Zen 4 CPU, benchmarks/harness.py; accumulating in f32 keeps the sums exact
    to f32 rounding); precision.matmul gives bf16 a backward that runs at the bf16 rate too."""
    return matmul(x, w, dtype).astype(dtype)


class Dense(nn.Module):
    """Bias-free nn.Dense replacement (params {'kernel'}) that accumulates in f32."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("kernel", torch_linear_init, (x.shape[-1], self.features), jnp.float32)
        return _matmul(x, w, self.dtype)


def _dense(features: int, name: str, dtype) -> Dense:
    return Dense(features, dtype, name=name)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), bias-free. block_tokens: run over the flattened tokens in
    blocks of this many with lax.map (same result; bounded intermediate memory)."""

    hidden: int
    out: int
    dtype: jnp.dtype = jnp.float32
    block_tokens: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, dt = x.shape[-1], self.dtype
        wg = _Kernel((d, self.hidden), name="gate_proj")()
        wu = _Kernel((d, self.hidden), name="up_proj")()
        wd = _Kernel((self.hidden, self.out), name="down_proj")()

        def f(z):
            return _matmul(nn.silu(_matmul(z, wg, dt)) * _matmul(z, wu, dt), wd, dt)

        lead = x.shape[:-1]
        n = math.prod(lead)
        blk = self.block_tokens
        if blk is None or n <= blk:
            return f(x)
        nb = -(-n // blk)
        flat = jnp.pad(x.reshape(n, d), ((0, nb * blk - n), (0, 0)))
        # Forward only (inference) this is ~1.5x faster than one shot; bf16 training passes
        # None (Perceiver.proj_block_tokens, model.project_features).
        y = jax.lax.map(f, flat.reshape(nb, blk, d)).reshape(nb * blk, self.out)
        return y[:n].reshape(*lead, self.out)


class PerceiverAttention(nn.Module):
    """Non-causal GQA attention of latents [N, Q, d] over kv_input [N, S, d] with kv_mask [N, S]."""

    cfg: PerceiverConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array, kv_input: jax.Array, kv_mask: jax.Array | None):
        c, dt, f32 = self.cfg, self.dtype, jnp.float32
        n, q_len, _ = latents.shape
        s, d_kv = kv_input.shape[1:]
        groups = c.n_heads // c.num_kv_heads
        # Query head h uses kv head h // groups (flash-attn / repeat_kv convention).
        nkv, hd = c.num_kv_heads, c.head_dim
        q = _dense(c.n_heads * hd, "q_proj", dt)(latents)
        wk = _Kernel((d_kv, nkv * hd), name="k_proj")()
        wv = _Kernel((d_kv, nkv * hd), name="v_proj")()
        # Batch dims leading ([n, kv, g*q, hd] x [n, kv, s, hd]): plain batched matmuls on CPU.
        q = q.reshape(n, q_len, nkv, groups, hd).transpose(0, 2, 3, 1, 4)
        q = q.reshape(n, nkv, groups * q_len, hd)
        x = kv_input.astype(dt)
        # A kv input narrower than a head (small latent_size) is cheaper unprojected:
        # q.(x W_k) = (q W_k^T).x and p.(x W_v) = (p.x) W_v contract the S-long products over
        # d_kv instead of head_dim (4x fewer FLOPs at latent_size 32). Same values.
        fold = d_kv < hd
        if fold:
            wk, wv = wk.astype(dt).reshape(d_kv, nkv, hd), wv.astype(dt).reshape(d_kv, nkv, hd)
            qk = jnp.einsum("nkqh,dkh->nkqd", q, wk, preferred_element_type=f32).astype(dt)
            scores = jnp.einsum("nkqd,nsd->nkqs", qk, x, preferred_element_type=f32)
        else:
            k = _matmul(x, wk, dt).reshape(n, s, nkv, hd).transpose(0, 2, 1, 3)
            scores = jnp.einsum("nkqh,nksh->nkqs", q, k, preferred_element_type=f32)
        scores = scores * (hd**-0.5)
        if kv_mask is not None:
            big_neg = jnp.finfo(jnp.float32).min
            scores = jnp.where(kv_mask[:, None, None, :], scores, big_neg)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        if fold:
            px = jnp.einsum("nkqs,nsd->nkqd", probs, x, preferred_element_type=f32).astype(dt)
            out = jnp.einsum("nkqd,dkh->nkqh", px, wv, preferred_element_type=f32)
        else:
            v = _matmul(x, wv, dt).reshape(n, s, nkv, hd).transpose(0, 2, 1, 3)
            out = jnp.einsum("nkqs,nksh->nkqh", probs, v, preferred_element_type=f32)
        out = out.reshape(n, nkv, groups, q_len, hd).transpose(0, 3, 1, 2, 4)
        out = out.reshape(n, q_len, c.n_heads * c.head_dim).astype(self.dtype)
        return _dense(latents.shape[-1], "o_proj", self.dtype)(out)


class PerceiverLayer(nn.Module):
    """Sandwich norms: lat += post_attn(attn(norm(lat), norm_ctx(ctx))); lat += post_ff(mlp(.))"""

    cfg: PerceiverConfig
    is_cross_attn: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, latents, context, context_mask):
        eps, d = self.cfg.rms_norm_eps, self.cfg.latent_size
        residual = latents
        lat = RMSNorm(eps, name="input_latents_layernorm")(latents)
        if self.is_cross_attn:
            kv, mask = RMSNorm(eps, name="input_context_layernorm")(context), context_mask
        else:
            kv, mask = lat, None
        lat = PerceiverAttention(self.cfg, self.dtype, name="self_attn")(lat, kv, mask)
        lat = residual + RMSNorm(eps, name="post_attention_layernorm")(lat)
        h = RMSNorm(eps, name="pre_ff_layernorm")(lat)
        h = SwiGLU(self.cfg.intermediate_factor * d, d, self.dtype, name="mlp")(h)
        return lat + RMSNorm(eps, name="post_ff_layernorm")(h)


class Resampler(nn.Module):
    """Learned latents refined by `num_blocks` cross-attention blocks over the context + RMSNorm."""

    cfg: PerceiverConfig
    n_latents: int
    num_blocks: int
    num_self_attn_per_block: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, context: jax.Array, context_mask: jax.Array | None) -> jax.Array:
        d = self.cfg.latent_size
        latents_q = self.param("latents_q", nn.initializers.normal(1.0), (self.n_latents, d))
        lat = jnp.broadcast_to(latents_q, (context.shape[0], self.n_latents, d))
        lat = lat.astype(self.dtype)
        i = 0
        for _ in range(self.num_blocks):
            layers = [True] + [False] * self.num_self_attn_per_block
            for is_cross in layers:
                layer = PerceiverLayer(self.cfg, is_cross, self.dtype, name=f"layers_{i}")
                lat = layer(lat, context, context_mask)
                i += 1
        return RMSNorm(self.cfg.rms_norm_eps, name="layernorm")(lat)


class Perceiver(nn.Module):
    """context [N, T, H], mask [N, T] (True = real token) -> [N, n_output_queries, d].

    Every row n is its own segment: its latents see only its own unmasked tokens.
    __call__ = resample(project(context)). The input projection is token-wise, so `project` can
    also run on packed context before chunk rows are cut out of it (training does: far fewer
    tokens than padded chunk rows).
    """

    cfg: PerceiverConfig
    dtype: jnp.dtype = jnp.float32
    # Modality projection block (SwiGLU.block_tokens); None = one shot over all tokens, which
    # bf16 training uses: the gradient of the blocked lax.map is a scan of small weight-gradient
    # matmuls whose stacked residuals XLA rewrites whole every step (issue 22: 4x slower in bf16;
    # f32 training keeps the blocks, measured as fast there).
    proj_block_tokens: int | None = PROJ_BLOCK_TOKENS

    def setup(self):
        c = self.cfg
        self.modality_projection = SwiGLU(
            c.intermediate_factor * c.input_size, c.latent_size, self.dtype, self.proj_block_tokens
        )
        self.encoder = Resampler(
            c, c.n_latents, c.num_blocks, c.num_self_attn_per_block, self.dtype
        )
        self.decoder = Resampler(c, c.n_output_queries, 1, 0, self.dtype)

    def __call__(self, context: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return self.resample(self.project(context), mask)

    def project(self, context: jax.Array) -> jax.Array:
        """Token-wise SwiGLU to the latent width: [..., H] -> [..., d] in the compute dtype."""
        return self.modality_projection(context.astype(self.dtype))

    def resample(self, projected: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Projected context [N, T, d], mask [N, T] -> [N, n_output_queries, d]."""
        return self.decoder(self.encoder(projected, mask), None)
