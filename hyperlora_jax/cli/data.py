"""`hyperlora-jax data niah | niah-pieces | selfgen | facts | task-suite | inspect`: datasets on
disk (text records, or token shards with `--format tokens`)."""

from __future__ import annotations

import argparse
import json
import logging
import time

from hyperlora_jax.cli.common import (
    MODEL_HELP,
    add_mesh,
    check_output_dir,
    mesh_from_args,
    non_negative_int,
    positive_int,
)
from hyperlora_jax.errors import ConfigError, InputError
from hyperlora_jax.paths import Path, files_under


def register(subparsers) -> None:
    """Add `data` and its subcommands to the `hyperlora-jax` parser."""
    p = subparsers.add_parser("data", help="build training / evaluation datasets")
    sub = p.add_subparsers(dest="data_command", required=True)

    n = sub.add_parser(
        "niah",
        help="needle-in-a-haystack data binned by the base tokenizer",
        description="Needle-in-a-haystack data, one folder per token bin. --format tokens writes "
        "the training split as token shards (train/shard-*.npz, what `train --data` reads; built "
        "from token pieces by --workers processes, no tokenizer call per record) and val/test as "
        "JSONL text, plus niah_pieces.json; --pieces FILE builds them without the tokenizer.",
    )
    n.add_argument("--tokenizer", help="base model folder (or known model name)")
    n.add_argument(
        "--pieces",
        help="token pieces JSON (from `data niah-pieces` or a --format tokens run): build token "
        "shards without the tokenizer",
    )
    n.add_argument("--out", required=True, help="output folder")
    n.add_argument(
        "--bins",
        default="32-128,128-256",
        help="token bins LO-HI,LO-HI,... or 'official' (32 .. 128K)",
    )
    n.add_argument(
        "--n-train", type=non_negative_int, default=320_000, help="training examples per bin"
    )
    n.add_argument("--n-val", type=non_negative_int, default=1000)
    n.add_argument("--n-test", type=non_negative_int, default=1000)
    n.add_argument(
        "--train-max-hi",
        type=positive_int,
        default=1024,
        help="only bins with hi <= this get training data (official: 1024)",
    )
    n.add_argument("--seed", type=int, default=42)
    n.add_argument(
        "--format",
        default="jsonl",
        choices=("jsonl", "parquet", "array_record", "tokens"),
        help="text records (jsonl, parquet, array_record) or token shards (tokens)",
    )
    _shard_args(n)
    n.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="--format tokens: processes building shards",
    )
    n.set_defaults(func=_niah)

    np_ = sub.add_parser(
        "niah-pieces",
        help="NIAH token pieces JSON (for `data niah --pieces` on a machine without the tokenizer)",
    )
    np_.add_argument("--tokenizer", required=True, help="base model folder (or known model name)")
    np_.add_argument("--out", required=True, help="output JSON file")
    np_.add_argument(
        "--bins", default="32-128,128-256", help="token bins whose block-count ranges to measure"
    )
    np_.set_defaults(func=_niah_pieces)

    s = sub.add_parser("selfgen", help="self-generated QA distillation data (teacher top-k)")
    s.add_argument("--model", required=True, help="base (teacher) model: " + MODEL_HELP)
    s.add_argument(
        "--docs",
        nargs="+",
        required=True,
        help="documents: JSONL / Parquet / text files, folders or globs",
    )
    s.add_argument("--out", required=True, help="output file (.parquet, .jsonl, .array_record)")
    s.add_argument("--text-field", default="text")
    s.add_argument(
        "--max-chars",
        type=positive_int,
        default=2000,
        help="keep documents of at most this many characters (official 2000)",
    )
    s.add_argument(
        "--question-model",
        default=None,
        help="instruct model writing the questions (default: --model)",
    )
    s.add_argument(
        "--questions-field",
        default=None,
        help="use questions stored in this field of each record instead of generating",
    )
    s.add_argument("--n-qa-pairs", type=positive_int, default=5)
    s.add_argument("--no-repeat-round", action="store_true", help="only the level-0 questions")
    s.add_argument(
        "--qg-prompt",
        default="official",
        choices=("official", "compact"),
        help="compact: a short prompt small instruct models (SmolLM2-135M) can follow",
    )
    s.add_argument(
        "--q-max-new-tokens",
        type=positive_int,
        default=None,
        help="default 2048 (official), 256 (compact)",
    )
    s.add_argument("--max-new-tokens", type=positive_int, default=256)
    s.add_argument("--top-k", type=positive_int, default=16)
    s.add_argument("--logprob-dtype", default="float32", choices=("float32", "float16"))
    s.add_argument("--batch-size", type=positive_int, default=8)
    s.add_argument(
        "--limit", type=positive_int, default=None, help="use only the first N documents"
    )
    s.add_argument("--on-error", default="raise", choices=("raise", "skip"))
    add_mesh(s)
    s.add_argument(
        "--num-processes",
        type=positive_int,
        default=1,
        help="independent processes sharing the documents (e.g. one per host): each writes "
        "OUT-<index>-of-<count> with its contiguous part; together they equal one process's",
    )
    s.add_argument("--process-index", type=non_negative_int, default=0, help="this process: 0..N-1")
    s.set_defaults(func=_selfgen)

    f = sub.add_parser(
        "facts",
        help="synthetic fact documents (training docs + held-out QA)",
        description="Synthetic fact documents: train_docs.jsonl (or, with --format tokens, token "
        "shards train_docs/shard-*.npz tokenized in batches for `train --data`) and held-out "
        "val.jsonl / test.jsonl.",
    )
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument(
        "--format",
        default="jsonl",
        choices=("jsonl", "tokens"),
        help="training docs as text records (jsonl) or token shards (tokens; needs --tokenizer)",
    )
    f.add_argument(
        "--tokenizer", help="base model folder (or known model name) for --format tokens"
    )
    f.add_argument("--n-train", type=non_negative_int, default=2000, help="training documents")
    f.add_argument("--n-test", type=non_negative_int, default=100, help="held-out test documents")
    f.add_argument(
        "--qa-per-doc", type=positive_int, default=2, help="held-out questions per document"
    )
    f.add_argument(
        "--train-qa-per-doc", type=positive_int, default=3, help="questions per training doc"
    )
    f.add_argument("--seed", type=int, default=0)
    _shard_args(f)
    f.set_defaults(func=_facts)

    ts = sub.add_parser(
        "task-suite", help="the synthetic T2L task suite in the Lots-of-LoRAs layout"
    )
    ts.add_argument("--out", required=True, help="output folder (one sub-folder per task)")
    ts.add_argument(
        "--kind",
        choices=("universe", "classic"),
        default="universe",
        help="universe: ~600 parametric tasks with held-out members and families; classic: the "
        "46-task suite the shipped T2L was trained on",
    )
    ts.add_argument(
        "--drop",
        default=None,
        help="universe: tasks to leave out: a JSON list, names by line, or the results.json of "
        "`eval t2l-suite --modes oracle` (tasks whose oracle LoRA scored under --min-oracle)",
    )
    ts.add_argument("--min-oracle", type=float, default=0.5, help="with --drop results.json")
    ts.add_argument(
        "--oracle-check",
        action="store_true",
        help="universe: only the tasks of the oracle check (both held-out sets, one training "
        "task per family)",
    )
    ts.add_argument(
        "--definition",
        choices=("none", "description"),
        default="none",
        help="each prompt's task definition: none (instruction-free: the task is only in the T2L "
        "description) or description (the task's first description, as the official SNI prompts "
        "hold the task's definition)",
    )
    ts.add_argument(
        "--n-train", type=non_negative_int, default=200, help="training examples per task"
    )
    ts.add_argument("--n-valid", type=non_negative_int, default=20)
    ts.add_argument("--n-test", type=non_negative_int, default=50)
    ts.add_argument("--seed", type=int, default=0)
    ts.set_defaults(func=_task_suite)

    i = sub.add_parser("inspect", help="count and size of a dataset file or folder")
    i.add_argument("path")
    i.set_defaults(func=_inspect)


