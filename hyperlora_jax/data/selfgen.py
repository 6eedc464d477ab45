"""Self-generated QA distillation data (official generate_fw_edu_qa_v2*.py, self_generate_qa.py).

1. Questions: an instruct model reads each document with the official question-generation prompt
   (5 QA pairs, regex-parsed), then a second "repeat" round that shows the first pairs as examples
   and asks for 5 new ones. `qg_prompt="compact"` (our addition) is for small instruct models
   such as SmolLM2-135M, which answer the long official prompt with no parsable pair: a short
   prompt, the assistant turn pre-filled with "Question 1:", and only the questions kept (the
   teacher writes the answers either way).
2. Teacher: the base model answers every question with the document in context (one user turn:
   system line + "# Provided Information" + document + instructions + "# User Input" + question),
   greedy; unfinished responses (no end-of-turn within max_new_tokens) are dropped. The top-k
   (k=16) log-probs of every response token come from a teacher forward pass.
3. Student view: the teacher token stream with the system line, document and instructions cut
   out (`all_ids[:sys_start] + all_ids[q_start:res_end]`) and the response span as labels.
Records use the official columns: ctx_ids, input_ids, response_start_end, logprobs_vals,
logprobs_indices (one list entry per QA of the document), plus the texts for inspection.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.data.prompts import QA_PROMPT_TEMPLATE, SELF_QA_INTX
from hyperlora_jax.data.storage import ErrorLog
from hyperlora_jax.errors import InputError
from hyperlora_jax.models import chat, decoding
from hyperlora_jax.models import sharding as shd
from hyperlora_jax.models.tokenizer import stop_token_ids
from hyperlora_jax.models.transformer import forward

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- official prompts
Q_GEN_SYSTEM = (
    "You are a creative and helpful assistant.\n"
    "You are tasked with generating questions for reading comprehension tests.\n"
    "You will be given a context and you need to generate questions and corresponding answers "
    "from the given context.\n"
    "The questions should be highly specific to the information provided in the context, not "
    "general questions that suit any context.\n"
    "**DO NOT** hallucinate or make up information."
)

_Q_HEAD = (
    "### Instructions ###\n"
    "Generate questions and corresponding answers from the given context. The questions should "
    "be highly specific to the information provided in the context, not general questions that "
    "suit any context.\n\n"
    "### Context ###\n"
    "{context}\n\n\n"
)
_NOT_ALLOWED = (
    "Phrases like 'based on the provided context', 'according to the context', 'in the "
    "context', etc., are **NOT ALLOWED** to appear in "
)
_ANSWER_RULES = (
    "Rules to follow when generating the answers:\n"
    "1. The answers must use the (implied) information provided in the context.\n"
    "2. " + _NOT_ALLOWED + "the answers.\n"
    "3. Do not just copy words from the context. Answer the question in your own words.\n"
    "4. The answers should be detailed and comprehensive. Please include additional specific "
    "details from the context.\n\n"
    "Respond with {n_qa_pairs} question-answer pairs.\n"
    "Always use proper grammar and punctuation.\n"
    "Try to use different question forms and styles.\n"
    "Use simple words and make sure that the answers are clear and comprehensive.\n\n"
    "The question-answer pairs should be in the following format:\n"
    "Question 1: {{question_1}}\n"
    "Answer 1: {{answer_1}}\n"
    "Question 2: {{question_2}}\n"
    "Answer 2: {{answer_2}}\n"
    "..."
)
_DONT_GIVE_AWAY = (
    "Do not give away too much information in the questions. For example, ask 'Who is X?' "
    "instead of 'Who is X that did Y?' when Y is clear from the context.\n"
)

Q_GEN_PROMPT = (
    _Q_HEAD + "### Rules ###\n"
    "Rules to follow when generating the questions:\n"
    "1. The questions must be specific to the given context and fully answerable from "
    "information present in the given context.\n"
    "2. Ask questions that are fact-seeking based on the information provided.\n"
    "3. Make sure the questions are clear and unambiguous.\n"
    "4. " + _NOT_ALLOWED + "the questions.\n"
    "5. The questions should not overlap. They should be diverse, covering many aspects of the "
    "context.\n"
    "6. " + _DONT_GIVE_AWAY + "7. Ignore the text formatting of the context, e.g., bold, italic, "
    "underline, etc.\n"
    "8. Ignore typos, spacing, and grammatical errors in the context.\n\n" + _ANSWER_RULES
)

Q_GEN_PROMPT_REPEAT = (
    _Q_HEAD + "### Example Question-Answer Pairs ###\n"
    "{qa_pairs}\n\n\n"
    "### Rules ###\n"
    "Rules to follow when generating the questions:\n"
    "1. The questions must be specific to the given context and fully answerable from "
    "information present in *or* implied from the given context.\n"
    "2. The questions must *not* be redundant with the example questions-answer pairs provided.\n"
    "3. You should prioritize fact-seeking questions. Consider reversal questions, e.g., asking "
    "'What causes X to happen?' is valid when 'Y causes X' is presented in the context.\n"
    "4. If all the facts in the context are already covered by the provided examples, you must "
    "generate *more complicated* questions that require reasoning beyond simple information "
    "retrieval.\nThis includes asking about information that can be inferred, requiring "
    "synthesizing information from multiple parts of the text, or understanding relationships "
    "between concepts, events, or individuals mentioned in the context. For example, if the "
    "context says 'The Eiffel Tower was completed in 1889 after 2 years of construction', you "
    "can ask 'When did the construction of the Eiffel Tower begin?'. Here's another example: if "
    "the context says 'Alice is Bob's mother. Bob is Charlie's Dad', you can ask 'Who is "
    "Charlie's grandmother?'.\n"
    "5. " + _NOT_ALLOWED + "the questions.\n"
    "6. The questions should not overlap. They should be diverse, covering many aspects of the "
    "context.\n"
    "7. " + _DONT_GIVE_AWAY + "8. Ignore the text formatting of the context, e.g., bold, italic, "
    "underline, etc.\n"
    "9. Ignore typos, spacing, and grammatical errors in the context.\n\n" + _ANSWER_RULES
)

SELF_GEN_SYSTEM_MSG = "You are an honest and helpful assistant."


# Compact prompts (not official): one short instruction a 135M instruct model follows.
COMPACT_PREFILL = "Question 1:"
COMPACT_Q_PROMPT = (
    "Write {n_qa_pairs} questions about the text below, each followed by its answer taken from "
    "the text.\n\nText: {context}\n\nUse this format:\nQuestion 1: ...\nAnswer 1: ..."
)
COMPACT_Q_PROMPT_REPEAT = (
    "Write {n_qa_pairs} new questions about the text below, different from these ones:\n"
    "{questions}\nEach question is followed by its answer taken from the text.\n\n"
    "Text: {context}\n\nUse this format:\nQuestion 1: ...\nAnswer 1: ..."
)


def question_prompt(context: str, n_qa_pairs: int = 5) -> str:
    return Q_GEN_PROMPT.format(context=context, n_qa_pairs=n_qa_pairs)


def repeat_prompt(context: str, questions: Sequence[str], answers: Sequence[str], n: int = 5):
    """Level-1 prompt: earlier pairs listed as `Question i: q\\nAnswer i: a\\n` examples."""
    pairs = "".join(
        f"Question {i}: {q}\nAnswer {i}: {a}\n"
        for i, (q, a) in enumerate(zip(questions, answers), 1)
    )
    return Q_GEN_PROMPT_REPEAT.format(context=context, qa_pairs=pairs, n_qa_pairs=n)


def teacher_user_message(context: str, question: str) -> str:
    """The teacher's single user turn (official `create_messages`)."""
    body = QA_PROMPT_TEMPLATE.format(context=context, question=question)
    return (SELF_GEN_SYSTEM_MSG + "\n\n\n" + body).strip()


