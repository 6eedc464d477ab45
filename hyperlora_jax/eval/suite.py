"""T2L on a generated task suite (`hyperlora-jax data task-suite`): exact-match accuracy of every
way to adapt SmolLM2 to a task, on held-out tasks and on training tasks with unseen descriptions.

Modes (each task's test split, greedy decoding, prompt exactly as in training):
  base        the bare input, no adapter
  base_desc   the task description in the prompt (as the SNI task definition), no adapter
  oracle      the task's own fine-tuned LoRA (library from `smollm2_oracles`): the upper bound
  multitask   one LoRA fine-tuned on all training tasks
  <name>      a T2L checkpoint, adapters generated from the task's unseen descriptions
  <name>_random   the same T2L given random strings as descriptions (the official probe)
Description-dependent modes average over the first `n_descriptions` eval descriptions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import yaml
from tqdm import tqdm

from hyperlora_jax.data import sni, task_suite
from hyperlora_jax.errors import InputError
from hyperlora_jax.lora import adapter as lora
from hyperlora_jax.lora.adapter import Adapter
from hyperlora_jax.lora.storage import load_adapter, read_adapter_meta
from hyperlora_jax.models import decoding
from hyperlora_jax.models import sharding as shd
from hyperlora_jax.paths import save_figure

log = logging.getLogger(__name__)


HELD_OUT_GROUPS = ("held_out_members", "held_out_families", "held_out")
GROUP_TITLES = {
    "held_out_members": "held-out members of seen families (a)",
    "held_out_families": "held-out families (b)",
    "held_out": "held-out tasks",
    "seen": "training tasks, unseen descriptions",
}
MODES = ("base", "base_desc", "oracle", "multitask", "t2l")  # t2l: every --t2l and its _random


def suite_splits(suite: str | Path) -> dict[str, list[str]]:
    """{"train": [...], held-out group: [...]}: the universe's two held-out sets, or the classic
    suite's one `held_out` list."""
    p = Path(suite) / "splits.yaml"
    if not p.is_file():
        raise InputError(
            f"{suite} has no splits.yaml; write it with `hyperlora-jax data task-suite`"
        )
    s = yaml.safe_load(p.read_text())
    groups = [g for g in HELD_OUT_GROUPS[:2] if g in s] or ["held_out"]
    return {"train": list(s["train"])} | {g: list(s.get(g, [])) for g in groups}


def prompt_and_answer(meta: dict, example: dict, tokenizer, description: str | None = None):
    """(prompt ids up to the answer, answer text) for one test example, rendered like training:
    the SNI prompt (the description, if any, as task definition) + the response's opening."""

    ex = dict(example)
    if description is not None:
        ex["task_def"] = sni.sni_example(description, ex["problem"], [ex["answer"]])["task_def"]
    prompt, response = sni.render_prompt_response(meta, ex, tokenizer)
    cut = response.rindex(str(ex["answer"]))
    text = prompt + response[:cut]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]), str(ex["answer"])


class LibraryAdapters:
    """A LoRA library folder (export of an oracle / multi-task run): adapter of a task by name."""

    def __init__(self, folder: str | Path):

        self.tasks = list(read_adapter_meta(folder).get("tasks") or [])
        self.lib = load_adapter(folder)
        self.n = next(iter(self.lib.a.values())).shape[0]

    def get(self, task: str):
        if self.n == 1:  # one shared (multi-task) LoRA
            i = 0
        elif task in self.tasks:
            i = self.tasks.index(task)
        else:
            return None
        return Adapter(
            {m: x[i] for m, x in self.lib.a.items()},
            {m: x[i] for m, x in self.lib.b.items()},
            self.lib.scale,
        )


