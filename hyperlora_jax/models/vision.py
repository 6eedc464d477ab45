"""Gemma-3's vision side: SigLIP tower + multimodal projector, image preprocessing, image prompts.

image --preprocess (resize, rescale, normalise)--> pixels [N, C, S, S] --SigLIP (patch conv, L
pre-norm ViT layers, post LayerNorm)--> [N, P, Hv] --avg-pool to mm_tokens_per_image, RMSNorm,
project--> soft tokens [N, mm, H_text]. In the prompt each image is `\\n\\n<start_of_image>` +
mm image-placeholder tokens + `<end_of_image>\\n\\n`; the placeholders' embeddings are replaced by
the soft tokens (no sqrt(H) scale) and attend bidirectionally within their image
(`transformer.forward(image_embeddings=, image_groups=)`). That forward equals HF's while
every image ends before the sliding window (Gemma-3-4b: token 1,024): its sliding layers bound
an image token's window from the image's last token, HF's from the token itself.

Pure functions of a param tree (Flax Linen inside), loaded from the safetensors of HF
`Gemma3ForConditionalGeneration` (both the hub layout `vision_tower.vision_model.*` and the
transformers-5 layout `model.vision_tower.*`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import CheckpointError, ConfigError, InputError
from hyperlora_jax.models.config import load_hf_config

F32 = jnp.float32
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP tower + Gemma-3 projector sizes, image token ids and the processor's settings."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    text_hidden_size: int
    mm_tokens_per_image: int = 256
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    image_token_id: int = 262144
    boi_token_id: int = 255999
    eoi_token_id: int = 256000
    # Gemma3ImageProcessor: resize to image_size (PIL bilinear = 2), x / 255, (x - mean) / std.
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 2

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return int(round(self.mm_tokens_per_image**0.5))

    def __post_init__(self):
        if self.tokens_per_side**2 != self.mm_tokens_per_image:
            raise ConfigError(f"mm_tokens_per_image={self.mm_tokens_per_image} is not a square")
        if self.patches_per_side % self.tokens_per_side:
            raise ConfigError(
                f"{self.patches_per_side} patches per side do not pool evenly to "
                f"{self.tokens_per_side} tokens per side"
            )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def vision_config_from_hf(d: dict, preprocessor: dict | None = None) -> VisionConfig | None:
    """VisionConfig from a Gemma-3 config.json dict (and preprocessor_config.json), or None when
    the model has no vision tower (a text-only checkpoint)."""
    if d.get("model_type") != "gemma3" or not d.get("vision_config"):
        return None
    from transformers import Gemma3Config

    cfg = Gemma3Config(**{k: v for k, v in d.items() if k != "model_type"})
    v = cfg.vision_config
    if v.model_type != "siglip_vision_model":  # (a SigLIP pooling head, if any, is unused)
        raise ConfigError(f"unsupported vision tower {v.model_type!r} (expected SigLIP)")
    pre = dict(preprocessor or {})
    size = pre.get("size") or {}
    image_size = int(size.get("height", v.image_size))
    if pre.get("do_pan_and_scan"):
        raise ConfigError("pan & scan preprocessing is not supported; set do_pan_and_scan=false")
    kw = {}
    for key in ("image_mean", "image_std"):
        if pre.get(key) is not None:
            kw[key] = tuple(float(x) for x in pre[key])
    if pre.get("rescale_factor") is not None:
        kw["rescale_factor"] = float(pre["rescale_factor"])
    if pre.get("resample") is not None:
        kw["resample"] = int(pre["resample"])
    if image_size != v.image_size:
        raise ConfigError(
            f"preprocessor size {image_size} != vision image_size {v.image_size}; "
            "position embeddings are fixed to image_size"
        )
    return VisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        text_hidden_size=cfg.text_config.hidden_size,
        mm_tokens_per_image=cfg.mm_tokens_per_image,
        num_channels=v.num_channels,
        layer_norm_eps=float(v.layer_norm_eps),
        hidden_act=v.hidden_act,
        image_token_id=cfg.image_token_id,
        boi_token_id=cfg.boi_token_id,
        eoi_token_id=cfg.eoi_token_id,
        **kw,
    )


# ---------------------------------------------------------------------------------- the tower
def _layer_norm(name: str, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)  # torch: two-pass var


def _act(x: jax.Array, kind: str) -> jax.Array:
    if kind in ("gelu_pytorch_tanh", "gelu_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if kind == "gelu":
        return jax.nn.gelu(x, approximate=False)
    raise ConfigError(f"unsupported vision hidden_act {kind!r}")


class SiglipLayer(nn.Module):
    """Pre-LayerNorm ViT block: x + attn(LN1(x)); x + fc2(act(fc1(LN2(x)))), biases everywhere."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x, _):
        c = self.config
        b, n, h = x.shape
        nh, hd = c.num_heads, h // c.num_heads
        y = _layer_norm("ln1", c.layer_norm_eps)(x)
        q, k, v = (nn.Dense(h, name=f"{p}_proj")(y).reshape(b, n, nh, hd) for p in ("q", "k", "v"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32) * hd**-0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=F32).astype(x.dtype)
        x = x + nn.Dense(h, name="o_proj")(out.reshape(b, n, h))
        y = _layer_norm("ln2", c.layer_norm_eps)(x)
        y = nn.Dense(h, name="fc2")(
            _act(nn.Dense(c.intermediate_size, name="fc1")(y), c.hidden_act)
        )
        return x + y, None