def parse_qa_pairs(text: str, finished: bool = True) -> tuple[list[str], list[str]]:
    """Official `postprocess_qa_pairs`: regex pairs, empty ones dropped; when the output was cut
    off (no stop token), the last pair is dropped unless there are leftover unmatched items."""
    text = text.split("</think>")[-1]
    qs = re.findall(r"Question \d+:(.*?)(?=Answer|$)", text, flags=re.S)
    ans = re.findall(r"Answer \d+:(.*?)(?=Question|$)", text, flags=re.S)
    n = min(len(qs), len(ans))
    leftover = n < len(qs) or n < len(ans)
    out_q, out_a = [], []
    for i in range(n):
        q, a = qs[i].strip(), ans[i].strip()
        if not q or not a:
            continue
        if not leftover and i == n - 1 and not finished:
            continue
        out_q.append(q)
        out_a.append(a)
    return out_q, out_a


def parse_questions(text: str, finished: bool = True) -> list[str]:
    """Compact mode: every non-empty `Question i: ...` (up to its answer or line end), in order,
    duplicates dropped. A cut-off output (finished=False) loses its last, possibly partial line."""
    if not finished:
        text = text.rsplit("\n", 1)[0] if "\n" in text else ""
    out: list[str] = []
    for q in re.findall(r"Question \d+:([^\n]*)", text):
        q = q.split("Answer")[0].strip()
        if q and q not in out:
            out.append(q)
    return out


