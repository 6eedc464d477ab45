"""`hyperlora-jax eval d2l ...` and `hyperlora-jax eval t2l ...`: JSON, markdown table, PNG plots.

  hyperlora-jax eval d2l --base smollm2-135m-instruct --checkpoint ckpt/ \\
      --niah-bins 256-512,1024-2048 --niah-per-bin 10 --out runs/eval_niah
  hyperlora-jax eval d2l --base DIR --checkpoint ckpt/ --qa squad_val.jsonl --qa-format squad \\
      --methods d2l,full_context,no_context,cd_oracle --out runs/eval_squad
  hyperlora-jax eval t2l --base DIR --checkpoint t2l/ --task arc_easy=arc_easy_test.jsonl \\
      --task boolq=boolq_val.jsonl --parity --out runs/eval_t2l
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from hyperlora_jax.cli.common import (
    MODEL_HELP,
    add_mesh,
    check_output_dir,
    choice_list,
    mesh_from_args,
    name_value_pairs,
    non_negative_int,
    output_dir,
    positive_int,
)
from hyperlora_jax.errors import ConfigError

MiB = 2**20
DTYPES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------ D2L
def run_d2l(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from hyperlora_jax.eval import baselines, niah, plots, qa
    from hyperlora_jax.models.load import load_base

    check_output_dir(args.out)
    methods = choice_list(args.methods, qa.METHODS)
    if "d2l" in methods and not args.checkpoint:
        raise ConfigError(
            "method d2l needs --checkpoint (a D2L checkpoint folder or official .bin)"
        )
    sources = [bool(args.niah), bool(args.niah_bins), bool(args.qa)]
    if sum(sources) != 1:
        raise ConfigError(
            "give exactly one data source: --niah PATH, --niah-bins LO-HI,... or --qa"
        )
    mesh = mesh_from_args(args)
    t0 = time.perf_counter()
    config, params, tok, base_path = load_base(args.base)
    if mesh is not None:  # laid out once, shared by the evaluator and the hypernetwork
        from hyperlora_jax.models.sharding import shard_model_params

        params = shard_model_params(params, config, mesh)
    d2l = None
    if args.checkpoint:
        from hyperlora_jax.api import load_d2l

        d2l = load_d2l(args.checkpoint, base_model=(config, params), tokenizer=tok, mesh=mesh)
    if args.niah:
        examples = niah.load_niah(args.niah, args.limit)
    elif args.niah_bins:
        from hyperlora_jax.data.niah import parse_bins

        examples = niah.make_niah(tok, parse_bins(args.niah_bins), args.niah_per_bin, args.seed)
    else:
        examples = qa.load_qa(args.qa, args.qa_format, args.limit)
    cd = baselines.CDConfig(iterations=args.cd_iterations, lr=args.cd_lr)
    ev = qa.D2LEvaluator(
        params,
        config,
        tok,
        d2l,
        chunk_size=args.chunk_size if args.chunk_size > 0 else None,
        max_new_tokens=args.max_new_tokens,
        window=args.window,
        cd=cd,
        iterative=args.iterative,
        dtype=jnp.dtype(args.dtype),
        mesh=mesh,
    )
    records = qa.run(ev, examples, methods)
    summary = qa.summarize(records)
    out = output_dir(args.out)
    result = {
        "kind": "d2l",
        "base_model": str(base_path),
        "checkpoint": args.checkpoint,
        "data": args.niah or args.niah_bins or args.qa,
        "metric": "rougeL_f1" if examples[0].metric == "rougeL" else "qa_f1",
        "methods": list(methods),
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "summary": summary,
        "stages": ev.tracker.summary(),
        "records": records,
        "wall_s": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    ev.tracker.save_csv(out / "tracked_stats.csv")
    (out / "results.md").write_text(d2l_markdown(result))
    _d2l_plots(records, summary, result["metric"], ev, out, plots)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, accuracy_vs_length.png, memory_vs_length.png")
    return 0


def _bin_x(records, method):
    """(x = mean context tokens per bin, score) points of one method, sorted by length."""
    bins: dict[Any, list] = {}
    for r in records:
        if r["method"] == method:
            key = r.get("bin") or r["length"]
            bins.setdefault(key, []).append(r)
    pts = sorted(
        (sum(r["length"] for r in v) / len(v), sum(r["score"] for r in v) / len(v))
        for v in bins.values()
    )
    return [p[0] for p in pts], [p[1] for p in pts]


def _d2l_plots(records, summary, metric, ev, out, plots) -> None:
    acc = {m: _bin_x(records, m) for m in summary}
    plots.plot_accuracy_vs_length(
        acc,
        out / "accuracy_vs_length.png",
        metric=metric,
        window=ev.window,
        title="D2L evaluation: score vs context length",
    )
    mem: dict[str, tuple[list, list]] = {}
    for key, label in (
        ("kv_cache_bytes", "KV cache (document in prompt)"),
        ("adapter_bytes", "adapter (internalized)"),
    ):
        pts: dict[int, list] = {}
        for r in records:
            if key in r:
                pts.setdefault(r["length"], []).append(r[key] / MiB)
        if pts:
            xs = sorted(pts)
            mem[label] = (xs, [sum(pts[x]) / len(pts[x]) for x in xs])
    peaks: dict[int, float] = {}
    lengths = {r["example"]: r["length"] for r in records}
    for rec in ev.tracker.records:
        n = lengths.get(rec.example)
        if n is not None:
            peaks[n] = max(peaks.get(n, 0.0), rec.peak_bytes / MiB)
    if peaks:
        xs = sorted(peaks)
        mem["peak stage memory (measured)"] = (xs, [peaks[x] for x in xs])
    if not mem:
        mem["(no memory figures)"] = ([1], [0.0])
    plots.plot_memory_vs_length(mem, out / "memory_vs_length.png")


def d2l_markdown(result: dict) -> str:
    summ = result["summary"]
    methods = list(summ)
    bins = sorted(
        {b for m in methods for b in summ[m].get("bins", {})},
        key=lambda b: (float(b.split("-")[0]), b),
    )
    lines = [
        f"# D2L evaluation ({result['metric']} / exact match)",
        "",
        f"data: `{result['data']}`; base: `{result['base_model']}`",
        "",
    ]
    lines.append("| bin (tokens) | " + " | ".join(methods) + " |")
    lines.append("|---|" + "---|" * len(methods))
    for b in bins:
        cells = []
        for m in methods:
            e = summ[m].get("bins", {}).get(b)
            if not e:
                cells.append("")
                continue
            em = f" / {e['exact_match']:.3f}" if "exact_match" in e else ""
            cells.append(f"{e['score']:.3f}{em} (n={e['count']})")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    overall = [f"{summ[m]['score']:.3f} / {summ[m].get('exact_match', 0.0):.3f}" for m in methods]
    lines.append("| **overall** | " + " | ".join(overall) + " |")
    lines += ["", "| method | mean adapter MiB | mean KV-cache MiB |", "|---|---|---|"]
    for m in methods:
        a, k = summ[m].get("mean_adapter_bytes"), summ[m].get("mean_kv_cache_bytes")
        lines.append(f"| {m} | {a / MiB:.3f} |" if a else f"| {m} | |")
        lines[-1] += f" {k / MiB:.3f} |" if k else " |"
    lines += ["", "| stage | n | mean s | median s | max peak MiB |", "|---|---|---|---|---|"]
    for st, v in result["stages"].items():
        lines.append(
            f"| {st} | {v['count']} | {v['mean_s']:.3f} | {v['median_s']:.3f} | "
            f"{v['max_peak_bytes'] / MiB:.1f} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ T2L
def run_d2l_images(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from hyperlora_jax.api import load_d2l
    from hyperlora_jax.eval import imagenette, plots
    from hyperlora_jax.models.fetch import progress

    check_output_dir(args.out)
    items = imagenette.list_images(args.images, args.limit)
    t0 = time.perf_counter()
    kw = {"ctx_model": args.ctx_model} if args.ctx_model else {}
    d2l = load_d2l(args.hypernet, base_model=args.base_model, dtype=jnp.dtype(args.dtype), **kw)
    d2l.require_vision()  # a text-only context encoder: one clear line before any image runs
    records = imagenette.evaluate(
        d2l, items, max_new_tokens=args.max_new_tokens, batch=args.batch, log=progress
    )
    summary = imagenette.summarize(records)
    out = output_dir(args.out)
    result = {
        "kind": "d2l-images",
        "hypernet": args.hypernet,
        "base_model": args.base_model or d2l.meta.get("base_model"),
        "ctx_model": args.ctx_model or d2l.meta.get("ctx_encoder_model"),
        "images": str(args.images),
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "summary": summary,
        "wall_s": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "results.md").write_text(imagenette.markdown(summary))
    title = f"Imagenette via D2L: {summary['accuracy']:.2%} of {summary['n']}"
    plots.plot_confusion(summary["confusion"], summary["class_names"], out / "confusion.png", title)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, predictions.jsonl, confusion.png")
    return 0


def run_t2l(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from hyperlora_jax.eval import plots, tasks
    from hyperlora_jax.eval.trackers import StageTracker
    from hyperlora_jax.models.load import load_base

    check_output_dir(args.out)
    modes = choice_list(args.modes, tasks.T2L_MODES, "mode")
    if not args.task:
        raise ConfigError("give at least one --task NAME=FILE (e.g. arc_easy=arc_easy_test.jsonl)")
    files = name_value_pairs(args.task, "--task", "boolq=boolq_val.jsonl")
    data = {name: tasks.load_examples(name, path, args.limit) for name, path in files.items()}
    mesh = mesh_from_args(args)
    t2l = None
    if "t2l" in modes:
        if not args.checkpoint:
            raise ConfigError("mode t2l needs --checkpoint (a T2L checkpoint folder)")
        from hyperlora_jax.hypernet.t2l.api import TextToLoRA

        t2l = TextToLoRA.from_checkpoint(args.checkpoint, encoder=args.encoder, mesh=mesh)
    t0 = time.perf_counter()
    config, params, tok, base_path = load_base(args.base)
    tracker = StageTracker()
    res = tasks.evaluate_t2l(
        params,
        config,
        tok,
        data,
        t2l=t2l,
        modes=modes,
        parity=args.parity,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        dtype=jnp.dtype(args.dtype),
        tracker=tracker,
        mesh=mesh,
    )
    res.update(
        kind="t2l",
        base_model=str(base_path),
        checkpoint=args.checkpoint,
        stages=tracker.summary(),
        wall_s=time.perf_counter() - t0,
    )
    out = output_dir(args.out)
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "results.md").write_text(t2l_markdown(res, modes))
    tracker.save_csv(out / "tracked_stats.csv")
    names = list(data)
    plots.line_plot(
        {m: (list(range(len(names))), [res["tasks"][t].get(m, 0.0) for t in names]) for m in modes},
        out / "accuracy_by_task.png",
        "task index (" + ", ".join(names) + ")",
        "accuracy",
        "T2L evaluation",
        logx=False,
        ylim=(-0.02, 1.02),
    )
    print((out / "results.md").read_text())
    return 0


def run_t2l_suite(args: argparse.Namespace) -> int:
    from hyperlora_jax.eval import suite as S
    from hyperlora_jax.hypernet.t2l.api import TextToLoRA
    from hyperlora_jax.lora.storage import read_adapter_meta
    from hyperlora_jax.models.load import load_base

    check_output_dir(args.out)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    splits = S.suite_splits(args.suite)
    train = splits.pop("train")
    if args.oracles:  # seen tasks with an oracle to compare against, where the library has some
        have = set(read_adapter_meta(args.oracles).get("tasks") or [])
        train = [t for t in train if t in have] or train
    n = len(train) if args.seen_tasks < 0 else args.seen_tasks
    seen = train[:: max(1, len(train) // n)][:n] if n else []
    tasks = {t: g for g, names in splits.items() for t in names} | {t: "seen" for t in seen}
    checkpoints = name_value_pairs(args.t2l or [], "--t2l", "sft=runs/t2l/sft")
    mesh = mesh_from_args(args)
    t2ls = {
        name: TextToLoRA.from_checkpoint(path, encoder=args.encoder, mesh=mesh)
        for name, path in checkpoints.items()
    }
    t0 = time.perf_counter()
    config, params, tok, base_path = load_base(args.base)
    res = S.evaluate_suite(
        params,
        config,
        tok,
        args.suite,
        tasks=tasks,
        oracles=S.LibraryAdapters(args.oracles) if args.oracles else None,
        multitask=S.LibraryAdapters(args.multitask) if args.multitask else None,
        t2ls=t2ls,
        n_examples=args.limit,
        n_descriptions=args.descriptions,
        batch_size=args.batch_size,
        modes=modes,
        mesh=mesh,
    )
    res.update(base_model=str(base_path), wall_s=time.perf_counter() - t0, kind="t2l_suite")
    out = output_dir(args.out)
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "results.md").write_text(S.markdown(res))
    S.bar_plot(res, out / "accuracy_by_mode.png")
    print((out / "results.md").read_text())
    return 0


def t2l_markdown(res: dict, modes) -> str:
    names = list(res["tasks"])
    lines = [
        f"# T2L evaluation ({'README-parity' if res['parity'] else 'corrected parsers'})",
        "",
        "| mode | " + " | ".join(names) + " | avg |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for m in modes:
        cells = [f"{100 * res['tasks'][t][m]:.2f}" for t in names]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {100 * res['average'][m]:.2f} |")
    return "\n".join(lines) + "\n"


def register(subparsers) -> None:
    """Add `eval d2l` and `eval t2l`."""
    p = subparsers.add_parser("eval", help="evaluate D2L / T2L (JSON, markdown, PNG plots)")
    sub = p.add_subparsers(dest="eval_kind", required=True)

    d = sub.add_parser("d2l", help="NIAH or QA: D2L vs full context vs no context vs CD oracle")
    d.add_argument("--base", required=True, help=MODEL_HELP)
    d.add_argument("--checkpoint", help="D2L checkpoint folder or official pytorch_model.bin")
    d.add_argument("--niah", nargs="+", help="NIAH folders/files from `hyperlora-jax data niah`")
    d.add_argument("--niah-bins", help="generate NIAH test examples in these bins, e.g. 256-512")
    d.add_argument("--niah-per-bin", type=positive_int, default=10)
    d.add_argument("--qa", help="QA file (JSONL / JSON list)")
    d.add_argument(
        "--qa-format", default="squad", help="squad, drop, ropes, longbench, qasper, plain"
    )
    d.add_argument("--methods", default="d2l,full_context,no_context")
    d.add_argument("--chunk-size", type=int, default=1024, help="<= 0: one chunk per document")
    d.add_argument("--max-new-tokens", type=positive_int, default=256)
    d.add_argument("--window", type=positive_int, help="base context window (default: the model's)")
    d.add_argument("--iterative", action="store_true", help="layer-by-layer Perceiver")
    d.add_argument("--cd-iterations", type=non_negative_int, default=300)
    d.add_argument("--cd-lr", type=float, default=1e-4)
    d.add_argument("--limit", type=positive_int, help="examples per file / bin")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dtype", default="float32", choices=DTYPES)
    d.add_argument("--out", required=True)
    add_mesh(d)
    d.set_defaults(func=run_d2l)

    i = sub.add_parser(
        "d2l-images",
        help="Imagenette: images internalized by a Gemma-3 VLM encoder, named by a text base",
        description="The paper's cross-modal eval (official imagenette_eval.py): each image in "
        "--images DIR/<class>/ becomes a LoRA through the hypernetwork's Gemma-3 VLM context "
        "encoder; the text-only base model, given that LoRA and the official prompt, names the "
        "class. Writes results.json, results.md (accuracy per class), predictions.jsonl and "
        "confusion.png.",
    )
    i.add_argument("--hypernet", required=True, help="D2L checkpoint folder or official .bin")
    i.add_argument("--images", required=True, help="folder with one subfolder per class")
    i.add_argument("--base-model", help=MODEL_HELP + " (default: the one the checkpoint names)")
    i.add_argument(
        "--ctx-model", help="the Gemma-3 VLM folder (default: the one the checkpoint names)"
    )
    i.add_argument("--limit", type=positive_int, help="images per class (default: all)")
    i.add_argument("--max-new-tokens", type=positive_int, default=256)
    i.add_argument("--batch", type=positive_int, default=8, help="images per generate call")
    i.add_argument("--dtype", default="float32", choices=DTYPES)
    i.add_argument("--out", required=True)
    i.set_defaults(func=run_d2l_images)

    t = sub.add_parser("t2l", help="T2L benchmark suite from local files")
    t.add_argument("--base", required=True, help=MODEL_HELP)
    t.add_argument("--checkpoint", help="T2L checkpoint folder")
    t.add_argument("--encoder", help="task encoder: embeddings file or sentence-encoder folder")
    t.add_argument("--task", action="append", help="NAME=FILE, repeatable")
    t.add_argument("--modes", default="base,base_desc,t2l")
    t.add_argument(
        "--parity",
        action="store_true",
        help="README parity: official parser quirks, scale alpha/r, double BOS, 512 tok",
    )
    t.add_argument("--max-new-tokens", type=positive_int)
    t.add_argument("--batch-size", type=positive_int, default=16)
    t.add_argument("--limit", type=positive_int)
    t.add_argument("--dtype", default="float32", choices=DTYPES)
    t.add_argument("--out", required=True)
    add_mesh(t)
    t.set_defaults(func=run_t2l)

    s = sub.add_parser("t2l-suite", help="T2L vs baselines on a generated task suite")
    s.add_argument("--base", required=True, help=MODEL_HELP)
    s.add_argument("--suite", required=True, help="folder from `hyperlora-jax data task-suite`")
    s.add_argument("--t2l", action="append", help="NAME=CHECKPOINT, repeatable")
    s.add_argument("--encoder", help="task encoder override for the T2L checkpoints")
    s.add_argument("--oracles", help="per-task LoRA library (export of smollm2_oracles)")
    s.add_argument("--multitask", help="multi-task LoRA (export of smollm2_multitask)")
    s.add_argument(
        "--seen-tasks", type=int, default=8, help="training tasks to evaluate (-1: all of them)"
    )
    s.add_argument(
        "--modes",
        default="base,base_desc,oracle,multitask,t2l",
        help="comma list of base, base_desc, oracle, multitask, t2l (t2l: every --t2l and its "
        "random-string probe); e.g. oracle alone checks an oracle library",
    )
    s.add_argument("--limit", type=positive_int, default=10, help="test examples per task")
    s.add_argument(
        "--descriptions", type=positive_int, default=2, help="descriptions averaged per task"
    )
    s.add_argument("--batch-size", type=positive_int, default=64, help="rows decoded together")
    s.add_argument("--out", required=True)
    add_mesh(s)
    s.set_defaults(func=run_t2l_suite)
