"""Internalizing long documents: wall time, peak RSS and adapter bytes vs document size.

Each (model, size) runs in a fresh subprocess: load the D2L hypernetwork and its base model,
tokenize and chunk a synthetic English-like document (--chunk-size 1024 by default), internalize
(chunks in fixed groups of CHUNK_GROUP through one compiled program), save the adapter. Peak RSS
is the child's own ru_maxrss (os.wait4), so runs do not mask each other; `rss_loaded_mib` is the
child's RSS after loading, and `peak_over_adapter_mib` = peak - loaded - adapter bytes: what the
internalization holds beyond the adapter it returns (flat if activations do not grow).

Models: `tiny` = the official tiny fixture (tests/fixtures/official/d2l: tiny-gemma2, 512-token
vocabulary: ~1.7 bytes/token), `smollm2` = the shipped SmolLM2-135M-Instruct hypernetwork
(hyperlora_jax.embedded; base model from ~/.cache/hyperlora_jax/models).

  .venv/bin/python -m benchmarks.long_document [--models tiny,smollm2] [--sizes-kb 1,100,500,2000]
      [--smollm2-max-kb 2000] [--chunk-size 1024] [--out benchmarks/results/long_document]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
WORDS = (
    "the of and to in is was that for it as with his on be at by had are but from or have an "
    "they which one you were her all she there would their we him been has when who will more "
    "no if out so said what up its about into than them can only other new some could time these "
    "two may then do first any my now such like our over man me even most made after also did "
    "many before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three river mountain library engine "
    "harbour committee protein orbit ledger violin glacier treaty algorithm cathedral"
).split()


def synthetic_text(n_bytes: int, seed: int = 0) -> str:
    """Deterministic English-like sentences, ~n_bytes of UTF-8, with numbered paragraphs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parts, size, para = [], 0, 0
    while size < n_bytes:
        para += 1
        sents = []
        for _ in range(int(rng.integers(3, 7))):
            w = rng.choice(WORDS, int(rng.integers(6, 18)))
            sents.append(" ".join(w).capitalize() + ".")
        p = f"{para}. " + " ".join(sents) + "\n\n"
        parts.append(p)
        size += len(p)
    return "".join(parts)[:n_bytes]


def _vm_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child(model: str, kb: float, chunk_size: int, work: Path) -> dict:
    from hyperlora_jax.api import load_d2l
    from hyperlora_jax.embedded import EMBEDDED_D2L
    from hyperlora_jax.lora.storage import save_adapter

    t0 = time.perf_counter()
    if model == "tiny":
        d2l = load_d2l(ROOT / "tests/fixtures/official/d2l/pytorch_model.bin")
    else:
        d2l = load_d2l(EMBEDDED_D2L)
    t_load = time.perf_counter() - t0
    rss_loaded = _vm_kib("VmRSS") * 1024
    import jax

    t0 = time.perf_counter()  # compiles the one group program every chunked document uses
    jax.block_until_ready(d2l.internalize(synthetic_text(20_000, seed=1), chunk_size))
    t_compile = time.perf_counter() - t0
    text = synthetic_text(int(kb * 1000))
    t0 = time.perf_counter()
    chunks = d2l.chunk_document(text, chunk_size)
    t_chunk = time.perf_counter() - t0
    t0 = time.perf_counter()
    ad = d2l.internalize(text, chunk_size)  # as `hyperlora-jax internalize`: tokenize, chunk, run
    jax.block_until_ready(ad)
    t_int = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = work / "adapter"
    save_adapter(ad, out, {"base_model": d2l.meta.get("base_model")})
    t_save = time.perf_counter() - t0
    return {
        "model": model,
        "doc_kb": kb,
        "doc_bytes": len(text.encode()),
        "doc_tokens": sum(len(c) for c in chunks),
        "chunk_size": chunk_size,
        "chunks": len(chunks),
        "window": d2l.ctx_config.max_position_embeddings,
        "rank": ad.rank,
        "load_s": round(t_load, 2),
        "chunk_s": round(t_chunk, 2),
        "warmup_s": round(t_compile, 2),  # a 20 kB document, compile included
        "internalize_s": round(t_int, 2),  # tokenize + chunk + internalize, compiled
        "save_s": round(t_save, 2),
        "adapter_bytes": sum(f.stat().st_size for f in out.iterdir()),
        "adapter_array_bytes": sum(x.nbytes for x in (*ad.a.values(), *ad.b.values())),
        "rss_loaded_mib": round(rss_loaded / MiB, 1),
        "vm_hwm_mib": round(_vm_kib("VmHWM") / 1024, 1),
    }


