"""Load on `hyperlora-jax serve`: requests/s and p50/p95 latency at 1, 4 and 16 concurrent clients.

Starts the server (a subprocess, free loopback port) on the embedded default (SmolLM2-135M-
Instruct), makes a document adapter with the shipped D2L (examples/document.txt) and a task
adapter with the shipped T2L (examples/t2l_task.json's description) over HTTP, then sends short
chat requests (max_tokens 16) cycling over four adapter sets: none, the document adapter, the
task adapter, and both composed. Each concurrency level runs untimed warm passes (they compile
the batch shapes the level meets; their wall time is reported), then the measured pass. The
1-minute load average is recorded at each level: on a shared machine other work slows every
number.

  python -m benchmarks.serve_load                    # SmolLM2, levels 1,4,16; ~10-15 min on 2 cores
  python -m benchmarks.serve_load --quick --out /tmp/bench   # tiny fixture model, smoke (~1 min)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import select
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY = ROOT / "tests" / "fixtures" / "official" / "d2l"


def start_server(
    cmd: list[str], timeout: float = 600, env: dict | None = None
) -> tuple[subprocess.Popen, str, float]:
    """The server process, its base URL, and the seconds until it printed its 'serving' line."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = ""
    while "serving" not in line:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before serving")
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"no 'serving' line within {timeout} s")
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
    url = line.split(" at ", 1)[1].split()[0].removesuffix("/v1")
    return proc, url, time.perf_counter() - t0