class VisionTower(nn.Module):
    """pixels [N, C, S, S] -> (SigLIP last_hidden_state [N, P, Hv], soft tokens [N, mm, H])."""

    config: VisionConfig

    @nn.compact
    def __call__(self, pixels):
        c = self.config
        n, ch, s, _ = pixels.shape
        p, g = c.patch_size, c.patches_per_side
        # the stride-p conv as one matmul over flattened (C, p, p) patches, rows in raster order
        patches = pixels.reshape(n, ch, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
        x = nn.Dense(c.hidden_size, name="patch_embed")(patches.reshape(n, g * g, ch * p * p))
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (g * g, c.hidden_size))
        x = x + pos[None]
        x, _ = nn.scan(
            SiglipLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=c.num_layers,
        )(c, name="layers")(x, None)
        hidden = _layer_norm("post_norm", c.layer_norm_eps)(x)
        # projector: avg-pool patches to tokens_per_side^2, Gemma RMSNorm (1 + w), projection
        t = c.tokens_per_side
        k = g // t
        pooled = hidden.reshape(n, t, k, t, k, c.hidden_size).mean(axis=(2, 4))
        pooled = pooled.reshape(n, t * t, c.hidden_size).astype(F32)
        w = self.param("mm_norm", nn.initializers.zeros, (c.hidden_size,))
        normed = pooled * jax.lax.rsqrt(jnp.mean(pooled**2, -1, keepdims=True) + c.layer_norm_eps)
        normed = normed * (1.0 + w.astype(F32))
        proj = self.param(
            "mm_proj", nn.initializers.normal(0.02), (c.hidden_size, c.text_hidden_size)
        )
        soft = jnp.einsum("nth,ho->nto", normed, proj.astype(F32), preferred_element_type=F32)
        return hidden, soft.astype(hidden.dtype)


def init_vision_params(config: VisionConfig, rng: jax.Array) -> dict:
    """Random params (tests, shapes)."""
    x = jnp.zeros((1, config.num_channels, config.image_size, config.image_size), F32)
    return nn.unbox(VisionTower(config).init(rng, x)["params"])


@functools.partial(jax.jit, static_argnames=("config",))
def encode_images(params: dict, config: VisionConfig, pixels: jax.Array):
    """pixels [N, C, S, S] (preprocessed) -> (vision hidden [N, P, Hv], soft tokens [N, mm, H])."""
    pixels = jnp.asarray(pixels)
    want = (config.num_channels, config.image_size, config.image_size)
    if pixels.ndim != 4 or pixels.shape[1:] != want:
        raise InputError(f"pixels must be [N, {', '.join(map(str, want))}], got {pixels.shape}")
    return VisionTower(config).apply({"params": params}, pixels)