def _shard_args(p) -> None:
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=None,
        help="--format tokens: records per shard (50000)",
    )
    p.add_argument(
        "--no-compress",
        action="store_true",
        help="--format tokens: store the shards uncompressed (default: deflate, ~19x smaller "
        "for NIAH)",
    )


def _check_token_flags(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    if args.format != "tokens":
        given = [n for n in names if getattr(args, n.replace("-", "_")) not in (None, False)]
        if given:
            raise ConfigError(f"--{', --'.join(given)}: only with --format tokens")


def _niah(args: argparse.Namespace) -> int:
    from hyperlora_jax.data import niah, niah_tokens, storage
    from hyperlora_jax.models.load import load_base_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.pieces and args.tokenizer:
        raise ConfigError("give --tokenizer or --pieces, not both")
    _check_token_flags(args, ("pieces", "workers", "shard-size", "no-compress"))
    if not args.pieces and not args.tokenizer:
        raise ConfigError("data niah needs --tokenizer (or --pieces FILE with --format tokens)")
    t0 = time.time()
    bins = niah.parse_bins(args.bins)
    common = dict(
        bins=bins,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        train_max_hi=args.train_max_hi,
        seed=args.seed,
    )
    if args.format == "tokens":
        if args.pieces:
            pieces = niah_tokens.NiahPieces.load(args.pieces)
        else:
            pieces = niah_tokens.NiahPieces.from_tokenizer(
                load_base_tokenizer(args.tokenizer), bins
            )
        summary = niah_tokens.generate_niah_tokens(
            pieces,
            args.out,
            workers=args.workers or 1,
            shard_size=args.shard_size or niah_tokens.DEFAULT_SHARD_SIZE,
            compress=not args.no_compress,
            **common,
        )
    else:
        summary = niah.generate_niah(
            load_base_tokenizer(args.tokenizer), args.out, fmt=args.format, **common
        )
    print(
        json.dumps(
            {
                "datasets": summary,
                "bytes": storage.dir_size(args.out),
                "seconds": round(time.time() - t0, 1),
            },
            indent=2,
        )
    )
    return 0


def _niah_pieces(args: argparse.Namespace) -> int:
    from hyperlora_jax.data import niah, niah_tokens
    from hyperlora_jax.models.load import load_base_tokenizer

    pieces = niah_tokens.NiahPieces.from_tokenizer(
        load_base_tokenizer(args.tokenizer), niah.parse_bins(args.bins)
    )
    path = pieces.save(args.out)
    print(json.dumps({"out": str(path), "bytes": path.stat().st_size}, indent=2))
    return 0


def _selfgen(args: argparse.Namespace) -> int:
    from hyperlora_jax.data import selfgen, storage
    from hyperlora_jax.models.load import load_base

    out = Path(args.out)
    if out.suffix not in (".parquet", ".jsonl", ".array_record"):
        raise ConfigError(f"--out {out}: use a .parquet, .jsonl or .array_record file")
    selfgen.process_part(0, args.process_index, args.num_processes)  # a bad index: before work
    mesh = mesh_from_args(args)
    docs, bad = storage.read_documents(
        args.docs, text_field=args.text_field, on_error=args.on_error, max_chars=args.max_chars
    )
    if args.limit:
        docs = docs[: args.limit]
    if not docs:
        raise InputError(f"no usable documents in {args.docs}")
    part = selfgen.process_part(len(docs), args.process_index, args.num_processes)
    if not part:
        raise InputError(
            f"process {args.process_index} of {args.num_processes} gets none of the "
            f"{len(docs)} documents; use at most {len(docs)} processes"
        )
    docs = docs[part.start : part.stop]
    out = selfgen.part_path(out, args.process_index, args.num_processes)
    config, params, tok, _ = load_base(args.model)
    cfg = selfgen.SelfGenConfig(
        n_qa_pairs=args.n_qa_pairs,
        repeat_round=not args.no_repeat_round,
        q_max_new_tokens=args.q_max_new_tokens or (256 if args.qg_prompt == "compact" else 2048),
        qg_prompt=args.qg_prompt,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        logprob_dtype=args.logprob_dtype,
    )
    sharded = {"mesh": mesh, "batch_size": args.batch_size}
    gen = selfgen.make_jax_generate(params, config, tok, **sharded)
    topk = selfgen.make_jax_topk(params, config, k=args.top_k, **sharded)
    questions = q_tok = q_gen = None
    if args.questions_field:
        questions = []
        for d in docs:
            qs = d.get(args.questions_field)
            if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
                raise InputError(
                    f"{d['source']} record {d['index']}: field {args.questions_field!r} is not a "
                    "list of strings"
                )
            questions.append(qs)
    elif args.question_model and args.question_model != args.model:
        qc, qp, q_tok, _ = load_base(args.question_model)
        q_gen = selfgen.make_jax_generate(qp, qc, q_tok, **sharded)
    else:
        q_tok, q_gen = tok, gen
    t0 = time.time()
    recs, stats = selfgen.self_generate(
        [d[args.text_field] for d in docs],
        tokenizer=tok,
        generate=gen,
        topk=topk,
        q_tokenizer=q_tok,
        q_generate=q_gen,
        questions=questions,
        cfg=cfg,
        on_error=args.on_error,
    )
    dt = time.time() - t0
    storage.write_records(out, recs)
    stats.update(
        documents=len(docs),
        document_range=[part.start, part.stop],
        records=len(recs),
        bad_input_records=[str(b) for b in bad],
        seconds=round(dt, 1),
        response_tokens_per_s=round(stats["response_tokens"] / max(dt, 1e-9), 2),
        bytes=storage.dir_size(out),
        out=str(out),
    )
    print(json.dumps(stats, indent=2))
    return 0


def _facts(args: argparse.Namespace) -> int:
    """train_docs.jsonl (context / prompts / responses: gold-answer training rows, or input to
    `data selfgen --text-field context --questions-field prompts`) or, with --format tokens,
    the same rows as token shards train_docs/shard-*.npz; val.jsonl / test.jsonl (plain QA rows
    for `eval d2l --qa ... --qa-format plain`)."""
    from hyperlora_jax.data import facts, storage, token_shards
    from hyperlora_jax.data.prompts import QA_INSTRUCTION
    from hyperlora_jax.models.load import load_base_tokenizer

    _check_token_flags(args, ("tokenizer", "shard-size", "no-compress"))
    if args.format == "tokens" and not args.tokenizer:
        raise ConfigError("data facts --format tokens needs --tokenizer (the base model)")
    out = check_output_dir(args.out)
    train = facts.generate_fact_documents(args.n_train, "train", args.seed)
    rows = facts.training_records(train, args.seed, QA_INSTRUCTION, args.train_qa_per_doc)
    if args.format == "tokens":
        meta = {"source": "facts", "split": "train", "seed": args.seed}
        written = token_shards.write_text_qa_shards(
            rows,
            load_base_tokenizer(args.tokenizer),
            out / "train_docs",
            meta=meta,
            shard_size=args.shard_size or 50_000,
            compress=not args.no_compress,
        )
        counts = {"train_docs": written["records"], "train_docs_shards": written["shards"]}
    else:
        counts = {"train_docs": storage.write_records(out / "train_docs.jsonl", rows)}
    for split in ("val", "test"):
        docs = facts.generate_fact_documents(args.n_test, split, args.seed)
        rows = facts.qa_records(docs, args.seed, args.qa_per_doc)
        counts[split] = storage.write_records(out / f"{split}.jsonl", rows)
    print(json.dumps(counts, indent=2))
    return 0


def _task_suite(args: argparse.Namespace) -> int:
    from hyperlora_jax.data import task_suite, task_universe

    sizes = (args.n_train, args.n_valid, args.n_test, args.seed)
    if args.kind == "classic":
        if args.drop:
            raise InputError("--drop is for the universe; the classic suite is fixed")
        out = task_suite.write_suite(args.out, *sizes, definition=args.definition)
        counts = {k: len(v) for k, v in task_suite.read_splits(out).items()}
    else:
        names = {t.name for t in task_universe.TASKS}
        drop = set(_task_list(args.drop, args.min_oracle)) if args.drop else set()
        unknown = sorted(drop - names)
        if unknown:
            raise InputError(f"--drop names unknown tasks, first {unknown[0]!r}; check {args.drop}")
        if args.oracle_check:
            drop |= names - set(task_universe.oracle_check_tasks())
        out = task_universe.write_universe(
            args.out, *sizes, drop=tuple(sorted(drop)), definition=args.definition
        )
        counts = {k: len(v) for k, v in task_suite.read_splits(out).items()} | {
            "dropped": len(drop)
        }
    print(json.dumps({"out": str(out), **counts}, indent=2))
    return 0


def _task_list(path: str, min_oracle: float) -> list[str]:
    """Task names from a JSON list, a text file with one name per line, or the results.json of
    `eval t2l-suite --modes oracle` (the tasks whose oracle scored below min_oracle)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no task list at {p}; give a JSON list, names by line or results.json")
    text = p.read_text()
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = text.split()
    if isinstance(names, dict) and isinstance(names.get("tasks"), dict):
        names = [t for t, r in names["tasks"].items() if r.get("oracle", 0.0) < min_oracle]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{p} is not a list of task names nor an eval results.json")
    return names


def _inspect(args: argparse.Namespace) -> int:
    from hyperlora_jax.data import storage, token_shards

    p = Path(args.path)
    if not p.exists():
        raise InputError(f"no dataset file or folder at {p}; check the path")
    files = storage.expand_paths(p) if p.is_dir() else [p]
    if p.is_dir():
        under = files_under(p)
        files += [f for f in under if f.suffix == ".array_record"]
        files += [f for f in under if f.suffix == ".npz"]
    info = {}
    for f in files:
        try:
            if f.suffix == ".npz":
                n = len(token_shards.read_shard(f))
            else:
                n = len(storage.RecordSource(f))
        except (InputError, OSError, ValueError) as e:
            n = f"unreadable: {e}"
        info[str(f)] = {"records": n, "bytes": storage.dir_size(f)}
    print(json.dumps(info, indent=2))
    bad = [f for f, v in info.items() if isinstance(v["records"], str)]
    if bad:  # the table above still lists the readable ones; the exit code must not say "fine"
        raise InputError(
            f"{len(bad)} of {len(info)} file(s) unreadable, first {bad[0]}: "
            f"{info[bad[0]]['records'].removeprefix('unreadable: ')}"
        )
    if not info:
        raise InputError(f"no dataset files in {p} (.jsonl, .parquet, .array_record, .npz)")
    return 0
