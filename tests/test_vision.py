"""Gemma-3 vision (models/vision.py) against transformers' Gemma3ForConditionalGeneration on a tiny
random configuration, f32, tolerance 1e-4 (atol and rtol): SigLIP last_hidden_state, projected
soft tokens, and the LM's per-layer hidden states over a prompt with two images (soft tokens in
place of the placeholders, bidirectional attention within each image). Preprocessing equals
transformers' Gemma3ImageProcessorPil on images made here.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hyperlora_jax.errors import CheckpointError, InputError
from hyperlora_jax.models import transformer
from hyperlora_jax.models.hf import load_hf_model
from hyperlora_jax.models.testing import save_tiny_vlm
from hyperlora_jax.models.vision import (
    VisionConfig,
    encode_images,
    image_groups,
    image_token_block,
    load_image,
    load_vision_model,
    preprocess_images,
    scatter_soft_tokens,
)

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-vlm")
    model = save_tiny_vlm(folder)
    return model, folder, load_vision_model(folder), load_hf_model(folder)


def _pixels(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 32, 32)).astype(np.float32)


def test_vision_tower_and_soft_tokens_match_transformers(vlm):
    model, _, (vcfg, vparams), _ = vlm
    pixels = _pixels(3)
    hidden, soft = encode_images(vparams, vcfg, jnp.asarray(pixels))
    with torch.no_grad():
        ref_hidden = model.model.vision_tower(pixel_values=torch.from_numpy(pixels))
        ref_soft = model.model.multi_modal_projector(ref_hidden.last_hidden_state)
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden.last_hidden_state.numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(soft), ref_soft.numpy(), **TOL)
    assert soft.shape == (3, 4, 48)


def test_lm_hidden_states_over_an_image_prompt_match_transformers(vlm):
    """Two images in one prompt: placeholders take the soft tokens; within an image attention is
    bidirectional (token_type_ids), across images causal; hidden states of every layer match."""
    model, _, (vcfg, vparams), (cfg, params) = vlm
    block = image_token_block(vcfg)
    ids = np.array([[2, 5, 6, *block, 7, *block, 8, 9, 10]], np.int64)  # bos, text, 2 images
    pixels = _pixels(2, seed=1)
    _, soft = encode_images(vparams, vcfg, jnp.asarray(pixels))
    groups = image_groups(ids, vcfg)
    assert groups.max() == 2 and (groups > 0).sum() == 8
    out = transformer.forward(
        params,
        cfg,
        jnp.asarray(ids),
        return_hidden_states=True,
        image_embeddings=scatter_soft_tokens(jnp.asarray(ids), soft, vcfg.image_token_id),
        image_groups=jnp.asarray(groups),
    )
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch.from_numpy(pixels),
            token_type_ids=torch.from_numpy((ids == vcfg.image_token_id).astype(np.int64)),
            output_hidden_states=True,
        )
    ref_hs = np.stack([h[0].numpy() for h in ref.hidden_states])
    np.testing.assert_allclose(np.asarray(out.hidden_states[0]), ref_hs, **TOL)
    np.testing.assert_allclose(np.asarray(out.logits[0]), ref.logits[0].numpy(), **TOL)
    # the mask matters: a causal-only run differs (so the test would see a missing overlay)
    causal = transformer.forward(
        params,
        cfg,
        jnp.asarray(ids),
        image_embeddings=scatter_soft_tokens(jnp.asarray(ids), soft, vcfg.image_token_id),
        image_groups=jnp.asarray(np.where(groups > 0, np.cumsum(groups > 0, 1), 0)),
    )
    assert np.abs(np.asarray(causal.logits) - np.asarray(out.logits)).max() > 1e-3


def test_preprocessing_equals_the_hf_processor(tmp_path):
    from PIL import Image
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:45, 0:70]
    images = [
        Image.fromarray(rng.integers(0, 256, (50, 37, 3), np.uint8)),  # noise, portrait
        Image.fromarray(  # smooth gradient, landscape
            np.stack([xx * 3, yy * 5, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)
        ),
        Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8)),  # grayscale
        Image.fromarray(rng.integers(0, 256, (24, 30, 4), np.uint8)),  # alpha
    ]
    images[1].save(tmp_path / "g.png")
    proc = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    ref = proc(images=images, return_tensors="np")["pixel_values"]
    vcfg = VisionConfig(
        hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, image_size=32,
        patch_size=4, text_hidden_size=8, mm_tokens_per_image=4,
    )  # fmt: skip
    got = preprocess_images(images, vcfg)
    assert got.shape == ref.shape == (4, 3, 32, 32)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(preprocess_images([tmp_path / "g.png"], vcfg), ref[1:2], atol=1e-6)


def test_bad_images_and_text_only_checkpoints(tmp_path, vlm):
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image .*bad.png"):
        load_image(tmp_path / "bad.png")
    # a text-only checkpoint has no vision tower: None, not an error
    from tiny_models import make_tiny_hf

    make_tiny_hf("gemma3")[0].save_pretrained(str(tmp_path / "text"))
    assert load_vision_model(tmp_path / "text") is None
    # a VLM config whose weights lack the tower
    _, folder, _, _ = vlm
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(folder, tmp_path / "cut")
    sd = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if "vision_tower" not in k},
              str(tmp_path / "cut" / "model.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointError, match="missing vision tensor"):
        load_vision_model(tmp_path / "cut")
