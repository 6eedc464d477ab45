"""Images as documents, end to end on tiny random models: a Gemma-3 VLM context encoder (tiny,
H=48, 4 layers, ctx_encoder_last_layer=3) reads an image; the D2L hypernetwork turns its
activations into a LoRA for a DIFFERENT, text-only base model (the tiny Gemma-2 fixture, H=64,
3 layers). The encoder activations over the image prompt equal transformers' (f32, 1e-4) and the
per-chunk LoRA equals the hypernetwork run on transformers' activations (rtol 1e-3, atol 1e-5,
the end-to-end D2L tolerance). Then the CLI (internalize --image) and the Imagenette eval.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from hyperlora_jax.api import load_d2l
from hyperlora_jax.cli import main as cli_main
from hyperlora_jax.errors import InputError
from hyperlora_jax.eval import imagenette
from hyperlora_jax.hypernet.d2l.api import DocToLoRA
from hyperlora_jax.hypernet.d2l.model import (
    D2LConfig,
    configs_from_experiment,
    context_features,
    generate_chunk_loras,
    init_params,
)
from hyperlora_jax.lora.storage import load_adapter
from hyperlora_jax.models import vision
from hyperlora_jax.models.hf import load_hf_model
from hyperlora_jax.models.testing import save_tiny_vlm
from hyperlora_jax.models.tokenizer import load_tokenizer
from hyperlora_jax.train.config_file import load_config


def _image(seed: int, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8))


@pytest.fixture(scope="module")
def cross(fixtures_dir, tmp_path_factory):
    """(d2l loaded from its checkpoint, the HF VLM, checkpoint folder, tmp folder)."""
    tmp = tmp_path_factory.mktemp("cross")
    base_dir = fixtures_dir / "official/d2l/tiny-gemma2"
    vlm = save_tiny_vlm(tmp / "vlm", tokenizer_dir=base_dir)
    base_cfg, base_params = load_hf_model(base_dir)
    exp = load_config("configs/d2l.py:tiny_vlm_ctx", ["--config.hypernet.scaler_b_init=1.0"])
    preset_base, cfg = configs_from_experiment(exp)  # the tiny cross-model preset fits these
    assert preset_base.module_dims("down_proj") == base_cfg.module_dims("down_proj")
    assert cfg == D2LConfig.for_base(
        base_cfg, ctx_hidden_size=48, ctx_encoder_last_layer=3, latent_size=16, num_blocks=1,
        n_latent_queries=4, scaler_b_init=1.0,
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(0))
    meta = {"base_model": str(base_dir), "ctx_encoder_model": str(tmp / "vlm")}
    ctx_cfg, ctx_params = load_hf_model(tmp / "vlm")
    d2l = DocToLoRA(
        cfg,
        params,
        base_params,
        base_cfg,
        load_tokenizer(base_dir),
        ctx_params=ctx_params,
        ctx_config=ctx_cfg,
        meta=meta,
    )
    d2l.save(tmp / "ckpt")
    for i, (cls, n) in enumerate((("n01440764", 2), ("golf_ball", 1))):
        (tmp / "imagenette" / cls).mkdir(parents=True)
        for j in range(n):
            _image(10 * i + j).save(tmp / "imagenette" / cls / f"{j}.png")
    return load_d2l(tmp / "ckpt"), vlm, tmp / "ckpt", tmp


def test_encoder_activations_and_loras_match_transformers(cross):
    d2l, vlm, _, _ = cross
    assert d2l.ctx_vision is not None and d2l.ctx_config.hidden_size == 48
    assert d2l.base_config.family == "gemma2" and d2l.base_config.hidden_size == 64
    vcfg = d2l.ctx_vision[0]
    ids = d2l.image_document_ids(1)
    tok = d2l.ctx_tokenizer
    at = ids.index(vcfg.boi_token_id)  # the official template around the processor's expansion
    assert tok.decode(ids[:at]) == "<bos><start_of_turn>user\n\n\n\n\n"
    assert ids[at : at + 6] == vision.image_token_block(vcfg)
    assert tok.decode(ids[at + 6 :]) == "\n\n<end_of_turn>\n<start_of_turn>model\n"

    img = _image(0)
    pixels = vision.preprocess_images([img], vcfg)
    tokens = np.asarray([ids])
    groups = vision.image_groups(tokens, vcfg)
    _, soft = vision.encode_images(d2l.ctx_vision[1], vcfg, jnp.asarray(pixels))
    embeds = vision.scatter_soft_tokens(jnp.asarray(tokens), soft, vcfg.image_token_id)
    mask = jnp.ones(tokens.shape, bool)
    feats = context_features(
        d2l.ctx_params,
        d2l.ctx_config,
        d2l.config,
        jnp.asarray(tokens),
        mask,
        image_embeddings=embeds,
        image_groups=jnp.asarray(groups),
    )
    with torch.no_grad():  # the official encoder: 2 layers kept, last entry final-normed
        hs = vlm(
            input_ids=torch.from_numpy(tokens),
            pixel_values=torch.from_numpy(pixels),
            token_type_ids=torch.from_numpy((groups > 0).astype(np.int64)),
            output_hidden_states=True,
        ).hidden_states
        ref = torch.stack([hs[0], hs[1], vlm.model.language_model.norm(hs[2])], 1).numpy()
    np.testing.assert_allclose(np.asarray(feats), ref, rtol=1e-4, atol=1e-4)

    a_ref, b_ref = generate_chunk_loras(d2l.params, d2l.config, jnp.asarray(ref), mask)
    ad = d2l.internalize(images=[img])
    r = d2l.config.rank
    assert ad.a["down_proj"].shape == (3, 2 * r, 128)  # the base's layers, chunk + bias ranks
    np.testing.assert_allclose(
        np.asarray(ad.a["down_proj"][:, :r]),
        np.asarray(a_ref["down_proj"][0]),
        rtol=1e-3,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(ad.b["down_proj"][:, :r]),
        np.asarray(b_ref["down_proj"][0]),
        rtol=1e-3,
        atol=1e-5,
    )


def test_image_adapter_changes_the_text_only_base(cross):
    d2l, _, _, _ = cross
    q = jnp.asarray([d2l.query_ids("What is in the image?")])
    base = np.asarray(d2l.logits(q))
    one, two = d2l.internalize(images=[_image(1)]), d2l.internalize(images=[_image(2)])
    with_text = d2l.internalize("a red square", images=[_image(1)])
    two_images = d2l.internalize(images=[_image(1), _image(2)])
    assert two_images.rank == one.rank  # one document, one chunk: rank r + bias r
    l1, l2 = np.asarray(d2l.logits(q, one)), np.asarray(d2l.logits(q, two))
    assert np.abs(l1 - base).max() > 1e-3 and np.abs(l1 - l2).max() > 1e-4
    for other in (with_text, two_images):
        assert np.abs(np.asarray(other.a["down_proj"] - one.a["down_proj"])).max() > 1e-5


def test_images_need_a_vision_encoder_and_readable_files(cross, tmp_path):
    d2l, _, _, _ = cross
    text_only = DocToLoRA(
        d2l.config,
        d2l.params,
        d2l.base_params,
        d2l.base_config,
        d2l.tokenizer,
        ctx_params=d2l.ctx_params,
        ctx_config=d2l.ctx_config,
    )
    with pytest.raises(InputError, match="no vision tower"):
        text_only.internalize(images=[_image(0)])
    with pytest.raises(InputError, match="does not exist"):
        d2l.internalize(images=[tmp_path / "nope.jpg"])
    with pytest.raises(InputError, match="past the context encoder's sliding window of 64"):
        d2l.internalize(images=[_image(0)] * 12)  # 12 x 8 tokens: image attention inexact there


def test_cli_internalize_image(cross, tmp_path, capsys):
    d2l, _, ckpt, _ = cross
    _image(3).save(tmp_path / "cat.png")
    out = tmp_path / "adapter"
    rc = cli_main(
        [
            "internalize",
            "--hypernet",
            str(ckpt),
            "--image",
            str(tmp_path / "cat.png"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    got = load_adapter(out)
    want = d2l.internalize(images=[tmp_path / "cat.png"])
    np.testing.assert_allclose(np.asarray(got.a["down_proj"]), np.asarray(want.a["down_proj"]))
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["source"]["images"] == [str(tmp_path / "cat.png")]
    (tmp_path / "bad.jpg").write_bytes(b"\x89PNG broken")
    for argv, msg in (
        (["--image", str(tmp_path / "missing.png")], "does not exist"),
        (["--image", str(tmp_path / "bad.jpg")], "cannot read image"),
        ([], "nothing to internalize"),
    ):
        rc = cli_main(["internalize", "--hypernet", str(ckpt), "--out", str(tmp_path / "x"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0]
        assert not (tmp_path / "x").exists()


def test_official_answer_scoring():
    cases = {
        "Chainsaw.": "chain saw",
        "It is an English Springer Spaniel": "English springer",
        "a gas station pump": "gas pump",
        "Tench (a fish)": "tench",
        "golf-ball": "golf ball",
        "The image shows a CHURCH": "church",
        "horn": "French horn",  # no alias, no full class: closest name
        "parachute": "parachute",
    }
    for answer, name in cases.items():
        assert imagenette.CLASS_NAMES[imagenette.predicted_class(answer)] == name, answer


def test_eval_d2l_images_cli(cross, tmp_path, capsys):
    _, _, ckpt, tmp = cross
    out = tmp_path / "eval"
    argv = [
        "eval",
        "d2l-images",
        "--hypernet",
        str(ckpt),
        "--images",
        str(tmp / "imagenette"),
        "--max-new-tokens",
        "3",
        "--batch",
        "2",
        "--out",
        str(out),
    ]
    assert cli_main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    s = res["summary"]
    assert s["n"] == 3 and set(s["per_class"]) == {"tench", "golf ball"}
    assert np.asarray(s["confusion"]).sum() == 3 and s["prompt"] == imagenette.PROMPT
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["label_name"] for r in rows] == ["golf ball", "tench", "tench"]
    assert all(r["pred"] == imagenette.predicted_class(r["answer"]) for r in rows)
    assert s["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 3)
    assert "| tench | 2 |" in printed and (out / "confusion.png").stat().st_size > 5000
    (tmp_path / "bad" / "cats").mkdir(parents=True)
    argv[argv.index("--images") + 1] = str(tmp_path / "bad")
    assert cli_main(argv) == 2
    assert "no Imagenette class" in capsys.readouterr().err


def test_cross_model_presets_build():
    """(Training them: tests/test_train_cross_model.py.)"""
    _, big = configs_from_experiment(load_config("configs/d2l.py:gemma2_2b_vlm_ctx", []))
    assert (big.feature_size, big.num_layers, big.ctx_encoder_last_layer) == (2560, 26, 26)


def test_official_cross_encoder_config_binds_the_vlm(cross, fixtures_dir):
    """An official checkpoint's pickled configs with the cross-encoder fields of
    train-cross-enc-slurm.sh (ctx_encoder_model_name_or_path, ctx_encoder_last_layer = the base's
    depth, feature_size = the encoder's width) parse to a D2L bound to the VLM it names, which
    reads images."""
    from hyperlora_jax.convert.official_d2l import CONFIG_KEYS, parse_config
    from hyperlora_jax.convert.safe_unpickle import load_torch_file, to_plain

    _, _, _, tmp = cross
    sd = load_torch_file(fixtures_dir / "official/d2l/pytorch_model.bin")
    plain = {k: to_plain(sd[k]) for k in CONFIG_KEYS}
    plain["ctx_encoder_args"].update(
        ctx_encoder_model_name_or_path=str(tmp / "vlm"), ctx_encoder_last_layer=3
    )
    plain["hypernet_config"]["aggregator_config"]["feature_size"] = 48
    cfg, meta = parse_config(plain)
    assert (cfg.feature_size, cfg.ctx_encoder_last_layer) == (48, 3)
    base = fixtures_dir / "official/d2l/tiny-gemma2"
    d2l = DocToLoRA.from_params(cfg, init_params(cfg, jax.random.key(1)), meta, base)
    assert d2l.ctx_vision is not None and d2l.ctx_config.hidden_size == 48
    ad = d2l.internalize(images=[_image(5)])
    assert ad.a["down_proj"].shape == (3, 2 * cfg.rank, 128)
    assert np.isfinite(np.asarray(ad.a["down_proj"])).all()
