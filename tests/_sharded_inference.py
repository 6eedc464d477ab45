"""Sharded inference on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices vs one device:
D2L internalize (chunked documents), logits and generated tokens with per-document adapters, T2L
adapters, the selfgen teacher (greedy answers + top-k log-probs) and the `eval d2l` evaluator's
adapter. Prints a JSON summary.
Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharded_inference.py)."""

import json
from pathlib import Path

import jax
import numpy as np
from absl import flags

flags.FLAGS.mark_as_parsed()
jax.config.update("jax_default_matmul_precision", "highest")

from hyperlora_jax.api import load_d2l  # noqa: E402
from hyperlora_jax.data import selfgen  # noqa: E402
from hyperlora_jax.eval import qa  # noqa: E402
from hyperlora_jax.hypernet.t2l.api import TextToLoRA  # noqa: E402
from hyperlora_jax.hypernet.t2l.model import T2LConfig  # noqa: E402
from hyperlora_jax.hypernet.t2l.model import init_params as t2l_init  # noqa: E402
from hyperlora_jax.models import decoding  # noqa: E402
from hyperlora_jax.models import sharding as shd  # noqa: E402

assert len(jax.devices()) == 8, jax.devices()
D2L = Path(__file__).parent / "fixtures" / "official" / "d2l"
DOCS = [
    "The Eiffel Tower in Paris was completed in 1889. It is 330 metres tall and made of iron.",
    "Marie Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911.",
    "The river Nile flows north through eleven countries into the Mediterranean Sea.",
]
QUESTIONS = ["How tall is the tower?", "When did she win?", "Where does it end?"]


def maxdiff(x, y):
    xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
    assert len(xs) == len(ys)
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(xs, ys))


def run(mesh):
    d2l = load_d2l(D2L / "pytorch_model.bin", base_model=D2L / "tiny-gemma2", mesh=mesh)
    ad = d2l.internalize(DOCS, chunk_size=12)  # 3 documents of several chunks each
    q = [d2l.query_ids(x) for x in QUESTIONS]
    qt, _ = decoding.left_pad(q, 0)
    logits = d2l.logits(qt, ad)
    gen = decoding.generate(
        d2l.base_params, d2l.base_config, q, adapter=ad, max_new_tokens=8, stop_ids=(), mesh=mesh
    )

    tcfg = T2LConfig(
        modules=("q_proj", "down_proj"), in_features=(64, 128), out_features=(64, 64),
        num_layers=3, task_emb_size=24, latent_size=16, head_in_size=16, head="M",
    )  # fmt: skip
    t2l = TextToLoRA(tcfg, t2l_init(tcfg, jax.random.key(0)), mesh=mesh)
    t2l_ad = t2l.generate(np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32))

    # the selfgen teacher: greedy answers, then its top-k log-probs of them
    tok = d2l.tokenizer
    prompts = [selfgen.teacher_prompt(tok, d, x).ids for d, x in zip(DOCS, QUESTIONS)]
    base = (d2l.base_params, d2l.base_config)
    gens = selfgen.make_jax_generate(*base, tok, batch_size=3, mesh=mesh)(prompts, 8)
    seqs = [p + g.tokens for p, g in zip(prompts, gens)]
    topk = selfgen.make_jax_topk(*base, k=16, batch_size=3, mesh=mesh)(
        seqs, [len(p) for p in prompts]
    )
    # eval d2l: the evaluator's adapter (its answers: decoding.generate, above)
    ev = qa.D2LEvaluator(
        d2l.base_params, d2l.base_config, tok, d2l, chunk_size=12, max_new_tokens=8, mesh=mesh
    )
    eval_adapter = ev.internalize(DOCS[1])[0]

    return d2l, {
        "eval_adapter": eval_adapter,
        "adapter": ad,
        "logits": logits,
        "tokens": gen.tokens,
        "t2l": t2l_ad,
        "teacher": [g.tokens for g in gens],
        "topk_vals": [v for v, _ in topk],
        "topk_idx": [i for _, i in topk],
    }


_, one = run(None)
mesh = shd.mesh_from_spec("data=2,fsdp=2,tensor=2")
d2l, eight = run(mesh)
a0 = next(iter(eight["adapter"].a.values()))
emb = [v for k, v in jax.tree_util.tree_leaves_with_path(d2l.base_params) if "embed" in str(k)]
res = {
    "adapter_shape": list(a0.shape),
    "adapter_diff": maxdiff(one["adapter"], eight["adapter"]),
    "adapter_scale": float(np.max(np.abs(np.asarray(a0)))),
    "logits_diff": maxdiff(one["logits"], eight["logits"]),
    "tokens_equal": bool(np.array_equal(one["tokens"], eight["tokens"])),
    "eval_adapter_diff": maxdiff(one["eval_adapter"], eight["eval_adapter"]),
    "t2l_diff": maxdiff(one["t2l"], eight["t2l"]),
    "t2l_shape": list(next(iter(eight["t2l"].a.values())).shape),
    "teacher_equal": one["teacher"] == eight["teacher"],
    "topk_vals_diff": maxdiff(one["topk_vals"], eight["topk_vals"]),
    "topk_idx_equal": all(np.array_equal(x, y) for x, y in zip(one["topk_idx"], eight["topk_idx"])),
    "embed_sharding": str(emb[0].sharding.spec),
    "n_devices_base": len(emb[0].sharding.device_set),
}
print("RESULT " + json.dumps(res))
