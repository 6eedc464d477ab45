"""Baselines: prompt builders, middle truncation, the CD oracle optimising on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax.data.prompts import QA_PROMPT_TEMPLATE
from hyperlora_jax.eval import baselines as B
from hyperlora_jax.models import transformer
from hyperlora_jax.models.testing import tiny_config

TINY = tiny_config(max_position_embeddings=256)


def test_prompt_builders_and_truncation():
    assert B.full_context_prompt("DOC", "Q?") == "DOC\n\nQ?"
    p = QA_PROMPT_TEMPLATE.format(context="DOC", question="Q?")
    assert p.startswith("# Provided Information\nDOC\n\n---\n\n# System Instruction\n")
    assert p.endswith("# User Input\nQ?")
    assert B.middle_truncate(list(range(10)), 4) == [0, 1, 8, 9]
    assert B.middle_truncate(list(range(5)), 7) == [0, 1, 2, 3, 4]
    assert B.middle_truncate(list(range(10)), 5) == [0, 1, 7, 8, 9]


def test_init_lora_is_peft_default():
    lora = B.init_lora(TINY, B.CDConfig(), jax.random.key(0))
    a, b = lora.a["down_proj"], lora.b["down_proj"]
    assert a.shape == (2, 8, 64) and b.shape == (2, 8, 32) and lora.scale == 2.0
    assert float(jnp.abs(a).max()) <= 1 / 8 and float(jnp.abs(b).max()) == 0.0


@pytest.mark.slow
def test_cd_oracle_reduces_distillation_loss_and_moves_student_to_teacher():
    params = transformer.init_params(TINY, jax.random.key(1))
    # larger weights -> peaked teacher distributions, so the document actually matters
    params = jax.tree.map(lambda x: x * 6 if x.ndim >= 2 else x, params)
    rng = np.random.default_rng(0)
    ctx = rng.integers(3, 64, 24).tolist()
    qs = [rng.integers(3, 64, 5).tolist() for _ in range(3)]
    resp = [rng.integers(3, 64, 4).tolist() for _ in range(3)]
    teacher = [ctx + q + r for q, r in zip(qs, resp)]
    student = [q + r for q, r in zip(qs, resp)]
    t_start = [len(ctx) + len(q) for q in qs]
    s_start = [len(q) for q in qs]
    lens = [len(r) for r in resp]
    tlp, tidx = B.teacher_topk(params, TINY, teacher, t_start, lens, k=16)
    assert tlp.shape == (3, 4, 16) and tidx.shape == (3, 4, 16)
    cd = B.CDConfig(iterations=30, lr=1e-2, batch_size=2)  # 2 mini-batches per epoch
    lora, per_epoch = B.distill(params, TINY, student, s_start, lens, tlp, tidx, cd)
    assert per_epoch.shape == (30,)
    # the loss floor is the teacher's own (top-16) cross-entropy; the gap above it must shrink
    floor = float(-(np.exp(tlp) * tlp).sum(-1).mean())
    assert per_epoch[-1] - floor < 0.3 * (per_epoch[0] - floor), (floor, per_epoch)

    ids, seg = B.pad_batch(student)
    start = jnp.asarray(s_start)

    def top1(adapter):
        z = B._response_logits(params, TINY, jnp.asarray(ids), jnp.asarray(seg), start, 4, adapter)
        return np.asarray(z.argmax(-1))

    agree = lambda p: float((p == np.asarray(tidx[..., 0])).mean())  # noqa: E731
    assert agree(top1(lora)) > agree(top1(None))