def evaluate_suite(
    params,
    config,
    tokenizer,
    suite: str | Path,
    *,
    tasks: dict[str, str],
    oracles: LibraryAdapters | None = None,
    multitask: LibraryAdapters | None = None,
    t2ls: dict[str, Any] | None = None,
    n_examples: int = 10,
    n_descriptions: int = 2,
    random_probe: bool = True,
    modes: tuple[str, ...] = MODES,
    max_new_tokens: int = 28,
    batch_size: int = 64,
    progress: bool = True,
    mesh=None,
) -> dict[str, Any]:
    """tasks: {name: group} (a held-out group or "seen"); modes: which of `MODES` to run.
    Returns per-task accuracies, group averages, samples.

    All (task, mode, description, example) rows decode together in fixed-size batches with one
    adapter per row (no adapter = zeros): decoding is memory-bound on CPU, so one wide batch
    costs about what one narrow pass does."""

    t2ls = t2ls or {}
    if mesh is not None:  # laid out once; generate then shards only the rows
        params = shd.shard_model_params(params, config, mesh)
    bad = sorted(set(modes) - set(MODES))
    if bad or not modes:
        raise InputError(f"modes: unknown {bad or 'none given'}; choose from {', '.join(MODES)}")
    root = Path(suite)
    random_descs = task_suite.random_descriptions(n_descriptions, seed=123)
    per_task: dict[str, dict] = {}
    samples: dict[str, dict] = {}
    queue = []  # (task, mode, (prompt ids, answer), adapter or None): every row of every task
    for task, group in tasks.items():
        t = sni.load_task(root / task, split="test")
        meta, rows = t.metadata, t.examples[:n_examples]
        descs = list(meta.get("eval_descriptions") or meta["descriptions"])[:n_descriptions]
        jobs = [("base", None, None)] if "base" in modes else []  # (mode, prompt desc, adapter)
        jobs += [("base_desc", d, None) for d in descs if "base_desc" in modes]
        for name, lib in (("oracle", oracles), ("multitask", multitask)):
            ad = lib.get(task) if lib is not None and name in modes else None
            if ad is not None:
                jobs.append((name, None, ad))
        for name, t2l in t2ls.items() if "t2l" in modes else ():
            jobs += [(name, None, ad) for ad in lora.unstack(t2l.generate(descs))]
            if random_probe and group in HELD_OUT_GROUPS:
                randoms = lora.unstack(t2l.generate(random_descs))
                jobs += [(f"{name}_random", None, ad) for ad in randoms]
        per_task[task] = {"group": group, "n": len(rows), "descriptions": descs}
        for mode, desc, ad in jobs:
            queue += [(task, mode, prompt_and_answer(meta, r, tokenizer, desc), ad) for r in rows]
    some = next((q[3] for q in queue if q[3] is not None), None)
    zero = lora.scale(some, 0.0) if some is not None else None  # "no adapter" in a mixed batch
    texts = []
    batches = range(0, len(queue), batch_size)
    for s in tqdm(batches, desc="eval suite", disable=not progress):
        ids = [q[2][0] for q in queue[s : s + batch_size]]
        ads = [q[3] if q[3] is not None else zero for q in queue[s : s + batch_size]]
        fill = batch_size - len(ids)  # a fixed batch: one compiled program for all rows
        ids += [ids[0]] * fill
        ads += [ads[0]] * fill
        out = decoding.generate(
            params,
            config,
            ids,
            adapter=lora.stack(ads) if zero is not None else None,
            max_new_tokens=max_new_tokens,
            tokenizer=tokenizer,
            dtype=jnp.float32,
            pad_to_multiple=32,
            mesh=mesh,
        )
        texts += out.texts[: batch_size - fill]
    hits: dict[tuple[str, str], list] = {}
    for (task, mode, (_, ans), _), out in zip(queue, texts):
        hits.setdefault((task, mode), []).append(out.strip() == ans.strip())
        shown = samples.setdefault(task, {}).setdefault(mode, [])
        if len(shown) < 3:
            shown.append({"output": out, "answer": ans})
    for (task, mode), h in hits.items():
        per_task[task][mode] = float(np.mean(h))
    modes = list(dict.fromkeys(k for r in per_task.values() for k in r))
    modes = [k for k in modes if k not in ("group", "n", "descriptions")]
    groups = {}
    for g in (*HELD_OUT_GROUPS, "seen"):
        rs = [r for r in per_task.values() if r["group"] == g]
        if rs:
            groups[g] = {
                m: float(np.mean([r[m] for r in rs if m in r]))
                for m in modes
                if any(m in r for r in rs)
            }
    return {
        "tasks": per_task,
        "groups": groups,
        "modes": modes,
        "samples": samples,
        "n_examples": n_examples,
        "n_descriptions": n_descriptions,
    }


def markdown(res: dict) -> str:
    """The model-card table: one row per mode, one column per task group."""
    groups = list(res["groups"])
    head = GROUP_TITLES
    lines = [
        "| mode | "
        + " | ".join(
            f"{head[g]} (n={sum(r['group'] == g for r in res['tasks'].values())})" for g in groups
        )
        + " |",
        "|---|" + "---|" * len(groups),
    ]
    for m in res["modes"]:
        cells = [
            f"{100 * res['groups'][g][m]:.1f}" if m in res["groups"][g] else "-" for g in groups
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    families: dict[tuple[str, str], list[dict]] = {}  # universe task names: family__params
    for t, r in res["tasks"].items():
        if "__" in t:
            families.setdefault((r["group"], t.split("__")[0]), []).append(r)
    if families:
        lines += [
            "",
            "| group | family | tasks | " + " | ".join(res["modes"]) + " |",
            "|---|---|---|" + "---|" * len(res["modes"]),
        ]
        for (g, f), rs in sorted(families.items()):
            cells = [
                f"{100 * np.mean([r[m] for r in rs if m in r]):.0f}"
                if any(m in r for r in rs)
                else "-"
                for m in res["modes"]
            ]
            lines.append(f"| {g} | {f} | {len(rs)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| task | group | " + " | ".join(res["modes"]) + " |",
        "|---|---|" + "---|" * len(res["modes"]),
    ]
    for t, r in res["tasks"].items():
        cells = [f"{100 * r[m]:.0f}" if m in r else "-" for m in res["modes"]]
        lines.append(f"| {t} | {r['group']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(res: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, modes = list(res["groups"]), res["modes"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(modes)), 3.8))
    w = 0.8 / len(groups)
    for j, g in enumerate(groups):
        ys = [100 * res["groups"][g].get(m, np.nan) for m in modes]
        ax.bar(np.arange(len(modes)) + (j - (len(groups) - 1) / 2) * w, ys, w, label=g)
    ax.set_xticks(range(len(modes)), modes, rotation=30, ha="right")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("T2L on the task suite (SmolLM2-135M-Instruct)")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