# ----------------------------------------------------------------------------- tokenization
def context_ids(tokenizer: Any, text: str, chat_template: str | None = None) -> list[int]:
    """Context ids with the empty-system one-turn chat (official `tokenize_ctx_text`)."""
    del chat_template  # chat.py picks the family template from the tokenizer
    return chat.tokenize_ctx_text(text, tokenizer)


def qa_ids_and_labels(
    tokenizer: Any, prompt: str, response: str, chat_template: str | None = None
) -> tuple[list[int], list[int]]:
    """Student ids of [system '', user prompt, assistant response] and labels on the assistant
    content (+ its end-of-turn), from the template's {% generation %} mask when it has one, else
    from the difference to the rendered generation prompt."""
    return _qa_ids_and_labels_many(tokenizer, [prompt], [response], chat_template, False)[0]


def qa_ids_and_labels_batch(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    chat_template: str | None = None,
) -> list[tuple[list[int], list[int]]]:
    """`qa_ids_and_labels` of many QAs, the texts encoded in batched tokenizer calls (same ids)."""
    if len(prompts) != len(responses):
        raise InputError(f"{len(prompts)} prompts but {len(responses)} responses")
    return _qa_ids_and_labels_many(tokenizer, prompts, responses, chat_template, True)


def _qa_ids_and_labels_many(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    chat_template: str | None,
    batched: bool,
) -> list[tuple[list[int], list[int]]]:
    """The rendering and labelling rule of qa_ids_and_labels; `batched`: one tokenizer call for
    all QAs (batch encode) instead of one per text."""
    convs = [
        [
            {"role": "system", "content": ""},
            {"role": "user", "content": p.strip()},
            {"role": "assistant", "content": r},
        ]
        for p, r in zip(prompts, responses)
    ]
    template = chat_template or tokenizer.chat_template
    if "{% generation %}" in (template or "") or "{%- generation %}" in (template or ""):
        kw = dict(
            chat_template=chat_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            add_generation_prompt=False,
        )
        if batched:
            enc = tokenizer.apply_chat_template(convs, **kw)
            encs = [(i, m) for i, m in zip(enc["input_ids"], enc["assistant_masks"])]
        else:
            encs = []
            for msgs in convs:
                enc = tokenizer.apply_chat_template(msgs, **kw)
                encs.append((enc["input_ids"], enc["assistant_masks"]))
        out = []
        for raw_ids, mask in encs:
            ids = [int(x) for x in raw_ids]
            out.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
        return out
    heads, fulls = [], []
    for msgs in convs:
        head = tokenizer.apply_chat_template(
            msgs[:2], chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            msgs, chat_template=chat_template, tokenize=False, add_generation_prompt=False
        )
        if not full.startswith(head):
            raise InputError(
                "chat template renders the prompt differently with a response appended"
            )
        heads.append(head)
        fulls.append(full)
    # official masks stop at the end-of-turn token
    head_resps = [h + f[len(h) :].rstrip("\n") for h, f in zip(heads, fulls)]
    n = len(convs)
    texts = heads + fulls + head_resps
    if batched:
        encoded = chat.encode_batch(tokenizer, texts)
    else:
        encoded = [chat._encode(tokenizer, t) for t in texts]
    out = []
    for head_ids, ids, head_resp_ids in zip(encoded[:n], encoded[n : 2 * n], encoded[2 * n :]):
        ids = list(ids)
        if ids[: len(head_ids)] != list(head_ids):
            raise InputError("prompt tokens change when the response is appended; cannot label it")
        n0, n_resp = len(head_ids), len(head_resp_ids) - len(head_ids)
        out.append((ids, [-100] * n0 + ids[n0 : n0 + n_resp] + [-100] * (len(ids) - n0 - n_resp)))
    return out


