"""Loss terms and optimizer against PyTorch re-statements of the official formulas.

Reference: doc-to-lora trainer.py (DistillationTrainer.compute_loss, per_ctx_loss_kl, L1 term,
get_decay_parameter_names) and text-to-lora sft_trainer.py (compute_loss with label smoothing,
generated_w_l2_loss) / recon_trainer.py; HF schedules. Tolerances: 1e-5 relative (f32).
"""

import numpy as np
import pytest
import torch

from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.train import losses, optim

RNG = np.random.default_rng(0)


def _torch_topk_ce(logits, vals, idx):
    lse = torch.logsumexp(logits, -1, keepdim=True)
    sel = logits.gather(1, idx)
    return -(vals.exp() * (sel - lse)).sum(-1)


def test_topk_distill_ce_matches_official_formula():
    n, v, k = 7, 50, 16
    logits = RNG.normal(size=(n, v)).astype(np.float32) * 3
    idx = np.stack([RNG.choice(v, k, replace=False) for _ in range(n)])
    vals = np.log(RNG.dirichlet(np.ones(v), n)[np.arange(n)[:, None], idx]).astype(np.float16)
    want = _torch_topk_ce(torch.tensor(logits), torch.tensor(vals).float(), torch.tensor(idx))
    got = losses.topk_distill_ce(logits, vals, idx)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5)
    # unrenormalised: the teacher mass is < 1 and no entropy term is subtracted
    assert float(np.exp(vals.astype(np.float32)).sum(-1).max()) < 1.0


def test_per_context_average_matches_official_per_ctx_loss():
    # one packed row: ctx0 has QAs of 3 and 2 label tokens, ctx1 one QA of 4 tokens
    lens = [(2, 3), (1, 2), (3, 4)]  # (prompt tokens, label tokens) per QA
    ctx_of_qa = [0, 0, 1]
    pos, mask, qa, ctx = [], [], [], []
    for q, ((p, lab), c) in enumerate(zip(lens, ctx_of_qa)):
        pos += list(range(p + lab))
        mask += [0] * p + [1] * lab
        qa += [q] * (p + lab)
        ctx += [c] * (p + lab)
    tok_loss = RNG.uniform(size=len(pos)).astype(np.float32)
    mask = np.array(mask, bool)
    # official: loss is compact over label positions, split per QA, mean, then mean per context
    compact = tok_loss[mask]
    per_qa, start = [], 0
    for _, lab in lens:
        per_qa.append(compact[start : start + lab].mean())
        start += lab
    want = np.mean(per_qa[:2]) + per_qa[2]  # .sum() over contexts (divide by n_ctx outside)
    got = losses.per_context_loss_sum(
        tok_loss[None], mask[None], np.array(qa)[None], np.array(ctx)[None], 5, 3
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_cross_entropy_label_smoothing_per_sample_mean_matches_t2l():
    b, t, v, eps = 3, 6, 11, 0.1
    logits = RNG.normal(size=(b, t, v)).astype(np.float32)
    labels = RNG.integers(0, v, size=(b, t))
    labels_t = torch.tensor(labels)
    labels_t[:, :2] = -100  # prompt
    labels_t[2, 4:] = -100  # padding
    # official compute_loss(equally_weight_sample=True)
    sl, st = torch.tensor(logits)[:, :-1], labels_t[:, 1:]
    seq_len = (st != -100).sum(-1, keepdim=True)
    ce = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=eps)
    per = ce(sl.reshape(-1, v), st.reshape(-1)).view(b, t - 1)
    want = ((per / seq_len).sum(-1)).mean().item()
    # ours: shift, per-token CE, per-sample mean summed, / num samples
    lab = np.where(labels_t.numpy() < 0, 0, labels_t.numpy())
    m = losses.shift_targets(labels_t.numpy() >= 0, False)
    y = losses.shift_targets(lab)
    tok = losses.cross_entropy(logits, y, eps)
    ids = np.broadcast_to(np.arange(b)[:, None], (b, t))
    got = losses.per_sample_loss_sum(tok, m, ids, b) / b
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def _adapter(n, modules=("down_proj", "q_proj")):
    a = {m: RNG.normal(size=(n, 3, 4, 5)).astype(np.float32) for m in modules}
    b = {m: RNG.normal(size=(n, 3, 4, 6)).astype(np.float32) for m in modules}
    return Adapter(a, b, 1.0)


