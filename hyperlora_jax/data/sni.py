"""Lots-of-LoRAs / Super-NaturalInstructions tasks for T2L, read from local files.

Layout: `<tasks_dir>/<task>/metadata.yaml` (the official T2L `tasks/` format: descriptions,
user_prompt_template, response_field, system_message, assistant_prefill[, assistant_postfill],
ds_kwargs) with the examples next to it as `<split>.jsonl` / `<split>.parquet` (Lots-of-LoRAs rows
`{input, output: [..], id}`), or under `<data_dir>/<ds_kwargs.path>/<split>.*`, or a raw SNI task
JSON (`Definition`, `Instances`). The official preprocessing, prompt rendering (system + user turn
and the assistant turn rendered separately, tokenised as a pair, left truncation to 512 tokens in
total, labels on the whole response including its end-of-turn) and the per-step hierarchical
sampler (k tasks x 1 example, fresh description per example) are reproduced.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hyperlora_jax.data.storage import ErrorLog, iter_raw_records
from hyperlora_jax.errors import ConfigError, InputError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
N_DESCS_PER_TASK = 128  # official n_descs_per_ds: the first 128 descriptions train
INP_MAX_LEN = 512
# Held-out unseen tasks and the decontaminated (benchmark-derived) ones: never trained on.
HELD_OUT_TASKS = (
    "lol_701",
    "lol_706",
    "lol_710",
    "lol_726",
    "lol_035",
    "lol_039",
    "lol_202",
    "lol_304",
    "lol_362",
    "lol_614",
    "lol_1557",
)
DECONTAMINATED_TASKS = (
    "lol_033",
    "lol_034",
    "lol_1391",
    "lol_080",
    "lol_081",
    "lol_1286",
    "lol_1389",
    "lol_228",
    "lol_380",
    "lol_381",
)
# Training tasks validated on train[90%:] (they train on train[:90%]).
VAL_SEEN_TASKS = (
    "lol_1711",
    "lol_140",
    "lol_1448",
    "lol_636",
    "lol_742",
    "lol_1198",
    "lol_717",
    "lol_705",
    "lol_275",
    "lol_084",
)
ADDITIONAL_EVAL_DESCS = (
    "dogs;cats;bananas;",
    "7@9.qwepra#/.sd,s'2OC^039u#rdagjbL",
    "ggggggggggggggggggggg",
)
REQUIRED_METADATA = ("descriptions", "user_prompt_template", "response_field")


def train_task_names(all_tasks: Sequence[str]) -> list[str]:
    """Official training set: every lol_* task except held-out and decontaminated ones (479/500)."""
    skip = set(HELD_OUT_TASKS) | set(DECONTAMINATED_TASKS)
    return sorted(t for t in all_tasks if t.startswith("lol_") and t not in skip)


def lol_preprocess(example: dict) -> dict:
    """Official lol preprocessing: the SNI definition (+ instructions) and the problem from the
    formatted `input`, the answer as the comma-joined outputs."""
    txt = example["input"]
    if "Definition: " not in txt or "Now complete the following example -" not in txt:
        raise InputError("'input' is not in Lots-of-LoRAs format (no 'Definition: ' / example)")
    task_def = txt.split("Definition: ")[1].split("\n\nPositive Example")[0]
    return sni_example(
        task_def,
        txt.split("Now complete the following example -")[1]
        .split("Input: ")[1]
        .split("\nOutput:")[0],
        example["output"],
    )


def sni_example(task_def: str, problem: str, outputs: Sequence[str]) -> dict:
    """One example in the official SNI form: the definition with the official suffixes, the
    problem, and the outputs comma-joined as the answer."""
    outputs = [outputs] if isinstance(outputs, str) else list(outputs)
    task_def += " Please complete the task without any explanation."
    if len(outputs) > 1:
        task_def += "\nThe answer should be a comma-separated list of possible completions."
    return {"task_def": task_def, "problem": problem, "answer": ", ".join(outputs)}


_SPLIT_RE = re.compile(r"^(\w+)(?:\[(-?\d*%?):(-?\d*%?)\])?$")


def parse_split(spec: str) -> tuple[str, str | None, str | None]:
    """HF-style split 'train[:90%]' -> ('train', '', '90%')."""
    m = _SPLIT_RE.match(spec.strip())
    if not m:
        raise ConfigError(
            f"cannot parse split {spec!r}; write e.g. train, train[:10000], valid[:500]"
        )
    return m.group(1), m.group(2), m.group(3)


def _bound(x: str | None, n: int, default: int) -> int:
    if x is None or x == "":
        return default
    if x.endswith("%"):
        return int(round(n * int(x[:-1]) / 100))
    v = int(x)
    return max(0, n + v) if v < 0 else min(v, n)


def slice_split(rows: list, spec: str) -> list:
    _, a, b = parse_split(spec)
    n = len(rows)
    return rows[_bound(a, n, 0) : _bound(b, n, n)]


@dataclass
class Task:
    name: str
    metadata: dict
    examples: list[dict] = field(default_factory=list)  # {task_def, problem, answer, ...}

    @property
    def descriptions(self) -> list[str]:
        return self.metadata["descriptions"]


def load_metadata(task_dir: Path) -> dict:
    """metadata.yaml of a task (task_name := directory name, as the official loader does)."""
    path = task_dir / "metadata.yaml"
    try:
        meta = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e.reason})") from e
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a mapping")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise InputError(f"{path}: missing {missing}")
    descs = meta["descriptions"]
    if not isinstance(descs, list) or not [d for d in descs if isinstance(d, str) and d.strip()]:
        raise InputError(f"{path}: task has no descriptions; add some under 'descriptions:'")
    meta.setdefault("system_message", "")
    meta.setdefault("assistant_prefill", "")
    meta["task_name"] = task_dir.name
    return meta


def _data_files(task_dir: Path, meta: dict, split_name: str, data_dir: Path | None) -> list[Path]:
    cands = [task_dir]
    path = (meta.get("ds_kwargs") or {}).get("path")
    if data_dir is not None and path:
        cands.append(data_dir / path)
    for d in cands:
        hits = [d / f"{split_name}{ext}" for ext in (".jsonl", ".parquet", ".json")]
        hits = [h for h in hits if h.exists()]
        if hits:
            return hits
    return []


def load_task(
    task_dir: str | Path,
    split: str | None = None,
    *,
    data_dir: str | Path | None = None,
    on_error: str = "raise",
) -> Task:
    """A task's metadata and preprocessed examples of `split` (default: metadata ds_kwargs.split).

    Bad rows (missing fields, non-UTF-8 files, unparsable inputs) are reported with file and
    row index, then skipped or raised per on_error."""
    task_dir = Path(task_dir)
    meta = load_metadata(task_dir)
    spec = split or (meta.get("ds_kwargs") or {}).get("split", "train")
    split_name = parse_split(spec)[0]
    files = _data_files(task_dir, meta, split_name, Path(data_dir) if data_dir else None)
    if not files:
        raise InputError(f"task {task_dir.name}: no {split_name}.jsonl/.parquet/.json found")
    errors = ErrorLog(on_error)
    rows = []
    for f in files:
        if f.suffix == ".json":
            rows += _raw_sni_rows(f, errors)
            continue
        for file, i, rec in iter_raw_records([f], errors=errors):
            if "input" not in rec or "output" not in rec:
                errors.report(file, i, f"missing 'input'/'output' (has {sorted(rec)})")
                continue
            try:
                rows.append({**lol_preprocess(rec), "id": rec.get("id", f"{task_dir.name}-{i}")})
            except (InputError, IndexError) as e:
                errors.report(file, i, f"cannot extract definition/problem: {e}")
    return Task(task_dir.name, meta, slice_split(rows, spec))


def _raw_sni_rows(path: Path, errors: ErrorLog) -> list[dict]:
    """Rows of an original SNI task JSON: the Definition with each instance's input."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        errors.report(path, -1, f"not valid UTF-8 ({e.reason})")
        return []
    except json.JSONDecodeError as e:
        errors.report(path, -1, f"invalid JSON: {e.msg}")
        return []
    definition = data.get("Definition")
    if isinstance(definition, list):
        definition = definition[0] if definition else None
    if not definition:
        errors.report(path, -1, "SNI task has no 'Definition'")
        return []
    out = []
    for i, inst in enumerate(data.get("Instances", [])):
        if "input" not in inst or "output" not in inst:
            errors.report(path, i, "instance missing 'input'/'output'")
            continue
        out.append({**sni_example(definition, inst["input"], inst["output"]), "id": inst.get("id")})
    return out