# ---------------------------------------------------------------------------------- loading
# Ours (under a layer: "layers/...") -> HF suffix after the tower prefix; (key, transpose).
_LAYER_KEYS = {
    ("ln1", "scale"): ("layer_norm1.weight", False),
    ("ln1", "bias"): ("layer_norm1.bias", False),
    ("ln2", "scale"): ("layer_norm2.weight", False),
    ("ln2", "bias"): ("layer_norm2.bias", False),
    **{
        (f"{p}_proj", leaf): (f"self_attn.{hf}.{leaf2}", leaf == "kernel")
        for p, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj"))
        for leaf, leaf2 in (("kernel", "weight"), ("bias", "bias"))
    },
    **{
        (fc, leaf): (f"mlp.{fc}.{leaf2}", leaf == "kernel")
        for fc in ("fc1", "fc2")
        for leaf, leaf2 in (("kernel", "weight"), ("bias", "bias"))
    },
}
_TOWER_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.",
                   "model.vision_tower.", "vision_tower.")  # fmt: skip
_PROJ_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def _hf_vision_key(path: tuple[str, ...]) -> tuple[str, str, bool]:
    """(tower|proj, HF key suffix, transpose) for one of our param paths."""
    if path[0] == "layers":
        key, tr = _LAYER_KEYS[path[1:]]
        return "tower", "encoder.layers.{i}." + key, tr
    if path == ("patch_embed", "kernel"):
        return "tower", "embeddings.patch_embedding.weight", False  # reshaped below
    if path == ("patch_embed", "bias"):
        return "tower", "embeddings.patch_embedding.bias", False
    if path == ("pos_embed",):
        return "tower", "embeddings.position_embedding.weight", False
    if path[0] == "post_norm":
        return "tower", "post_layernorm." + {"scale": "weight", "bias": "bias"}[path[1]], False
    if path == ("mm_norm",):
        return "proj", "mm_soft_emb_norm.weight", False
    if path == ("mm_proj",):
        return "proj", "mm_input_projection_weight", False
    raise KeyError(path)


def vision_params_from_getter(config: VisionConfig, keys: Sequence[str], get, source: str):
    """Our vision params from HF-named tensors (`get(name)` -> array)."""
    from hyperlora_jax.models.hf import _to_numpy, _unflatten

    rel: dict[tuple[str, str], str] = {}
    for k in keys:
        for kind, prefixes in (("tower", _TOWER_PREFIXES), ("proj", _PROJ_PREFIXES)):
            pre = next((p for p in prefixes if k.startswith(p)), None)
            if pre is not None:
                rel.setdefault((kind, k[len(pre) :]), k)
                break
    shapes = jax.eval_shape(lambda r: init_vision_params(config, r), jax.random.key(0))
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path = tuple(p.key for p in path)
        kind, template, transpose = _hf_vision_key(path)
        layers = range(config.num_layers) if path[0] == "layers" else [None]
        xs = []
        for i in layers:
            name = (kind, template.format(i=i))
            if name not in rel:
                raise CheckpointError(
                    f"{source}: missing vision tensor {name[1]!r}; is this a Gemma-3 "
                    "vision-language checkpoint (Gemma3ForConditionalGeneration)?"
                )
            x = _to_numpy(get(rel[name]))
            if path == ("patch_embed", "kernel"):  # [Hv, C, p, p] -> [C p p, Hv]
                x = x.reshape(x.shape[0], -1)
            xs.append(x.T if transpose or path == ("patch_embed", "kernel") else x)
        x = np.stack(xs) if path[0] == "layers" else xs[0]
        if tuple(x.shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"{source}: vision tensor {template!r} has shape {x.shape}, expected {leaf.shape}"
            )
        flat[path] = jnp.asarray(x)
    return _unflatten(flat)


