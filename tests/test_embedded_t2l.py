"""The shipped T2L for SmolLM2-135M-Instruct reproduces its model-card numbers on a subset of the
suite's tasks (same generator, same test examples, same descriptions, greedy decoding), the
demo's Text-to-LoRA part runs, and `generate-adapter --peft` works with no flags but the task."""

import json

import numpy as np
import pytest

from hyperlora_jax.embedded import EMBEDDED_T2L

pytestmark = pytest.mark.slow
CARD = json.loads((EMBEDDED_T2L / "eval_summary.json").read_text())


@pytest.fixture(scope="module")
def smollm2():
    from hyperlora_jax.models.fetch import fetch_model
    from hyperlora_jax.models.hf import load_hf_model
    from hyperlora_jax.models.tokenizer import load_tokenizer

    path = fetch_model("smollm2-135m-instruct")
    config, params = load_hf_model(path)
    return config, params, load_tokenizer(path)


def _matches_card(smollm2, suite, checkpoint, card, modes):
    """Evaluate `checkpoint` on the card's test subset; every mode within one answer of the card
    (greedy, but other rows share the batches). Returns the per-task results."""
    from hyperlora_jax.eval.suite import evaluate_suite
    from hyperlora_jax.hypernet.t2l.api import TextToLoRA

    config, params, tok = smollm2
    res = evaluate_suite(
        params,
        config,
        tok,
        suite,
        tasks=card["test_subset"],
        t2ls={"t2l": TextToLoRA.from_checkpoint(checkpoint)},
        n_examples=card["n_examples"],
        n_descriptions=card["n_descriptions"],
        random_probe=False,
        modes=modes,
        progress=False,
    )["tasks"]
    for t in card["test_subset"]:
        for m in modes:
            got, want = res[t][m], card["tasks"][t][m]
            assert abs(got - want) <= 1.01 / card["n_examples"], (t, m, got, want)
    return res


def test_suite_numbers_match_the_model_card(smollm2, tmp_path):
    from hyperlora_jax.data import task_suite

    suite = task_suite.write_suite(tmp_path / "suite")  # the classic suite's defaults
    res = _matches_card(smollm2, suite, EMBEDDED_T2L, CARD, ("base", "base_desc", "t2l"))
    seen = [t for t, g in CARD["test_subset"].items() if g == "seen"]
    gain = np.mean([res[t]["t2l"] - res[t]["base_desc"] for t in seen])
    assert gain >= 0.3, gain  # unseen descriptions of training tasks: T2L >> the prompt


def test_universe_t2l_numbers_match_its_model_card(smollm2, tmp_path):
    """The task-universe T2L on a subset of both held-out sets and of its training tasks, in the
    prompt layout it was trained with (`data task-suite --definition description`)."""
    from hyperlora_jax.data import task_universe
    from hyperlora_jax.embedded import UNIVERSE_T2L

    card = json.loads((UNIVERSE_T2L / "eval_summary.json").read_text())
    meta = json.loads((UNIVERSE_T2L / "t2l.json").read_text())
    assert meta["prompt_definition"] == card["definition"] == "description"
    suite = task_universe.write_universe(tmp_path / "universe", definition=card["definition"])
    res = _matches_card(smollm2, suite, UNIVERSE_T2L, card, ("base", "t2l"))
    held = [t for t, g in card["test_subset"].items() if g.startswith("held_out")]
    assert np.mean([res[t]["t2l"] for t in held]) >= 0.6  # tasks it never trained on


def test_demo_t2l_part_runs(capsys):
    """`make demo`'s T2L part: the universe T2L on a held-out task of set (a), against its card."""
    from hyperlora_jax.cli.demo import run_t2l_demo
    from hyperlora_jax.embedded import UNIVERSE_T2L

    card = json.loads((UNIVERSE_T2L / "eval_summary.json").read_text())
    rows = run_t2l_demo()
    out = capsys.readouterr().out
    assert "T2L adapter" in out and len(rows) >= 3
    right = sum(r["T2L adapter"] == r["expected"] for r in rows)
    told = sum(r["description in prompt"] == r["expected"] for r in rows)
    assert right >= card["demo_min_correct"] and right > told, rows


def test_generate_adapter_peft_with_the_shipped_default(tmp_path):
    from hyperlora_jax.cli import main
    from hyperlora_jax.hypernet.t2l.api import TextToLoRA
    from hyperlora_jax.lora.peft import import_peft

    desc = "Join the words with hyphens."
    out = tmp_path / "peft"
    assert main(["generate-adapter", "--task", desc, "--peft", "--out", str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg["use_rslora"] and cfg["r"] == 8 and (out / "config.json").is_file()
    got = import_peft(out)
    want = TextToLoRA.from_checkpoint(EMBEDDED_T2L).generate([desc])
    assert abs(got.scale - want.scale) < 1e-6
    for m in want.modules:
        np.testing.assert_allclose(np.asarray(got.a[m]), np.asarray(want.a[m][0]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(got.b[m]), np.asarray(want.b[m][0]), atol=1e-6)
