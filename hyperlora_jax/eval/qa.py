"""D2L evaluation engine: QA files (SQuAD / DROP / ROPES / LongBench-like JSONL) and the methods
compared on them -- D2L (chunked internalization), base model with the document in the prompt
(middle-truncated to its window), base model without it, and the CD oracle.

Each answer is generated greedily (official: 256 new tokens) and scored with QA-F1 (closed QA,
LongBench normalisation) or ROUGE-L F1 (NIAH). Every stage is timed and its peak memory recorded
per example (trackers.py); adapter bytes and the KV-cache bytes the document would need in the
prompt are reported next to them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.data.prompts import QA_INSTRUCTION, QA_PROMPT_TEMPLATE, QASPER_INSTRUCTION
from hyperlora_jax.errors import ConfigError, InputError
from hyperlora_jax.eval import baselines, metrics
from hyperlora_jax.eval.trackers import StageTracker
from hyperlora_jax.hypernet.d2l import api as dl
from hyperlora_jax.hypernet.d2l.model import bias_lora, context_features, generate_chunk_loras
from hyperlora_jax.models import decoding
from hyperlora_jax.models import sharding as shd
from hyperlora_jax.models.chat import format_user_turn

METHODS = ("d2l", "full_context", "no_context", "cd_oracle")
QA_FORMATS = ("squad", "drop", "ropes", "longbench", "qasper", "plain")


@dataclass
class QAExample:
    context: str
    question: str  # the full user prompt sent to the model (instruction included)
    answers: list[str]
    metric: str = "qa_f1"  # "qa_f1" | "rougeL"
    meta: dict[str, Any] = field(default_factory=dict)


def _answers(v) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):
        for k in ("text", "spans"):
            if k in v:
                return [str(x) for x in v[k]]
    if isinstance(v, list):
        return [str(x) for x in v]
    raise InputError(f"cannot read answers from {v!r}")


def _from_row(row: dict, fmt: str, i: int, path: Path) -> QAExample:
    try:
        if fmt == "squad":
            ctx, q, ans = row["context"], row["question"], _answers(row["answers"])
        elif fmt == "drop":
            ctx, q = row["passage"], row["question"]
            ans = _answers(row.get("answers_spans", row.get("answers")))
        elif fmt == "ropes":
            ctx = row["background"] + "\n" + row["situation"]
            q, ans = row["question"], _answers(row["answers"])
        elif fmt in ("longbench", "qasper"):
            ctx, q, ans = row["context"], row["input"], _answers(row["answers"])
        else:  # plain: context / question / answers
            ctx, q, ans = row["context"], row["question"], _answers(row["answers"])
    except KeyError as e:
        raise InputError(f"{path}: row {i} has no field {e} required by the {fmt} format") from e
    template = QASPER_INSTRUCTION if fmt == "qasper" else QA_INSTRUCTION
    return QAExample(ctx, template.format(input=q), ans, "qa_f1", {"row": i, "raw_question": q})


def load_qa(path: str | Path, fmt: str = "squad", limit: int | None = None) -> list[QAExample]:
    """Read a local QA file (JSONL or a JSON list) in one of QA_FORMATS."""
    if fmt not in QA_FORMATS:
        raise ConfigError(f"unknown QA format {fmt!r}; choose from {', '.join(QA_FORMATS)}")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no QA file at {p}")
    text = p.read_text()
    try:
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as e:
        raise InputError(f"{p} is not JSONL/JSON: {e}") from e
    if not rows:
        raise InputError(f"{p} holds no examples")
    out = [_from_row(r, fmt, i, p) for i, r in enumerate(rows)]
    return out[:limit] if limit else out


def kv_cache_bytes(config, n_tokens: int, dtype=jnp.float32) -> int:
    """Bytes of the K and V cache the base model needs to hold n_tokens."""
    per_tok = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    return int(per_tok * n_tokens * jnp.dtype(dtype).itemsize)


def adapter_bytes(adapter) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(adapter)))


class D2LEvaluator:
    """Answers questions about documents with each method, tracking time and memory per stage.

    `d2l` is a hypernet.d2l.api.DocToLoRA (may be None when only baselines run); the base
    model is given explicitly so baselines work without a hypernetwork. mesh: a jax Mesh
    (`--mesh`): the base weights laid out by the training rules (give `d2l` the same mesh),
    a document's chunks and the prompts split over the batch axes; the same answers.
    """

    def __init__(
        self,
        base_params,
        base_config,
        tokenizer,
        d2l=None,
        *,
        chunk_size: int | None = 1024,
        max_new_tokens: int = 256,
        window: int | None = None,
        cd: baselines.CDConfig | None = None,
        iterative: bool = False,
        dtype=jnp.float32,
        prompt_multiple: int = 64,
        mesh: Any = None,
    ):
        self.mesh = mesh
        if mesh is not None:
            base_params = shd.shard_model_params(base_params, base_config, mesh)
        self.params, self.config, self.tok, self.d2l = base_params, base_config, tokenizer, d2l
        self.chunk_size = chunk_size
        self.max_new_tokens = max_new_tokens
        self.window = window or base_config.max_position_embeddings
        self.cd = cd or baselines.CDConfig()
        self.iterative = iterative
        self.dtype = dtype
        self.prompt_multiple = prompt_multiple
        self.tracker = StageTracker()
        self._jits: dict[str, Any] = {}

    # -- pieces
    def _user(self, text: str) -> list[int]:
        return format_user_turn(text, self.tok)

    def _generate(self, ids: Sequence[int], adapter, example: int, method: str) -> str:
        with self.tracker.stage("generation", example, method=method, prompt_tokens=len(ids)) as s:
            out = decoding.generate(
                self.params,
                self.config,
                [list(ids)],
                adapter=adapter,
                max_new_tokens=self.max_new_tokens,
                tokenizer=self.tok,
                dtype=self.dtype,
                pad_to_multiple=self.prompt_multiple,
                mesh=self.mesh,
            )
            s.done(out.tokens)
        return out.texts[0].strip()

    def internalize(self, context: str, example: int = 0):
        """D2L adapter for one document, with context encoding, hypernetwork and composition
        tracked as separate stages (each its own compiled program)."""

        d = self.d2l
        if d is None:
            raise ConfigError("method d2l needs a D2L checkpoint (--checkpoint)")
        chunks = d.chunk_document(context, self.chunk_size)
        tokens, mask = dl.pad_chunks(chunks, multiple=d.pad_multiple)
        if self.mesh is not None:  # the chunks over the batch axes (padded; cut after the hyp)
            m = shd.batch_multiple(self.mesh)
            tokens, mask = (shd.put_rows(shd.pad_rows(x, m), self.mesh) for x in (tokens, mask))
        if "enc" not in self._jits:
            self._jits["enc"] = jax.jit(
                lambda p, t, m: context_features(p, d.ctx_config, d.config, t, m, dtype=d.dtype)
            )
            self._jits["hyp"] = jax.jit(
                lambda p, f, m: generate_chunk_loras(
                    p, d.config, f, m, iterative=self.iterative, dtype=d.dtype
                )
            )
        extra = {"chunks": len(chunks), "doc_tokens": int(sum(len(c) for c in chunks))}
        with self.tracker.stage("context_encoding", example, **extra) as s:
            feats = s.done(self._jits["enc"](d.ctx_params, jnp.asarray(tokens), jnp.asarray(mask)))
        with self.tracker.stage("hypernetwork", example, **extra) as s:
            a, b = s.done(self._jits["hyp"](d.params, feats, jnp.asarray(mask)))
            a, b = jax.tree.map(lambda x: x[: len(chunks)], (a, b))
        del feats
        with self.tracker.stage("composition", example, **extra) as s:
            bias = bias_lora(d.params, d.config) if d.config.use_bias else None
            ad = dl.compose(a, b, [len(chunks)], d.config.lora_alpha, bias)
            ad = type(ad)(
                {m: x[0] for m, x in ad.a.items()}, {m: x[0] for m, x in ad.b.items()}, ad.scale
            )
            s.done(ad)
        return ad, len(chunks)

    def cd_oracle(self, context: str, questions: Sequence[str], example: int = 0):
        """Per-document LoRA by context distillation on the document's own questions."""
        teacher_prompts = [
            self._user(QA_PROMPT_TEMPLATE.format(context=context, question=q)) for q in questions
        ]
        with self.tracker.stage("cd_teacher_generate", example) as s:
            out = decoding.generate(
                self.params,
                self.config,
                teacher_prompts,
                max_new_tokens=self.max_new_tokens,
                tokenizer=self.tok,
                dtype=self.dtype,
                pad_to_multiple=self.prompt_multiple,
                mesh=self.mesh,
            )
            s.done(out.tokens)
        responses = [row[: int(n)].tolist() for row, n in zip(out.tokens, out.lengths)]
        self.last_teacher_answers = out.texts
        keep = [i for i, r in enumerate(responses) if r]
        if not keep:
            raise InputError("the CD teacher produced only empty responses")
        students = [self._user(questions[i]) for i in keep]
        t_seqs = [teacher_prompts[i] + responses[i] for i in keep]
        s_seqs = [students[j] + responses[i] for j, i in enumerate(keep)]
        lens = [len(responses[i]) for i in keep]
        with self.tracker.stage("cd_distill", example, questions=len(keep)) as s:
            tlp, tidx = baselines.teacher_topk(
                self.params,
                self.config,
                t_seqs,
                [len(teacher_prompts[i]) for i in keep],
                lens,
                self.cd.top_k,
            )
            lora, losses = baselines.distill(
                self.params,
                self.config,
                s_seqs,
                [len(x) for x in students],
                lens,
                tlp,
                tidx,
                self.cd,
            )
            s.done(lora)
        return lora, losses

    # -- one example, every method
    def answer(
        self,
        method: str,
        ex: QAExample,
        example: int = 0,
        cd_questions: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        rec: dict[str, Any] = {"method": method}
        if method == "d2l":
            ad, k = self.internalize(ex.context, example)
            rec.update(chunks=k, adapter_bytes=adapter_bytes(ad))
            rec["output"] = self._generate(self._user(ex.question), ad, example, method)
        elif method == "no_context":
            rec["output"] = self._generate(self._user(ex.question), None, example, method)
        elif method == "full_context":
            ids = self._user(baselines.full_context_prompt(ex.context, ex.question))
            limit = self.window - self.max_new_tokens
            rec["truncated"] = len(ids) > limit
            ids = baselines.middle_truncate(ids, limit)
            rec["prompt_tokens"] = len(ids)
            rec["kv_cache_bytes"] = kv_cache_bytes(self.config, len(ids) + self.max_new_tokens)
            rec["output"] = self._generate(ids, None, example, method)
        elif method == "cd_oracle":
            lora, losses = self.cd_oracle(ex.context, cd_questions or [ex.question], example)
            rec.update(
                adapter_bytes=adapter_bytes(lora),
                cd_loss_first=float(losses[0]),
                cd_loss_last=float(losses[-1]),
            )
            rec["output"] = self._generate(self._user(ex.question), lora, example, method)
        else:
            raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        rec["score"] = score(ex, rec["output"])
        rec["exact_match"] = metrics.exact_match(rec["output"], ex.answers)
        return rec

    def doc_tokens(self, context: str) -> int:
        return len(self._user(context))


def score(ex: QAExample, output: str) -> float:
    if ex.metric == "rougeL":
        return metrics.rouge_l_f1(output, ex.answers[0])
    return metrics.qa_f1(output, ex.answers)


def run(
    evaluator: D2LEvaluator,
    examples: Sequence[QAExample],
    methods: Sequence[str],
    length_key=None,
) -> list[dict[str, Any]]:
    """Every method on every example; one record per (example, method) with its length."""
    recs = []
    for i, ex in enumerate(examples):
        n = ex.meta.get("token_len") or evaluator.doc_tokens(ex.context)
        for m in methods:
            r = evaluator.answer(m, ex, i)
            r.update(
                example=i,
                length=int(n),
                answers=ex.answers,
                bin=ex.meta.get("bin") or (length_key(n) if length_key else None),
            )
            recs.append(r)
    return recs


def summarize(records: Sequence[dict[str, Any]], by_bin: bool = True) -> dict[str, Any]:
    """Mean score per method overall, per length bin (official overlapping LENGTH_BINS, or the
    records' own `bin` when set), plus mean memory figures."""
    out: dict[str, Any] = {}
    for m in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == m]
        entry: dict[str, Any] = {"score": float(np.mean([r["score"] for r in rs])), "n": len(rs)}
        if all("exact_match" in r for r in rs):
            entry["exact_match"] = float(np.mean([r["exact_match"] for r in rs]))
        if by_bin:
            if all(r.get("bin") for r in rs):
                bins: dict[str, list] = {}
                for r in rs:
                    bins.setdefault(r["bin"], []).append(r)
                entry["bins"] = {
                    b: {
                        "score": float(np.mean([r["score"] for r in v])),
                        "exact_match": float(np.mean([r.get("exact_match", 0.0) for r in v])),
                        "count": len(v),
                        "mean_length": float(np.mean([r["length"] for r in v])),
                    }
                    for b, v in sorted(bins.items(), key=lambda kv: _bin_lo(kv[0]))
                }
            else:
                entry["bins"] = metrics.per_length_bin(
                    [r["length"] for r in rs], [r["score"] for r in rs]
                )
        for k in ("adapter_bytes", "kv_cache_bytes"):
            vals = [r[k] for r in rs if k in r]
            if vals:
                entry[f"mean_{k}"] = float(np.mean(vals))
        out[m] = entry
    return out


def _bin_lo(label: str) -> float:
    try:
        return float(label.split("-")[0])
    except ValueError:
        return float("inf")
