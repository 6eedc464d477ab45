"""Issue 10 machinery: oracle / multi-task LoRA libraries trained with the SFT loss, the LM head
restricted to label positions, reconstruction from a library, and `eval t2l-suite`."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from hyperlora_jax.hypernet.t2l.model import T2LConfig  # noqa: E402
from hyperlora_jax.hypernet.t2l.model import init_params as t2l_init  # noqa: E402
from hyperlora_jax.models import transformer  # noqa: E402
from hyperlora_jax.models.testing import tiny_config  # noqa: E402
from hyperlora_jax.train import (
    build,  # noqa: E402
    t2l_loss,  # noqa: E402
)

ROOT = Path(__file__).parents[1]
E = 16


def _setup(vocab=40):
    cfg = tiny_config(vocab_size=vocab)
    tcfg = T2LConfig(
        modules=("q_proj", "v_proj"),
        in_features=(32, 32),
        out_features=(32, 16),
        num_layers=2,
        task_emb_size=E,
        latent_size=16,
        head_in_size=32,
    )
    return cfg, transformer.init_params(cfg, jax.random.key(0)), tcfg


def _batch(rng, rows=3, length=12, vocab=40):
    tokens = rng.integers(4, vocab, size=(rows, length)).astype(np.int32)
    seg = np.ones((rows, length), np.int32)
    seg[0, -3:] = 0  # right padding on one row
    mask = np.zeros((rows, length), bool)
    mask[0, 5:9] = True
    mask[1, 8:12] = True
    mask[2, 2:4] = True
    return {
        "task_embs": rng.normal(size=(rows, E)).astype(np.float32),
        "task_index": np.array([2, 0, 2], np.int32),
        "tokens": tokens,
        "segment_ids": seg,
        "loss_mask": mask,
        "sample_valid": np.ones(rows, bool),
    }


def test_lm_head_at_label_positions_gives_the_same_loss():
    cfg, base, tcfg = _setup()
    params = t2l_init(tcfg, jax.random.key(1))
    batch = _batch(np.random.default_rng(0))
    key = jax.random.key(2)
    full = t2l_loss.make_t2l_sft_loss(tcfg, cfg, label_smoothing=0.1)(params, base, batch, key, 3)
    part = t2l_loss.make_t2l_sft_loss(tcfg, cfg, label_smoothing=0.1, max_label_len=4)(
        params, base, batch, key, 3
    )
    np.testing.assert_allclose(float(part[0]), float(full[0]), rtol=1e-5)
    np.testing.assert_allclose(float(part[1]["main_loss"]), float(full[1]["main_loss"]), rtol=1e-5)


def test_task_emb_noise_is_gaussian_noise_on_the_embeddings():
    """train.task_emb_noise=s: the loss is the noiseless loss on embeddings + s * N(0, 1) (drawn
    from the step's key), and differs from the loss without noise."""
    cfg, base, tcfg = _setup()
    params = t2l_init(tcfg, jax.random.key(1))
    leaves, tree = jax.tree.flatten(params)  # the SFT init's zero head ignores the embedding
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    batch = _batch(np.random.default_rng(0))
    key = jax.random.key(2)
    noisy = t2l_loss.make_t2l_sft_loss(tcfg, cfg, task_emb_noise=0.3)(params, base, batch, key, 3)
    clean = t2l_loss.make_t2l_sft_loss(tcfg, cfg)
    drawn = jax.random.normal(jax.random.fold_in(key, 2), batch["task_embs"].shape)
    moved = {**batch, "task_embs": batch["task_embs"] + 0.3 * np.asarray(drawn)}
    np.testing.assert_allclose(float(noisy[0]), float(clean(params, base, moved, key, 3)[0]), 1e-5)
    assert abs(float(noisy[0]) - float(clean(params, base, batch, key, 3)[0])) > 1e-4


def test_lora_library_row_uses_its_own_task_adapter():
    cfg, base, tcfg = _setup()
    lib = build.lora_library_init(tcfg, cfg, 3, jax.random.key(3))
    lib["b"] = {m: 0.1 * jax.random.normal(jax.random.key(4), x.shape) for m, x in lib["b"].items()}
    batch = _batch(np.random.default_rng(1))
    loss = t2l_loss.make_lora_library_loss(
        tcfg,
        cfg,
        label_smoothing=0.0,
        l2_coef=0.0,
        neftune_alpha=0.0,
        dtype=jnp.float32,
        remat_policy=None,
        max_label_len=None,
    )
    key = jax.random.key(0)
    together = float(loss(lib, base, batch, key, 3)[0])
    alone = 0.0
    for i, t in enumerate(batch["task_index"]):  # each row with a one-adapter library
        one = jax.tree_util.tree_map(lambda x, t=t: x[t : t + 1], lib)
        row = {k: v[i : i + 1] for k, v in batch.items()}
        row["task_index"] = np.zeros(1, np.int32)
        alone += float(loss(one, base, row, key, 1)[0])
    np.testing.assert_allclose(together, alone / 3, rtol=1e-5)
    fresh = dict(lib, b=jax.tree_util.tree_map(jnp.zeros_like, lib["b"]))  # B = 0: no-op LoRAs
    assert abs(float(loss(fresh, base, batch, key, 3)[0]) - together) > 1e-3


def test_eval_prompt_is_the_training_row_up_to_the_answer(tmp_path):
    from hyperlora_jax.data import sni, task_suite
    from hyperlora_jax.eval.suite import prompt_and_answer
    from hyperlora_jax.models.fetch import fetch_model
    from hyperlora_jax.models.tokenizer import load_tokenizer

    tok = load_tokenizer(fetch_model("smollm2-135m-instruct"))
    suite = task_suite.write_suite(tmp_path / "suite", n_train=2, n_valid=1, n_test=2)
    for name in ("acronym", "add", "kebab_case"):
        task = sni.load_task(Path(suite) / name, split="test")
        ex = task.examples[0]
        prompt, response = sni.render_prompt_response(task.metadata, ex, tok)
        ids, labels = sni.tokenize_pair(tok, prompt, response)
        p_ids, answer = prompt_and_answer(task.metadata, ex, tok)
        rest = tok(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        assert p_ids + rest == ids and answer == ex["answer"]
        assert labels[len(p_ids) - 3 :][:3] == ids[len(p_ids) - 3 : len(p_ids)]  # header is label
        with_desc, _ = prompt_and_answer(task.metadata, ex, tok, "Make an acronym.")
        assert "Make an acronym." in tok.decode(with_desc)


@pytest.mark.slow
def test_oracles_recon_multitask_and_suite_eval_from_the_cli(tmp_path, capsys):
    """The whole issue-10 pipeline on a tiny random model with SmolLM2's tokenizer."""
    from test_train_cli import _tiny_base_with_smollm2_tokenizer

    from hyperlora_jax.cli import main
    from hyperlora_jax.data import task_suite
    from hyperlora_jax.lora.storage import load_adapter, load_safetensors, read_adapter_meta

    base = _tiny_base_with_smollm2_tokenizer(
        tmp_path / "base",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    suite = task_suite.write_suite(tmp_path / "suite", n_train=4, n_valid=1, n_test=2)
    common = [
        "--config.base_model_config.vocab_size=49152",
        "--config.base_model_config.family=llama",
        "--config.base_model_config.num_layers=2",
        "--config.train.n_descs_per_ds=2",
        "--config.train.inp_max_len=96",
        "--config.train.max_label_len=48",
        f"--data={suite}",
        f"--base_model={base}",
    ]

    def train(name, *flags, error=None):
        work = tmp_path / f"work_{name}"
        args = ["train", "--config", f"{ROOT}/configs/t2l.py:tiny", f"--workdir={work}"]
        if error:  # a clear message, exit status 2, nothing trained
            assert main(args + common + list(flags)) == 2
            assert error in capsys.readouterr().err and not (work / "checkpoints").exists()
            return None
        assert main(args + common + list(flags)) == 0
        assert main(["export-run", f"--workdir={work}", f"--out={tmp_path / name}"]) == 0
        return tmp_path / name

    n_tasks = len(task_suite.TASKS)
    lib_flags = ["--config.train.objective=lora", "--config.train.steps=2"]
    train(
        "bad",
        *lib_flags,
        "--config.train.num_adapters=3",
        "--config.train.tasks=all",
        error=f"num_adapters=3 but {suite} has {n_tasks} tasks",
    )
    oracles = train(
        "oracles", *lib_flags, f"--config.train.num_adapters={n_tasks}", "--config.train.tasks=all"
    )
    splits = yaml.safe_load((Path(suite) / "splits.yaml").read_text())
    assert read_adapter_meta(oracles)["tasks"] == splits["train"] + splits["held_out"]
    assert load_adapter(oracles).a["q_proj"].shape == (n_tasks, 2, 8, 64)
    multitask = train("multitask", *lib_flags)
    train(
        "bad2",
        "--config.train.objective=recon",
        "--config.train.steps=2",
        error="needs train.oracle_library",
    )
    recon = train(  # the smollm2_recon options: factorized L1 on z-scores of the library
        "recon",
        "--config.train.objective=recon",
        "--config.train.steps=2",
        f"--config.train.oracle_library={oracles}",
        "--config.hypernet.factorized=True",
        "--config.hypernet.pred_z_score=True",
        "--config.hypernet.head_use_bias=False",
    )
    lib = load_adapter(oracles)
    rows = [read_adapter_meta(oracles)["tasks"].index(t) for t in splits["train"]]
    consts = load_safetensors(recon / "constants.safetensors")
    want = np.asarray(lib.b["v_proj"])[rows]
    np.testing.assert_allclose(consts["mean.b.v_proj"], want.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(consts["std.b.v_proj"], want.std(0, ddof=1), rtol=1e-5, atol=1e-9)
    out = tmp_path / "eval"
    args = ["eval", "t2l-suite", f"--base={base}", f"--suite={suite}", f"--oracles={oracles}"]
    args += [f"--multitask={multitask}", f"--t2l=recon={recon}", "--seen-tasks=1", "--limit=2"]
    args += ["--descriptions=1", "--batch-size=16", f"--out={out}"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["groups"]) == {"held_out", "seen"}
    assert res["modes"] == ["base", "base_desc", "oracle", "multitask", "recon", "recon_random"]
    assert "recon_random" not in res["groups"]["seen"]  # the probe runs on held-out tasks
    assert (out / "accuracy_by_mode.png").stat().st_size > 0
    # on a mesh (1 device here: the sharded code path), the same answers
    assert main([*args[:-1], "--modes=base,oracle,t2l", "--mesh=data=1,fsdp=1,tensor=1",
                 f"--out={tmp_path / 'mesh'}"]) == 0  # fmt: skip
    on_mesh = json.loads((tmp_path / "mesh" / "results.json").read_text())
    for task, modes in on_mesh["samples"].items():
        assert modes == {m: res["samples"][task][m] for m in modes}