def load_tasks(
    tasks_dir: str | Path,
    names: Sequence[str] | None = None,
    *,
    split: str | None = None,
    data_dir: str | Path | None = None,
    on_error: str = "raise",
) -> list[Task]:
    """Tasks under tasks_dir (all with a metadata.yaml, sorted, or the named ones).

    A task that cannot be used (no descriptions, no data) is reported and skipped/raised."""
    root = Path(tasks_dir)
    if names is None:
        names = sorted(p.name for p in root.iterdir() if (p / "metadata.yaml").exists())
    errors = ErrorLog(on_error)
    tasks = []
    for name in names:
        try:
            task = load_task(root / name, split, data_dir=data_dir, on_error=on_error)
        except InputError as e:
            errors.report(root / name, -1, str(e))
            continue
        if not task.examples:
            errors.report(root / name, -1, "task has no examples in this split")
            continue
        tasks.append(task)
    return tasks


# ----------------------------------------------------------------------------- prompts
def render_prompt_response(
    meta: dict, example: dict, tokenizer: Any, chat_template: str | None = None
) -> tuple[str, str]:
    """Official `f_intx`: prompt = chat([system, user]) without generation prompt; response =
    chat([assistant: prefill + answer (+ postfill)]), rendered separately."""
    fmt = dict(example)
    prompt_chat = [
        {"role": "system", "content": meta["system_message"].format(**fmt)},
        {"role": "user", "content": meta["user_prompt_template"].format(**fmt)},
    ]
    content = meta["assistant_prefill"].format(**fmt) + str(example[meta["response_field"]])
    if "assistant_postfill" in meta:
        content += meta["assistant_postfill"].format(**fmt)
    kw = dict(tokenize=False, add_generation_prompt=False, chat_template=chat_template)
    prompt = tokenizer.apply_chat_template(prompt_chat, **kw)
    turn = [{"role": "assistant", "content": content}]
    response = tokenizer.apply_chat_template(turn, **kw)
    # Templates that open every conversation with a default system turn (SmolLM2's ChatML:
    # "You are a helpful AI assistant named SmolLM...") would put it inside the supervised
    # response. The official repo edits its templates to avoid such preambles; here the turn is
    # rendered after an empty system message and that prefix is cut off instead.
    sys_only = tokenizer.apply_chat_template(prompt_chat[:1], **kw)
    try:
        with_sys = tokenizer.apply_chat_template(prompt_chat[:1] + turn, **kw)
    except Exception:  # templates that reject a system turn before an assistant turn
        with_sys = ""
    if with_sys.startswith(sys_only) and len(with_sys) - len(sys_only) < len(response):
        response = with_sys[len(sys_only) :]
    return prompt, response