def _char_to_token(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the first token starting at or after `char` (offsets from a fast tokenizer)."""
    for i, (s, e) in enumerate(offsets):
        if s >= char or (s < char < e):
            if s < char:
                raise InputError(
                    "a token straddles the question boundary; cannot cut the student view"
                )
            return i
    return len(offsets)


@dataclass
class TeacherPrompt:
    ids: list[int]
    sys_start: int  # first token of the system line (kept before it)
    q_start: int  # first token of the question (kept from here)


def teacher_prompt(tokenizer: Any, context: str, question: str) -> TeacherPrompt:
    """Teacher prompt ids (the tokenizer's own chat template, generation prompt) and the cut
    points of the student view, located by character offsets."""
    msg = teacher_user_message(context, question)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    sys_char = text.find(SELF_GEN_SYSTEM_MSG)
    q_char = text.rfind(SELF_QA_INTX)
    if sys_char < 0 or q_char < 0:
        raise InputError("chat template dropped the teacher prompt's system line or instructions")
    q_char += len(SELF_QA_INTX)
    return TeacherPrompt(
        [int(x) for x in enc["input_ids"]],
        _char_to_token(offsets, sys_char),
        _char_to_token(offsets, q_char),
    )


# ----------------------------------------------------------------------------- generation hooks
@dataclass
class Generation:
    tokens: list[int]  # generated ids, including the stop token when finished
    finished: bool  # stopped on an end-of-turn / EOS token


# generate(prompts: list of id lists, max_new_tokens) -> one Generation per prompt, greedy.
GenerateFn = Callable[[list[list[int]], int], list[Generation]]


def make_jax_generate(
    params: Any,
    config: Any,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    dtype: Any = None,
    pad_to_multiple: int = 64,
    mesh: Any = None,
) -> GenerateFn:
    """Greedy batched generation through hyperlora_jax.models.decoding (left padding).
    mesh: the weights laid out by the training rules once, each batch's prompts split over the
    batch axes (decoding.generate(mesh=...))."""

    stops = set(stop_token_ids(tokenizer, config.eos_token_id))
    dtype = dtype or jnp.float32
    if mesh is not None:
        params = shd.shard_model_params(params, config, mesh)

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        # longest first keeps the padding inside a batch small
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        res: dict[int, Generation] = {}
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            out = decoding.generate(
                params,
                config,
                [prompts[i] for i in idx],
                max_new_tokens=max_new_tokens,
                stop_ids=tuple(sorted(stops)),
                dtype=dtype,
                pad_to_multiple=pad_to_multiple,
                mesh=mesh,
            )
            for i, row, n in zip(idx, out.tokens, out.lengths):
                t = [int(x) for x in row[: int(n)]]
                res[i] = Generation(t, bool(t) and t[-1] in stops)
        return [res[i] for i in range(len(prompts))]

    return generate


TopKFn = Callable[[list[list[int]], list[int]], list[tuple[np.ndarray, np.ndarray]]]


def make_jax_topk(
    params: Any,
    config: Any,
    *,
    k: int = 16,
    batch_size: int = 8,
    dtype: Any = None,
    mesh: Any = None,
) -> TopKFn:
    """topk(sequences, n_prompt) -> per sequence (vals [n_resp, k], idx [n_resp, k]): the teacher's
    top-k log-probs at every response token (the distribution the token was drawn from).
    mesh: the weights by the training rules, each batch (batch_size rounded up to a multiple of
    the batch axes' size) split over the batch axes."""

    dtype = dtype or jnp.float32
    rows = batch_size
    if mesh is not None:
        params = shd.shard_model_params(params, config, mesh)
        m = shd.batch_multiple(mesh)
        rows = -(-batch_size // m) * m

    @jax.jit
    def run(p, tokens, seg, at):  # params as an argument: never baked into the program as constants
        logits = forward(p, config, tokens, segment_ids=seg, dtype=dtype, logits_at=at).logits
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jax.lax.top_k(logp, k)

    def bucket(n: int) -> int:  # padded sizes: few compiled shapes
        return -(-n // 64) * 64

    def topk(seqs: list[list[int]], n_prompt: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        res = []
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s : s + batch_size]
            spans = [(n_prompt[s + i] - 1, len(x) - 1) for i, x in enumerate(chunk)]
            t = bucket(max(len(x) for x in chunk))
            r = bucket(max(e - b for b, e in spans))
            # the batch padded to batch_size too, so the last partial batch does not recompile
            tok = np.zeros((rows, t), np.int32)
            seg = np.zeros((rows, t), np.int32)
            at = np.zeros((rows, r), np.int32)
            for i, (x, (b, e)) in enumerate(zip(chunk, spans)):
                tok[i, : len(x)] = x
                seg[i, : len(x)] = 1
                at[i, : e - b] = np.arange(b, e)  # the positions predicting response tokens
            if mesh is not None:
                tok, seg, at = (shd.put_rows(x, mesh) for x in (tok, seg, at))
            vals, idx = (np.asarray(a) for a in run(params, tok, seg, at))
            for i, (b, e) in enumerate(spans):
                res.append((vals[i, : e - b], idx[i, : e - b]))
        return res

    return topk


# ----------------------------------------------------------------------------- several processes
def process_part(n_docs: int, process_index: int, num_processes: int) -> range:
    """The documents of one of `num_processes` independent selfgen processes (one per host on a
    pod): contiguous and disjoint, so the parts' records, concatenated in process order, are one
    process's records."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise InputError(
            f"process index {process_index} of {num_processes} processes; give "
            f"--num-processes N >= 1 and --process-index 0..N-1"
        )
    return range(
        n_docs * process_index // num_processes, n_docs * (process_index + 1) // num_processes
    )


def part_path(out, process_index: int, num_processes: int):
    """Where one process of several writes its part: `sg.parquet` -> `sg-00001-of-00002.parquet`
    (a glob `sg-*.parquet` reads them all, e.g. `train --data`); one process: `out` itself."""
    if num_processes == 1:
        return out
    return out.with_name(f"{out.stem}-{process_index:05d}-of-{num_processes:05d}{out.suffix}")


# ----------------------------------------------------------------------------- pipeline
@dataclass(frozen=True)
class SelfGenConfig:
    n_qa_pairs: int = 5
    repeat_round: bool = True
    q_max_new_tokens: int = 2048  # official level-0 question generation
    max_new_tokens: int = 256  # official teacher responses
    top_k: int = 16
    logprob_dtype: str = "float32"  # the official files store float16
    qg_prompt: str = "official"  # or "compact": small instruct models (see the module docstring)


def generate_questions(
    docs: Sequence[str],
    q_tokenizer: Any,
    q_generate: GenerateFn,
    cfg: SelfGenConfig,
) -> list[tuple[list[str], list[str]]]:
    """Level-0 (+ level-1 repeat) QA pairs per document from the instruct model."""
    if cfg.qg_prompt == "compact":
        return _compact_questions(docs, q_tokenizer, q_generate, cfg)
    if cfg.qg_prompt != "official":
        raise InputError(f"qg_prompt={cfg.qg_prompt!r}; expected 'official' or 'compact'")

    def round_(prompts: list[str]) -> list[tuple[list[str], list[str]]]:
        system = {"role": "system", "content": Q_GEN_SYSTEM}
        ids = [_chat_ids(q_tokenizer, [system, {"role": "user", "content": p}]) for p in prompts]
        gens = q_generate(ids, cfg.q_max_new_tokens)
        return [
            parse_qa_pairs(q_tokenizer.decode(g.tokens, skip_special_tokens=True), g.finished)
            for g in gens
        ]

    lvl0 = round_([question_prompt(d, cfg.n_qa_pairs) for d in docs])
    if not cfg.repeat_round:
        return lvl0
    lvl1 = round_([repeat_prompt(d, q, a, cfg.n_qa_pairs) for d, (q, a) in zip(docs, lvl0)])
    return [(q0 + q1, a0 + a1) for (q0, a0), (q1, a1) in zip(lvl0, lvl1)]


def _compact_questions(docs, q_tokenizer, q_generate, cfg) -> list[tuple[list[str], list[str]]]:
    """qg_prompt="compact": questions only (answers empty), the repeat round shown the first
    questions and its repeats dropped."""
    prefill = list(q_tokenizer(COMPACT_PREFILL, add_special_tokens=False)["input_ids"])

    def round_(prompts: list[str]) -> list[list[str]]:
        ids = [_chat_ids(q_tokenizer, [{"role": "user", "content": p}]) + prefill for p in prompts]
        gens = q_generate(ids, cfg.q_max_new_tokens)
        texts = [q_tokenizer.decode(g.tokens, skip_special_tokens=True) for g in gens]
        return [parse_questions(COMPACT_PREFILL + t, g.finished) for t, g in zip(texts, gens)]

    n = cfg.n_qa_pairs
    qs = round_([COMPACT_Q_PROMPT.format(context=d, n_qa_pairs=n) for d in docs])
    if cfg.repeat_round:
        more = round_(
            [
                COMPACT_Q_PROMPT_REPEAT.format(context=d, questions="\n".join(q), n_qa_pairs=n)
                for d, q in zip(docs, qs)
            ]
        )
        qs = [list(dict.fromkeys(q0 + q1)) for q0, q1 in zip(qs, more)]
    return [(q, [""] * len(q)) for q in qs]


def _chat_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(x) for x in out]


def teacher_records(
    docs: Sequence[str],
    questions: Sequence[Sequence[str]],
    tokenizer: Any,
    generate: GenerateFn,
    topk: TopKFn,
    cfg: SelfGenConfig,
    *,
    on_error: str = "raise",
    sources: Sequence[tuple[str, int]] | None = None,
) -> tuple[list[dict], dict]:
    """Teacher responses + top-k log-probs + student views -> one record per document."""

    errors = ErrorLog(on_error)
    prompts: list[TeacherPrompt] = []
    owner: list[tuple[int, str]] = []
    for d, (doc, qs) in enumerate(zip(docs, questions)):
        for q in qs:
            try:
                prompts.append(teacher_prompt(tokenizer, doc, q))
                owner.append((d, q))
            except InputError as e:
                src = sources[d] if sources else ("documents", d)
                errors.report(src[0], src[1], f"question {q[:40]!r}: {e}")
    t0 = time.time()
    gens = generate([p.ids for p in prompts], cfg.max_new_tokens)
    t_gen = time.time() - t0
    keep = [i for i, g in enumerate(gens) if g.finished and g.tokens]
    t0 = time.time()
    tk = topk([prompts[i].ids + gens[i].tokens for i in keep], [len(prompts[i].ids) for i in keep])
    t_topk = time.time() - t0
    recs = [
        {
            "context": doc,
            "ctx_ids": context_ids(tokenizer, doc),
            "prompts": [],
            "responses": [],
            "input_ids": [],
            "response_start_end": [],
            "logprobs_vals": [],
            "logprobs_indices": [],
        }
        for doc in docs
    ]
    lp_dtype = np.dtype(cfg.logprob_dtype)
    for i, (vals, idx) in zip(keep, tk):
        p, g = prompts[i], gens[i]
        d, q = owner[i]
        student = p.ids[: p.sys_start] + p.ids[p.q_start :] + g.tokens
        start = len(p.ids) - p.q_start + p.sys_start
        r = recs[d]
        r["prompts"].append(q)
        r["responses"].append(tokenizer.decode(g.tokens, skip_special_tokens=True))
        r["input_ids"].append(np.asarray(student, np.int32))
        r["response_start_end"].append([start, start + len(g.tokens)])
        r["logprobs_vals"].append(vals.astype(lp_dtype))
        r["logprobs_indices"].append(idx.astype(np.int32))
    stats = {
        "questions": len(prompts),
        "dropped_unfinished": len(prompts) - len(keep),
        "response_tokens": int(sum(len(gens[i].tokens) for i in keep)),
        "generate_s": t_gen,
        "topk_s": t_topk,
        "bad_records": [str(b) for b in errors.bad],
    }
    return [r for r in recs if r["input_ids"]], stats


def self_generate(
    docs: Sequence[str],
    *,
    tokenizer: Any,
    generate: GenerateFn,
    topk: TopKFn,
    q_tokenizer: Any | None = None,
    q_generate: GenerateFn | None = None,
    questions: Sequence[Sequence[str]] | None = None,
    cfg: SelfGenConfig = SelfGenConfig(),
    on_error: str = "raise",
) -> tuple[list[dict], dict]:
    """The whole pipeline; pass `questions` to skip question generation."""
    if questions is None:
        if q_generate is None:
            raise InputError("give either questions or a question generator (q_generate)")
        t0 = time.time()
        qa = generate_questions(docs, q_tokenizer or tokenizer, q_generate, cfg)
        questions = [q for q, _ in qa]
        t_q = time.time() - t0
    else:
        t_q = 0.0
    recs, stats = teacher_records(
        docs, questions, tokenizer, generate, topk, cfg, on_error=on_error
    )
    stats["question_gen_s"] = t_q
    return recs, stats
