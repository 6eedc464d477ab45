"""The D2L learning gate: can the pipeline bind a context's value into the adapter, and how long
does the loss sit on the data's context-blind floor first?

Trains `configs/d2l.py:smollm2_embedded` from scratch on N NIAH records (SmolLM2-135M-Instruct,
bin 32-128, one chunk per context as the API internalizes short documents, 8 contexts per row),
logs the context-blind floor of the records and the first step whose 10-step mean loss is
under 0.9 x that floor, then (with --eval) exports the run and asks every record's question
through the public API (`DocToLoRA.from_checkpoint` -> `internalize` -> `generate`).

  python -m benchmarks.d2l_overfit --records 16 --steps 200 --eval        # the overfit check
  python -m benchmarks.d2l_overfit --records 16 --scaler-b-init 0.1 --until-floor
  python -m benchmarks.d2l_overfit --table runs/overfit/*.json            # markdown table

Each run writes JSON to --out (default benchmarks/results/d2l_overfit/<name>.json).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "d2l_overfit"


def niah_records(n: int, seed: int, tokenizer) -> list[dict]:
    """n NIAH records of the 32-128 bin (training needle pool), as `data niah` writes them."""
    import random

    from hyperlora_jax.data import niah

    ranges = niah.block_ranges(niah.LengthFn(tokenizer), [(32, 128)])
    k_lo, k_hi = ranges[(32, 128)]
    rng = random.Random(f"{seed}-overfit")
    pool = niah.needle_pools(seed)["train"]
    return niah.generate_split(
        n, list(range(k_lo, k_hi)), pool, rng, niah.LengthFn(tokenizer), (32, 128)
    )


def config(args, n_records: int):
    from hyperlora_jax.train.config_file import load_config

    c = load_config("configs/d2l.py:smollm2_embedded", [])
    rows = max(1, math.ceil(min(n_records, args.contexts_per_step) / 8))
    c.train.num_chunk_probs = None  # one chunk per context, as the API internalizes them
    c.train.update(
        dict(
            global_packs_per_step=rows,
            max_packed_inp_len=8 * 36,  # 8 NIAH queries of ~36 tokens
            max_packed_ctx_len=8 * 96,
            learning_rate=args.lr,
            warmup_steps=args.warmup,
            steps=args.steps,
            l1_coef=args.l1,
            compute_dtype=args.dtype,
            save_every=10**6,
            seed=args.seed,
        )
    )
    c.hypernet.scaler_b_init = args.scaler_b_init
    return c


def run(args) -> dict:
    import jax

    from hyperlora_jax.data import storage
    from hyperlora_jax.data.floor import items_floor
    from hyperlora_jax.data.selfgen import context_ids, qa_ids_and_labels
    from hyperlora_jax.models.fetch import fetch_model
    from hyperlora_jax.models.tokenizer import load_tokenizer
    from hyperlora_jax.train.factory import build_trainer

    model = str(fetch_model("smollm2-135m-instruct"))
    tok = load_tokenizer(model)
    records = niah_records(args.records, args.seed, tok)
    name = args.name or (
        f"n{args.records}_s{args.steps}_sb{args.scaler_b_init:g}_lr{args.lr:g}_l1{args.l1:g}"
        + ("" if args.dtype == "float32" else f"_{args.dtype}")
    )
    work = Path(args.workdir) / name
    data = work / "train.jsonl"
    storage.write_records(data, records)
    items = []
    for r in records:
        x, y = qa_ids_and_labels(tok, r["prompt"], r["response"])
        items.append({"ctx": context_ids(tok, r["context"]), "input_ids": [x], "labels": [y]})
    floor = items_floor(items)
    print(f"{name}: {len(records)} records, context-blind floor {floor:.4f} nats/label token")

    cfg = config(args, len(records))
    tr = build_trainer(cfg, workdir=str(work / "run"), data=[str(data)], base_model=model)
    tr.o.context_blind_floor = floor
    tr.o.progress = False
    if args.until_floor:  # stop a few steps after the floor is left (or at --steps)

        def stop_after_floor(trainer, step, row):
            if trainer.left_floor_at is not None:
                trainer.o.steps = step

        tr.hooks.append(stop_after_floor)
    t0 = time.time()
    try:
        rows = tr.run()
    finally:
        tr.close()
    minutes = (time.time() - t0) / 60
    losses = [r["main_loss"] for r in rows]
    res = {
        "name": name,
        "records": len(records),
        "steps": args.steps,
        "scaler_b_init": args.scaler_b_init,
        "lr": args.lr,
        "l1_coef": args.l1,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "contexts_per_step": min(len(records), args.contexts_per_step),
        "floor": floor,
        "left_floor_at": tr.left_floor_at,
        "steps_run": len(rows),
        "minutes": round(minutes, 2),
        "loss_10step_means": [
            round(sum(losses[i : i + 10]) / len(losses[i : i + 10]), 4)
            for i in range(0, len(losses), 10)
        ],
        "device": str(jax.devices()[0]),
    }
    print(
        f"{name}: left the floor at step {tr.left_floor_at} ({len(rows)} steps, {minutes:.1f} min)"
    )
    if args.eval:
        res.update(evaluate(work, records, model))
    out = Path(args.out or RESULTS / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return res


def evaluate(work: Path, records: list[dict], model: str) -> dict:
    """Export the run and ask every record's question through the public API."""
    from hyperlora_jax.api import DocToLoRA
    from hyperlora_jax.train.export import export_run

    ckpt = export_run(str(work / "run"), str(work / "export"), overwrite=True)
    d2l = DocToLoRA.from_checkpoint(ckpt, base_model=model)
    answers = []
    for r in records:
        adapter = d2l.internalize(r["context"])
        answers.append(d2l.generate(r["prompt"], adapter, max_new_tokens=12).strip())
    exact = sum(a == r["response"] for a, r in zip(answers, records))
    print(f"API: {exact}/{len(records)} exact, {len(set(answers))} distinct answers")
    return {"api_exact": exact, "api_distinct": len(set(answers)), "api_answers": answers}


def table(paths: list[str]) -> str:
    rows = [json.loads(Path(p).read_text()) for p in paths]
    out = [
        "| records | scaler_B init | lr (cosine over) | L1 | dtype | contexts/step | floor (nats) "
        "| left the floor at step | steps run | last 10-step loss | API exact, distinct |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["records"], r["scaler_b_init"], r["lr"], -r["l1_coef"], r["dtype"])  # noqa: E731
    for r in sorted(rows, key=key):
        left = r["left_floor_at"] if r["left_floor_at"] is not None else f"> {r['steps_run']}"
        api = f"{r['api_exact']}/{r['records']}, {r['api_distinct']}" if "api_exact" in r else "-"
        out.append(
            f"| {r['records']} | {r['scaler_b_init']:g} | {r['lr']:g} ({r['steps']}) "
            f"| {r['l1_coef']:g} "
            f"| {r['dtype']} | {r['contexts_per_step']} | {r['floor']:.3f} | {left} "
            f"| {r['steps_run']} | {r['loss_10step_means'][-1]:.3f} | {api} |"
        )
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--contexts-per-step", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--scaler-b-init", type=float, default=0.0)
    p.add_argument("--l1", type=float, default=1.5, help="L1 coefficient (preset: 1.5)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--until-floor", action="store_true", help="stop once the floor is left")
    p.add_argument("--eval", action="store_true", help="export and ask through the API")
    p.add_argument("--workdir", default="runs/overfit")
    p.add_argument("--name")
    p.add_argument("--out")
    p.add_argument("--table", nargs="+", help="print the markdown table of these result files")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    run(args)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    main()