def test_l1_and_l2_match_official_reductions():
    ad = _adapter(3)
    # D2L: sum_m (|A|.sum(0).mean() + |B|.sum(0).mean()) / n_modules
    want = sum(
        torch.tensor(ad.a[m]).abs().sum(0).mean() + torch.tensor(ad.b[m]).abs().sum(0).mean()
        for m in ad.modules
    ) / len(ad.modules)
    np.testing.assert_allclose(float(losses.adapter_l1_sum(ad)), want.item(), rtol=1e-5)
    # padding context removed by ctx_valid
    padded = Adapter(
        {m: np.concatenate([x, 9 + x[:1]]) for m, x in ad.a.items()},
        {m: np.concatenate([x, 9 + x[:1]]) for m, x in ad.b.items()},
        1.0,
    )
    got = losses.adapter_l1_sum(padded, np.array([1, 1, 1, 0]))
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)
    # T2L: sum_m mean(A^2) + mean(B^2)
    want2 = sum((ad.a[m] ** 2).mean() + (ad.b[m] ** 2).mean() for m in ad.modules)
    np.testing.assert_allclose(float(losses.adapter_l2_sum(ad)) / 3, want2, rtol=1e-5)


def test_neftune_bounds():
    import jax

    x = losses.neftune_noise(jax.random.key(0), (2, 16, 32), 5.0)
    mag = 5.0 / np.sqrt(16 * 32)
    assert float(np.abs(x).max()) <= mag and float(np.abs(x).max()) > 0.9 * mag


def test_recon_losses():
    a, b = RNG.normal(size=(2, 3, 4, 5)), RNG.normal(size=(2, 3, 4, 6))
    at, bt = RNG.normal(size=a.shape), RNG.normal(size=b.shape)
    want = (np.abs(a - at).mean() + np.abs(b - bt).mean()) / 2
    np.testing.assert_allclose(float(losses.recon_l1_factorized(a, b, at, bt)), want, rtol=1e-5)
    dw = np.einsum("...ro,...ri->...oi", b, a)
    dwt = np.einsum("...ro,...ri->...oi", bt, at)
    np.testing.assert_allclose(
        float(losses.recon_l1_dense(a, b, at, bt, 100.0)), np.abs(dw - 100 * dwt).mean(), rtol=1e-5
    )


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules_match_hf(name):
    from transformers.optimization import (
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    lr, total, warm, min_lr = 4e-5, 50, 10, 1e-7
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if name == "linear":
        hf = get_linear_schedule_with_warmup(opt, warm, total)
        ours = optim.make_schedule("linear", lr, total, warm)
    else:
        hf = get_cosine_with_min_lr_schedule_with_warmup(opt, warm, total, min_lr=min_lr)
        ours = optim.make_schedule("cosine", lr, total, warm, min_lr)
    for s in range(total):
        np.testing.assert_allclose(float(ours(s)), hf.get_last_lr()[0], rtol=1e-5, atol=1e-12)
        opt.step()
        hf.step()


def test_decay_mask_follows_official_exclusions():
    params = {
        "perceiver": {
            "encoder": {
                "latents_q": 1,
                "layers_0": {"input_latents_layernorm": {"scale": 1}, "q_proj": {"kernel": 1}},
            },
        },
        "resmlp_0": {"LayerNorm_0": {"scale": 1, "bias": 1}, "mix1": {"kernel": 1, "bias": 1}},
        "scaler_A": {"down_proj": 1},
        "bias_A": {"down_proj": 1},
        "head": {"kernel": 1},
    }
    mask = optim.decay_mask(params, optim.D2L_NO_DECAY)
    assert mask["perceiver"]["encoder"]["layers_0"]["q_proj"]["kernel"]
    assert mask["head"]["kernel"] and mask["resmlp_0"]["mix1"]["kernel"]
    assert not mask["perceiver"]["encoder"]["latents_q"]
    assert not mask["perceiver"]["encoder"]["layers_0"]["input_latents_layernorm"]["scale"]
    assert not mask["resmlp_0"]["LayerNorm_0"]["scale"] and not mask["resmlp_0"]["mix1"]["bias"]
    assert not mask["scaler_A"]["down_proj"] and not mask["bias_A"]["down_proj"]
    assert all(
        v
        for v in __import__("flax")
        .traverse_util.flatten_dict(optim.decay_mask(params, optim.T2L_NO_DECAY))
        .values()
    )


def test_adamw_step_matches_torch():
    w0 = RNG.normal(size=(4, 3)).astype(np.float32)
    grads = [RNG.normal(size=(4, 3)).astype(np.float32) * 3 for _ in range(3)]
    tx, _ = optim.make_optimizer(
        {"w": w0},
        lr=1e-2,
        total_steps=3,
        schedule="constant",
        weight_decay=0.1,
        no_decay=(),
        max_grad_norm=1.0,
    )
    import optax

    p, st = {"w": w0}, tx.init({"w": w0})
    for g in grads:
        u, st = tx.update({"w": g}, st, p)
        p = optax.apply_updates(p, u)
    tw = torch.nn.Parameter(torch.tensor(w0))
    topt = torch.optim.AdamW([tw], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    for g in grads:
        tw.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([tw], 1.0)
        topt.step()
    np.testing.assert_allclose(np.asarray(p["w"]), tw.detach().numpy(), rtol=1e-5, atol=1e-6)