def call(
    url: str, method: str, path: str, body: dict | None = None, raw: bytes | None = None
) -> tuple[int, dict]:
    """(status, parsed JSON body) of one request (raw: bytes sent as they are); HTTP errors are
    answers, not exceptions."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=1800) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def request_mix(base: str, questions: list[str], inputs: list[str], n: int, max_tokens: int):
    """n chat bodies cycling over: base model, document adapter, task adapter, both."""
    kinds = [
        ("base", {"model": base}, questions),
        ("doc", {"model": "doc"}, questions),
        ("task", {"model": "task"}, inputs),
        ("doc+task", {"model": "doc", "adapters": ["task"]}, questions),
    ]
    out = []
    for i in range(n):
        name, fields, prompts = kinds[i % len(kinds)]
        q = prompts[(i // len(kinds)) % len(prompts)]
        body = {**fields, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens}
        out.append((name, body))
    return out


def run_level(url: str, clients: int, bodies: list) -> dict:
    """All bodies through `clients` concurrent clients: wall time, latencies, batch sizes."""

    def one(item):
        t0 = time.perf_counter()
        status, payload = call(url, "POST", "/v1/chat/completions", item[1])
        ok = status == 200
        toks = payload["usage"]["completion_tokens"] if ok else 0
        return time.perf_counter() - t0, ok, toks

    before = call(url, "GET", "/stats")[1]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, bodies))
    wall = time.perf_counter() - t0
    after = call(url, "GET", "/stats")[1]
    lat = sorted(r[0] for r in results)
    batches = after["batches"] - before["batches"]
    return {
        "new_shapes": after["batch_shapes"] - before["batch_shapes"],
        "wall_s": wall,
        "latencies": lat,
        "errors": sum(not r[1] for r in results),
        "tokens": sum(r[2] for r in results),
        "batches": batches,
        "mean_batch": (after["requests"] - before["requests"]) / batches if batches else 0.0,
    }


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted xs."""
    k = max(0, min(len(xs) - 1, int(round(q / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny fixture model, smoke test")
    p.add_argument("--model", default=None, help="base model (default: the embedded default)")
    p.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    p.add_argument(
        "--min-requests", type=int, default=16, help="requests per level: max(this, 4 x clients)"
    )
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--warm-passes", type=int, default=2, help="untimed passes before each level")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",") if x]
    peaks = harness.measure_peaks(a.quick)  # before the server starts: nothing else running

    import portpicker

    port = portpicker.pick_unused_port()
    cmd = [sys.executable, "-m", "hyperlora_jax.cli", "serve", "--port", str(port)]
    cmd += ["--max-batch", str(a.max_batch), "--max-tokens", str(max(a.max_tokens, 16))]
    questions = [q["question"] for q in json.loads((EXAMPLES / "questions.json").read_text())]
    task = json.loads((EXAMPLES / "t2l_task.json").read_text())
    description, inputs = task["description"], task["inputs"]
    if a.quick:  # the tiny fixture: its D2L, and a random T2L with a precomputed embedding
        import tempfile

        sys.path.insert(0, str(ROOT / "tests"))
        from test_chat_session import TASKS, write_tiny_t2l

        tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
        t2l, embs = write_tiny_t2l(tmp)
        description = TASKS[0]
        cmd += ["--model", str(TINY / "tiny-gemma2"), "--d2l", str(TINY / "pytorch_model.bin")]
        cmd += ["--t2l", str(t2l), "--t2l-encoder", str(embs)]
        levels, a.min_requests = [1, 4], 4
    elif a.model:
        cmd += ["--model", a.model]
    load = {"start": os.getloadavg()[0]}
    proc, url, startup = start_server(cmd)
    try:
        base = call(url, "GET", "/v1/models")[1]["data"][0]["id"]
        rep = harness.Report(
            "serve_load",
            peaks,
            "quick" if a.quick else "full",
            notes=(
                f"`hyperlora-jax serve` on {base}, float32, --max-batch {a.max_batch}, max_tokens "
                f"{a.max_tokens}, greedy; requests cycle over no adapter / D2L document adapter / "
                "T2L task adapter / both composed. Latency = client-side wall time of one HTTP "
                "request (loopback). Each level ran --warm-passes untimed passes first (compiling "
                "the batch shapes it meets; warm_s) and then the measured pass; "
                "compiled_in_measured_pass counts the batch shapes first met in it (each costs "
                "a compilation inside the measured time). load_1min is the machine's "
                "1-minute load average when the level ended: above the core count, other work "
                "shared the cores and every number here is slower than on an idle machine. "
                "A batch decodes until its longest answer ends: alone, a request whose answer "
                "stops after 2-3 tokens returns early; in a batch it waits for the 16-token ones "
                "(tokens_per_s counts the tokens returned)."
            ),
        )
        rep.extra["server_start_s"] = round(startup, 2)
        doc = (EXAMPLES / "document.txt").read_text()
        for path, body in (
            ("/v1/adapters/internalize", {"name": "doc", "document": doc}),
            ("/v1/adapters/generate", {"name": "task", "description": description}),
        ):
            t0 = time.perf_counter()
            status, card = call(url, "POST", path, body)
            if status != 200:
                raise RuntimeError(f"{path}: {status} {card}")
            rep.add(
                "adapters",
                {"adapter": card["id"], "kind": card["kind"], "rank": card["rank"],
                 "modules": ",".join(card["modules"]),
                 "create_s_incl_load_compile": time.perf_counter() - t0},
            )  # fmt: skip
        for clients in levels:
            n = max(a.min_requests, 4 * clients)
            bodies = request_mix(base, questions, inputs, n, a.max_tokens)
            # warm passes: the batch shapes this level meets compile here, not when measured
            warm = [run_level(url, clients, bodies) for _ in range(a.warm_passes)]
            got = run_level(url, clients, bodies)
            lat = got["latencies"]
            rep.add(
                "load",
                {
                    "clients": clients,
                    "requests": n,
                    "errors": got["errors"],
                    "requests_per_s": n / got["wall_s"],
                    "p50_s": percentile(lat, 50),
                    "p95_s": percentile(lat, 95),
                    "mean_s": statistics.mean(lat),
                    "tokens_per_s": got["tokens"] / got["wall_s"],
                    "mean_batch": round(got["mean_batch"], 2),
                    "wall_s": got["wall_s"],
                    "warm_s": sum(w["wall_s"] for w in warm),
                    "compiled_in_measured_pass": got["new_shapes"],
                    "load_1min": os.getloadavg()[0],
                },
            )
        load["end"] = os.getloadavg()[0]
        rep.extra["load_average_1min"] = json.dumps({k: round(v, 2) for k, v in load.items()})
        rep.extra["stats"] = json.dumps(call(url, "GET", "/stats")[1])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    rep.write(a.out)
    plot(rep.tables["load"], Path(a.out) / "serve_load.png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """serve_load.png: requests/s and p50/p95 latency vs concurrent clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["clients"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 4.0), dpi=100)
    ax1.plot(xs, [r["requests_per_s"] for r in rows], marker="o")
    ax1.set(xlabel="concurrent clients", ylabel="requests / s", title="throughput")
    for key in ("p50_s", "p95_s"):
        ax2.plot(xs, [r[key] for r in rows], marker="o", label=key[:3])
    ax2.set(xlabel="concurrent clients", ylabel="seconds", title="latency per request")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    fig.suptitle("hyperlora-jax serve: batched chat with per-request adapters")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