def run_one(model: str, kb: float, chunk_size: int, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "benchmarks.long_document", "--child", model,
               "--sizes-kb", str(kb), "--chunk-size", str(chunk_size), "--work", tmp]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"model": model, "doc_kb": kb, "error": f"over {timeout_s:.0f} s"}
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"model": model, "doc_kb": kb, "error": f"exit {proc.returncode}"}
        row = json.loads(stdout.strip().splitlines()[-1])
    row["wall_s"] = round(wall, 2)
    row["peak_rss_mib"] = row.pop("vm_hwm_mib")
    row["adapter_mib"] = round(row["adapter_array_bytes"] / MiB, 1)
    row["peak_over_adapter_mib"] = round(
        row["peak_rss_mib"] - row["rss_loaded_mib"] - row["adapter_mib"], 1
    )
    return row


def plot(rows: list[dict], out: Path) -> None:
    from hyperlora_jax.eval.plots import line_plot

    ok = [r for r in rows if "error" not in r]
    for key, ylabel, suffix in (
        ("peak_rss_mib", "MiB", "mem"),
        ("internalize_s", "seconds", "s"),
    ):
        series: dict = {}
        for r in ok:
            xs, ys = series.setdefault(f"{r['model']} {key}", ([], []))
            xs.append(r["doc_kb"])
            ys.append(r[key])
            if key == "peak_rss_mib":
                for k2 in ("adapter_mib", "peak_over_adapter_mib"):
                    xs2, ys2 = series.setdefault(f"{r['model']} {k2}", ([], []))
                    xs2.append(r["doc_kb"])
                    ys2.append(r[k2])
        line_plot(series, out / f"long_document_{suffix}.png", "document kB", ylabel,
                  f"D2L internalize vs document size: {ylabel}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--sizes-kb", default="1,100,500,2000")
    ap.add_argument(
        "--smollm2-max-kb",
        type=float,
        default=2000,
        help="skip larger SmolLM2 documents (2 MB: ~5 min of internalize on 2 cores)",
    )
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--timeout-s", type=float, default=3600)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/long_document"))
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="JSON results of earlier runs: one report of all their rows (no runs)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()  # fmt: skip
    sizes = [float(x) for x in a.sizes_kb.split(",")]
    if a.child:
        print(json.dumps(child(a.child, sizes[0], a.chunk_size, Path(a.work))), flush=True)
        return 0
    from benchmarks import harness

    rep = harness.Report(
        "long_document", {}, "full",
        notes=f"chunk size {a.chunk_size}; one fresh subprocess per row; synthetic English-like "
        "text. peak_rss_mib = the child's VmHWM; peak_over_adapter_mib = peak - RSS after "
        "loading - adapter arrays. warmup_s: a 20 kB document first (compiles the one group "
        "program); internalize_s: tokenize + chunk + internalize, compiled. The HF tokenizer "
        "call on the whole text is a transient of ~0.4 KB/token (tiny-gemma2, 2 MB = 1.15M "
        "tokens: 476 MiB measured alone), the one part of the peak that grows with the text; "
        "chunks run 8 at a time, so activations do not.",
    )  # fmt: skip
    for path in a.merge or ():
        old = json.loads(Path(path).read_text())
        for row in old["tables"].get("long_document", []):
            rep.add("long_document", row)
        rep.extra.update(old["extra"])
    measured = {f"{r['model']} {r['doc_kb']:g} kB" for r in rep.tables.get("long_document", [])}
    rep.extra = {k: v for k, v in rep.extra.items() if k not in measured}
    for model in () if a.merge else a.models.split(","):
        for kb in sizes:
            if model == "smollm2" and kb > a.smollm2_max_kb:
                done = [r for r in rep.tables.get("long_document", []) if r["model"] == model]
                est = (
                    f"; estimated {done[-1]['internalize_s'] * kb / done[-1]['doc_kb'] / 60:.0f} "
                    f"min from the {done[-1]['doc_kb']:g} kB run (time is linear in chunks)"
                    if done and "error" not in done[-1]
                    else ""
                )
                rep.extra[f"smollm2 {kb:g} kB"] = (
                    f"skipped (over --smollm2-max-kb {a.smollm2_max_kb:g}{est})"
                )
                continue
            rep.add("long_document", run_one(model, kb, a.chunk_size, a.timeout_s))
    out = Path(a.out)
    rep.write(out)
    plot(rep.tables.get("long_document", []), out)
    os.sync()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