def tokenize_pair(
    tokenizer: Any, prompt: str, response: str, max_len: int = INP_MAX_LEN
) -> tuple[list[int], list[int]]:
    """Official pair tokenisation: no added specials, `longest_first` truncation of the total to
    max_len from the left; labels = response tokens (sequence id 1), -100 on the prompt."""
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(
            prompt, response, add_special_tokens=False, truncation=True, max_length=max_len
        )
    finally:
        tokenizer.truncation_side = side
    ids = [int(x) for x in enc["input_ids"]]
    seq = enc.sequence_ids(0)
    return ids, [t if s == 1 else IGNORE_INDEX for t, s in zip(ids, seq)]


@dataclass(frozen=True)
class TokenizedTask:
    name: str
    input_ids: list[list[int]]
    labels: list[list[int]]
    descriptions: list[str]


def tokenize_task(
    task: Task,
    tokenizer: Any,
    *,
    chat_template: str | None = None,
    max_len: int = INP_MAX_LEN,
    n_descs: int = N_DESCS_PER_TASK,
) -> TokenizedTask:
    ids, labels = [], []
    for ex in task.examples:
        p, r = render_prompt_response(task.metadata, ex, tokenizer, chat_template)
        x, y = tokenize_pair(tokenizer, p, r, max_len)
        ids.append(x)
        labels.append(y)
    descs = [d for d in task.descriptions if isinstance(d, str) and d.strip()][:n_descs]
    return TokenizedTask(task.name, ids, labels, descs)


