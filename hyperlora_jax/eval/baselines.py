"""D2L baselines: full context, no context (prompt builders) and the context-distillation oracle.

CD oracle (official `modeling/context_distillation.py`; D2L paper, section 4.2): a fresh LoRA
(r=8 on down_proj, alpha 16 -> scale 2, PEFT init: A ~ U(+-1/sqrt(d_in)), B = 0) is trained per
document so that the model *without* the document answers like the same model *with* it. The
teacher (LoRA off) sees `data.prompts.QA_PROMPT_TEMPLATE` (context, question) and greedily
answers; the student sees only the question. Loss: top-16 teacher probabilities (unrenormalised)
against the student's full softmax, averaged per response token. AdamW lr 1e-4 (torch defaults:
wd 0.01), cosine to 0 over iterations x batches, mini-batch 16, 300 epochs. The whole loop is one
`lax.scan`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hyperlora_jax.errors import InputError
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.models import transformer
from hyperlora_jax.models.config import ModelConfig
from hyperlora_jax.train.losses import topk_distill_ce

FULL_CONTEXT_TEMPLATE = "{context}\n\n{question}"  # base model with the document in the prompt


def full_context_prompt(context: str, question: str) -> str:
    """The official base-model baseline: context + "\\n\\n" + prompt."""
    return FULL_CONTEXT_TEMPLATE.format(context=context, question=question)


def middle_truncate(ids: Sequence[int], max_len: int) -> list[int]:
    """Keep the first and last halves when too long (official `--truncate_if_too_long_inp`)."""
    ids = list(ids)
    if len(ids) <= max_len:
        return ids
    half = max_len // 2
    return ids[:half] + ids[len(ids) - (max_len - half) :]


@dataclasses.dataclass(frozen=True)
class CDConfig:
    rank: int = 8
    alpha: float = 16.0
    modules: tuple[str, ...] = ("down_proj",)
    lr: float = 1e-4
    weight_decay: float = 0.01
    iterations: int = 300  # epochs over the document's questions
    batch_size: int = 16
    top_k: int = 16
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init_lora(config: ModelConfig, cd: CDConfig, rng: jax.Array) -> Adapter:
    """PEFT's default init: A kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(d_in)), B = 0."""
    a, b = {}, {}
    for i, m in enumerate(sorted(cd.modules)):
        d_in, d_out = config.module_dims(m)
        bound = 1.0 / math.sqrt(d_in)
        a[m] = jax.random.uniform(
            jax.random.fold_in(rng, i),
            (config.num_layers, cd.rank, d_in),
            jnp.float32,
            -bound,
            bound,
        )
        b[m] = jnp.zeros((config.num_layers, cd.rank, d_out), jnp.float32)
    return Adapter(a, b, cd.scale)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [N, T] and segment ids (1 real, 0 pad)."""
    t = max(len(s) for s in seqs)
    ids = np.full((len(seqs), t), pad_id, np.int32)
    seg = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        seg[i, : len(s)] = 1
    return ids, seg


def _response_logits(params, config, ids, seg, start, r: int, adapter=None):
    """Logits predicting the response tokens: positions start-1 .. start+r-2 -> [N, r, V]."""
    pos = jnp.clip(start[:, None] - 1 + jnp.arange(r)[None, :], 0, ids.shape[1] - 1)
    fwd = transformer.forward(params, config, ids, segment_ids=seg, adapter=adapter, logits_at=pos)
    return fwd.logits


def teacher_topk(
    params, config: ModelConfig, teacher_seqs, response_starts, response_lens, k: int = 16
):
    """Top-k log-probs/indices of the frozen teacher at each response token: [N, R, k] x 2."""
    ids, seg = pad_batch(teacher_seqs)
    start = jnp.asarray(response_starts, jnp.int32)
    r = int(max(response_lens))

    @jax.jit  # params are an argument: closed over, they would be baked into the program
    def run(params, ids, seg, start):
        pos = jnp.clip(start[:, None] - 1 + jnp.arange(r)[None, :], 0, ids.shape[1] - 1)
        fwd = transformer.forward(params, config, ids, segment_ids=seg, logits_at=pos)
        z = fwd.logits.astype(jnp.float32)
        vals, idx = jax.lax.top_k(z, k)
        return vals - jax.nn.logsumexp(z, axis=-1, keepdims=True), idx

    return run(params, jnp.asarray(ids), jnp.asarray(seg), start)


def distill(
    params,
    config: ModelConfig,
    student_seqs: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    response_lens: Sequence[int],
    teacher_logprobs: jax.Array,
    teacher_indices: jax.Array,
    cd: CDConfig = CDConfig(),
) -> tuple[Adapter, np.ndarray]:
    """Train a fresh LoRA on the student inputs (question + teacher response); returns the
    adapter and the mean loss of every epoch."""
    n = len(student_seqs)
    if n == 0:
        raise InputError("context distillation needs at least one question for the document")
    ids, seg = pad_batch(student_seqs)
    start = np.asarray(response_starts, np.int32)
    lens = np.asarray(response_lens, np.int32)
    r = int(lens.max())
    resp_mask = (np.arange(r)[None, :] < lens[:, None]).astype(np.float32)

    mb = min(cd.batch_size, n)
    n_batches = math.ceil(n / mb)
    steps = cd.iterations * n_batches
    rng = np.random.default_rng(cd.seed)
    idx = np.zeros((steps, mb), np.int32)
    wts = np.zeros((steps, mb), np.float32)
    for e in range(cd.iterations):
        perm = rng.permutation(n)
        for bi in range(n_batches):
            chunk = perm[bi * mb : (bi + 1) * mb]
            s = e * n_batches + bi
            idx[s, : len(chunk)] = chunk
            idx[s, len(chunk) :] = chunk[0]
            wts[s, : len(chunk)] = 1.0

    sched = optax.cosine_decay_schedule(cd.lr, max(steps, 1), alpha=0.0)
    tx = optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cd.weight_decay)
    lora0 = init_lora(config, cd, jax.random.key(cd.seed))
    data = tuple(jnp.asarray(x) for x in (ids, seg, start, resp_mask))
    tlp, tidx = jnp.asarray(teacher_logprobs), jnp.asarray(teacher_indices)

    def loss_fn(lora: Adapter, params, data, tlp, tidx, i, w):
        b_ids, b_seg, b_start, b_mask = (x[i] for x in data)
        z = _response_logits(params, config, b_ids, b_seg, b_start, r, adapter=lora)
        tok = topk_distill_ce(z, tlp[i], tidx[i])
        m = b_mask * w[:, None]
        return jnp.sum(tok * m) / jnp.maximum(jnp.sum(m), 1.0)

    @jax.jit  # everything is an argument: closed-over arrays would be baked into the program
    def train(lora, params, data, tlp, tidx, idx, wts):
        opt = tx.init(lora)

        def step(carry, xs):
            lora, opt = carry
            loss, g = jax.value_and_grad(loss_fn)(lora, params, data, tlp, tidx, *xs)
            upd, opt = tx.update(g, opt, lora)
            return (optax.apply_updates(lora, upd), opt), loss

        (lora, _), losses = jax.lax.scan(step, (lora, opt), (idx, wts))
        return lora, losses

    lora, losses = train(lora0, params, data, tlp, tidx, jnp.asarray(idx), jnp.asarray(wts))
    per_epoch = np.asarray(losses).reshape(cd.iterations, n_batches).mean(axis=1)
    return lora, per_epoch