def load_vision_model(path: str | Path) -> tuple[VisionConfig, dict] | None:
    """(VisionConfig, params) from a Gemma-3 VLM save_pretrained folder; None when the
    checkpoint has no vision tower (text-only models)."""
    from hyperlora_jax.models.hf import _open_safetensors

    folder = Path(path)
    d = load_hf_config(folder)
    pre_file = folder / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else None
    config = vision_config_from_hf(d, pre)
    if config is None:
        return None
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    handles = [_open_safetensors(folder / f) for f in files]
    owner = {k: h for h in handles for k in h.keys()}
    return config, vision_params_from_getter(
        config, list(owner), lambda k: owner[k].get_tensor(k), str(folder)
    )


# ---------------------------------------------------------------------------------- images
def _to_rgb(im):
    """RGB as the HF processor makes it: transparency composited onto white, not dropped."""
    from PIL import Image

    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def load_image(image: Any):
    """A PIL RGB image from a path, a PIL image or an [H, W, 3] uint8 array; InputError when the
    file is missing or not a readable image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise InputError(
                f"an image array must be [H, W, 3] uint8, got {image.shape} {image.dtype}"
            )
        return Image.fromarray(image)
    p = Path(image)
    if not p.is_file():
        raise InputError(f"image file {p} does not exist; pass the path of a PNG or JPEG file")
    try:
        with Image.open(p) as im:
            return _to_rgb(im)
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read image {p} ({e}); pass a PNG or JPEG file") from e


def preprocess_images(images: Sequence[Any], config: VisionConfig) -> np.ndarray:
    """Gemma3ImageProcessor without pan & scan: RGB, resize to image_size (PIL, `resample`),
    x * rescale_factor, (x - mean) / std, channels first -> f32 [N, C, S, S]."""
    from PIL import Image

    s = config.image_size
    mean = np.asarray(config.image_mean, np.float32)[:, None, None]
    std = np.asarray(config.image_std, np.float32)[:, None, None]
    out = []
    for im in images:
        im = load_image(im).resize((s, s), resample=Image.Resampling(config.resample))
        x = np.asarray(im, np.float32).transpose(2, 0, 1) * np.float32(config.rescale_factor)
        out.append((x - mean) / std)
    return np.stack(out).astype(np.float32)


# ---------------------------------------------------------------------------------- prompts
def image_token_block(config: VisionConfig) -> list[int]:
    """One image in the prompt: <start_of_image>, mm placeholders, <end_of_image>."""
    return (
        [config.boi_token_id]
        + [config.image_token_id] * config.mm_tokens_per_image
        + [config.eoi_token_id]
    )


def image_groups(tokens: np.ndarray, config: VisionConfig) -> np.ndarray:
    """[B, T] ints: k > 0 on the placeholders of the k-th image of a row (runs of
    image_token_id), 0 elsewhere (HF's block_sequence_ids + 1)."""
    tokens = np.asarray(tokens)
    is_img = tokens == config.image_token_id
    start = is_img & ~np.pad(is_img, ((0, 0), (1, 0)))[:, :-1]
    return np.where(is_img, np.cumsum(start, axis=1), 0).astype(np.int32)


def scatter_soft_tokens(tokens: jax.Array, soft: jax.Array, image_token_id: int) -> jax.Array:
    """[B, T, H]: the soft tokens [N, mm, H] written in order over the placeholders (row-major
    over the batch, as HF's masked_scatter), zeros elsewhere."""
    b, t = tokens.shape
    mask = (tokens == image_token_id).reshape(-1)
    flat = soft.reshape(-1, soft.shape[-1])
    idx = jnp.clip(jnp.cumsum(mask) - 1, 0, flat.shape[0] - 1)
    return jnp.where(mask[:, None], flat[idx], 0).reshape(b, t, -1)


def text_ids(tokens: np.ndarray, config: VisionConfig, vocab_size: int) -> np.ndarray:
    """Placeholder ids past the LM's vocabulary embed as 0 (HF does the same; they are replaced)."""
    tokens = np.asarray(tokens)
    if config.image_token_id >= vocab_size:
        return np.where(tokens == config.image_token_id, 0, tokens)
    return tokens