# ----------------------------------------------------------------------------- sampler
class HierarchicalSource:
    """Random-access T2L training stream (official HierachicalBatchSampler + per-task dataset).

    Element i is slot i % k of step i // k. Every epoch permutes the tasks; step j of the epoch
    takes tasks perm[j*k:(j+1)*k] (last partial group dropped), one uniformly random example per
    task (with replacement) and a fresh uniformly random description per example. Everything is
    a pure function of (seed, i): shuffling-free, resumable, and shardable by slot.
    Rows are padded to `pad_to` (labels -100 on padding, segment_ids 0).
    """

    def __init__(
        self,
        tasks: Sequence[TokenizedTask],
        tasks_per_step: int = 8,
        *,
        seed: int = 0,
        num_epochs: int = 1,
        pad_to: int = INP_MAX_LEN,
        pad_id: int = 0,
    ):
        if tasks_per_step > len(tasks):
            raise ConfigError(f"tasks_per_step={tasks_per_step} > {len(tasks)} tasks")
        for t in tasks:
            if not t.descriptions:
                raise InputError(f"task {t.name} has no descriptions")
            if not t.input_ids:
                raise InputError(f"task {t.name} has no examples")
        self.tasks, self.k, self.seed = list(tasks), tasks_per_step, seed
        self.steps_per_epoch = len(self.tasks) // tasks_per_step
        self.num_epochs, self.pad_to, self.pad_id = num_epochs, pad_to, pad_id

    def __len__(self) -> int:
        return self.steps_per_epoch * self.num_epochs * self.k

    def _perm(self, epoch: int) -> list[int]:
        perm = list(range(len(self.tasks)))
        random.Random(f"{self.seed}-epoch-{epoch}").shuffle(perm)
        return perm

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        step, slot = divmod(i, self.k)
        epoch, j = divmod(step, self.steps_per_epoch)
        t_idx = self._perm(epoch)[j * self.k + slot]
        task = self.tasks[t_idx]
        rng = random.Random(f"{self.seed}-{step}-{slot}")
        ex = rng.randrange(len(task.input_ids))
        desc = rng.randrange(len(task.descriptions))
        ids, labels = task.input_ids[ex], task.labels[ex]
        n = len(ids)
        if n > self.pad_to:
            raise InputError(f"task {task.name} example {ex}: {n} tokens > pad_to={self.pad_to}")
        row = {
            "input_ids": np.full(self.pad_to, self.pad_id, np.int32),
            "labels": np.full(self.pad_to, IGNORE_INDEX, np.int32),
            "segment_ids": np.zeros(self.pad_to, np.int32),
            "task_index": np.int32(t_idx),
            "example_index": np.int32(ex),
            "desc_index": np.int32(desc),
        }
        row["input_ids"][:n] = ids
        row["labels"][:n] = labels
        row["segment_ids"][:n] = 1
        return row

    def description(self, row: dict) -> str:
        """The description text a row was paired with."""
        return self.tasks[int(row["task_index"])].descriptions[int(row["desc_index"])]
