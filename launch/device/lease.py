"""The GPU lease: train the embedded Doc-to-LoRA (job d2l) or the task-universe Text-to-LoRA (job
t2l) on one lent H200 in two calls of the device tool. The procedure, the time plan and its
arithmetic are in launch/device/README.md. The d2l job goes first; t2l runs in a session whose
d2l lease is done. `--job t2l` on every command below selects the T2L job (default d2l).

Here (this repository's venv):
    python launch/device/lease.py prepare    # .gpu/ (GGUF halves, wheels, tokenizer, NIAH pieces),
                                             # shipped params out of the traveling tree, size check
    python launch/device/lease.py dry-run    # both calls end to end on this CPU, tiny sizes
                                             # (t2l: --job t2l --tasks 16, a universe subset)
    python launch/device/lease.py restore    # after the lease: the shipped params tracked again
There (device tool `run`, the commands `prepare` prints):
    python3 launch/device/lease.py call1     # carry .gpu/call1: setup, data, probe of the step
    python3 launch/device/lease.py call2     # carry .gpu/call2, within 30 s: join, convert, train

Only the standard library is imported at module level: call 1 installs the missing wheels first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CALL1, CALL2 = REPO / ".gpu" / "call1", REPO / ".gpu" / "call2"  # the carried folders
MiB = 2**20
CALL_LIMIT = 62 * MiB  # the device tool sends 64 MiB at most; 2 MiB of headroom
OUT_FILES, OUT_FILE_BYTES = 8, 16 * MiB  # what comes back from $OUT
COLD_EXIT, BAD_MODEL_EXIT = 42, 43
IMPORT_S = 10  # Python start and imports of a `train` process, before its budget's clock starts
MODEL = "smollm2-135m-instruct"
# Missing from the device image (launch/device/README.md); their own needs are all there.
WHEELS = (
    "grain==0.2.18",
    "array-record==0.8.6",
    "portpicker==1.6.0",
    "ml-collections==1.1.0",
    "gguf==0.19.0",
    "tensorboardX==2.6.5",
)
# Tracked files that need not travel: the shipped hypernetwork weights (55 MiB).
SHIPPED_PARAMS = (
    "hyperlora_jax/checkpoints/d2l-smollm2-135m-instruct/params.safetensors",
    "hyperlora_jax/checkpoints/t2l-smollm2-135m-instruct/params.safetensors",
    "hyperlora_jax/checkpoints/t2l-smollm2-135m-instruct-universe/params.safetensors",
)
EXCLUDE_MARK = "# hyperlora lease: shipped params kept out of the device calls"
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# ----------------------------------------------------------------------------- the plan
JOBS = ("d2l", "t2l")
CONFIGS = {"d2l": "configs/d2l.py:smollm2_gpu", "t2l": "configs/t2l.py:smollm2_universe_gpu"}
ROWS_KEY = {"d2l": "global_packs_per_step", "t2l": "n_tasks_per_batch"}  # what the probe sizes
UNIT = {"d2l": "contexts", "t2l": "examples"}  # what a step's num_items counts
T2L_PACK = "t2l.tar.xz"  # call 1: the universe's training tasks + their description embeddings
NIAH_BINS = ((32, 128), (128, 256))  # the official NIAH training bins
PLAN = {  # real sizes; --tiny (the dry run) uses TINY
    "niah_train": 640_000,  # official NIAH recipe: bins 32-128 and 128-256
    "fact_docs": 20_000,
    "workers": 16,
    "rows": (32, 16, 8),  # rows per step, tried in this order until the probe fits in memory
    "probe_steps": 12,  # then 1 more from its checkpoint: Orbax save + restore on the GPU
    "call2_deadline_s": 420,  # of the 600 s the call may run; transfers are outside it
    "stage2_share": 0.35,  # of the training time: NIAH + facts, lr decayed over the clock
    "final_reserve_s": 30,  # export + packing $OUT
    "overrides": [],
}
TINY = {
    "niah_train": 96,
    "fact_docs": 24,
    "workers": 2,
    "rows": (1,),
    "probe_steps": 1,
    "call2_deadline_s": 100,
    "stage2_share": 0.35,
    "final_reserve_s": 20,
    "overrides": [
        "--config.train.max_packed_inp_len=128",
        "--config.train.max_packed_ctx_len=512",
        "--config.train.max_contexts_per_pack=2",
        "--config.train.warmup_steps=1",
    ],
}

T2L_PLAN = {  # one stage: T2L-SFT on the task universe over call 2's whole training time
    "rows": (64, 32, 16),  # tasks per step (1 example each), tried until the probe fits
    "probe_steps": 12,
    "call2_deadline_s": 420,
    "final_reserve_s": 30,
    "overrides": [],
}
T2L_TINY = {
    "rows": (2,),
    "probe_steps": 1,
    "call2_deadline_s": 100,
    "final_reserve_s": 20,
    "overrides": [],
}
PLANS = {
    ("d2l", False): PLAN,
    ("d2l", True): TINY,
    ("t2l", False): T2L_PLAN,
    ("t2l", True): T2L_TINY,
}


def log(msg: str) -> None:
    print(f"[lease {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fail(msg: str, code: int = 1):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# ============================================================================= here
def traveling_files(root: Path = REPO) -> list[Path]:
    """What the device tool sends: tracked files plus untracked files git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = [root / p for p in out.split("\0") if p]
    return [p for p in files if p.is_file() and not p.is_symlink()]


def tree_bytes(root: Path = REPO) -> int:
    """The traveling tree's size once the shipped params are out of it."""
    shipped = {root / p for p in SHIPPED_PARAMS}
    return sum(p.stat().st_size for p in traveling_files(root) if p not in shipped)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _exclude_file() -> Path:
    return REPO / ".git" / "info" / "exclude"


def untrack_shipped_params() -> None:
    """Keep the shipped params out of the traveling tree: untracked and ignored (locally, in
    .git/info/exclude) until `restore`. `git status` shows them as deleted meanwhile: commit
    nothing before `restore`."""
    ex = _exclude_file()
    text = ex.read_text() if ex.exists() else ""
    if EXCLUDE_MARK in text:
        return
    tracked = subprocess.run(
        ["git", "ls-files", "--", *SHIPPED_PARAMS], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    if tracked:
        subprocess.run(["git", "rm", "-q", "--cached", "--", *tracked], cwd=REPO, check=True)
    ex.parent.mkdir(parents=True, exist_ok=True)
    ex.write_text(text + f"\n{EXCLUDE_MARK}\n" + "".join(f"/{p}\n" for p in SHIPPED_PARAMS))


def restore() -> None:
    """Undo untrack_shipped_params: the index entries back from HEAD, the exclusion lines gone."""
    ex = _exclude_file()
    if ex.exists() and EXCLUDE_MARK in ex.read_text():
        keep, skip = [], False
        for line in ex.read_text().splitlines():
            if line == EXCLUDE_MARK:
                skip = True
                continue
            if skip and line.lstrip("/") in SHIPPED_PARAMS:
                continue
            skip = False
            keep.append(line)
        ex.write_text("\n".join(keep).rstrip("\n") + "\n")
    subprocess.run(["git", "reset", "-q", "--", *SHIPPED_PARAMS], cwd=REPO, check=True)
    log("shipped params tracked again (git status should be clean of them)")


def _download_wheels(dest: Path, python_version: str = "3.12") -> None:
    """The WHEELS for CPython `python_version` on x86-64 manylinux (the device's: 3.12)."""
    dest.mkdir(parents=True, exist_ok=True)
    want = {w.split("==")[0].lower().replace("-", "_") for w in WHEELS}
    have = {p.name.split("-")[0].lower() for p in dest.glob("*.whl")}
    if want <= have:
        return
    plats = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)] + [
        "manylinux2014_x86_64",
        "manylinux1_x86_64",
    ]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for p in plats:
        cmd += ["--platform", p]
    r = subprocess.run(cmd + list(WHEELS), capture_output=True, text=True)
    if r.returncode:
        fail(f"pip download of the device wheels failed (is PyPI reachable?):\n{r.stderr[-1500:]}")


def _t2l_pack(dest: Path, n_tasks: int = 0) -> dict:
    """dest/t2l.tar.xz: the task universe's training tasks (metadata + train split of `data
    task-suite --definition description`, the universe launch/t2l_smollm2_universe.sh trains and
    evaluates on; the first n_tasks of them when n_tasks > 0, for rehearsals) and
    task_embeddings.npz: their descriptions embedded here by the t2l preset's encoder, so the
    device needs no sentence encoder. int8 with one scale per vector (`PrecomputedEncoder`): in
    float16 the 521 tasks' vectors would take call 2 past its limit; the rounding (at most 1/254 of
    a vector's largest element, ~0.7% of its norm) is far under the spread between paraphrases of
    one task (~46%)."""
    import tarfile
    import tempfile

    import numpy as np
    import yaml

    from hyperlora_jax.data import sni
    from hyperlora_jax.hypernet.t2l import task_encoder as te
    from hyperlora_jax.train.config_file import load_config

    config = load_config(CONFIGS["t2l"], [])
    spec, n_descs = dict(config.encoder), config.train.n_descs_per_ds
    with tempfile.TemporaryDirectory() as tmp:
        full, uni, npz = Path(tmp) / "full", Path(tmp) / "universe", Path(tmp) / "embs.npz"
        cmd = [sys.executable, "-m", "hyperlora_jax.cli", "data", "task-suite", f"--out={full}"]
        cmd.append("--definition=description")  # the shipped universe T2L's prompts
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if r.returncode:
            fail(f"`{' '.join(cmd)}` exited {r.returncode}:\n{r.stderr[-1500:]}")
        names = yaml.safe_load((full / "splits.yaml").read_text())["train"]
        names = names[:n_tasks] if n_tasks > 0 else names
        descs = []
        for n in names:
            (uni / n).mkdir(parents=True)
            for f in ("metadata.yaml", "train.jsonl"):
                shutil.copy2(full / n / f, uni / n / f)
            ds = sni.load_metadata(full / n)["descriptions"]  # what sni.tokenize_task keeps
            descs += [d for d in ds if isinstance(d, str) and d.strip()][:n_descs]
        (uni / "splits.yaml").write_text(yaml.safe_dump({"train": names}))
        enc = te.from_spec(spec, None)
        log(f"embedding {len(descs)} descriptions of {len(names)} tasks with {spec['model']}")
        embs = np.concatenate([enc.encode(descs[i : i + 256]) for i in range(0, len(descs), 256)])
        scale = (np.abs(embs).max(axis=1) / 127).astype(np.float32)
        np.savez(
            npz,
            descriptions=np.array(descs),
            embeddings=np.round(embs / scale[:, None]).astype(np.int8),
            scale=scale,
            encoder=np.array(json.dumps(spec)),
        )
        with tarfile.open(dest / T2L_PACK, "w:xz") as tar:
            tar.add(uni, "universe")
            tar.add(npz, "task_embeddings.npz")
    return {"tasks": len(names), "descriptions": len(descs)}


def prepare(args) -> dict:
    """Build GPU/call1 and GPU/call2 (GPU = --gpu-dir, default .gpu) for --job, check both
    calls' sizes, and (unless --keep-tracked, as the dry run's test does) take the shipped params
    out of the traveling tree."""
    from safetensors import safe_open

    from hyperlora_jax.data import niah_tokens
    from hyperlora_jax.models.fetch import KNOWN_MODELS, fetch_model
    from hyperlora_jax.models.tokenizer import load_tokenizer

    folder = fetch_model(MODEL)
    gguf = folder / "source.gguf"
    if not gguf.is_file() or sha256(gguf) != KNOWN_MODELS[MODEL].sha256:
        fail(
            f"{gguf} is missing or damaged: delete {folder} and run `hyperlora-jax fetch-model "
            f"{MODEL}`"
        )
    gpu = Path(args.gpu_dir or REPO / ".gpu")
    call1_dir, call2_dir = gpu / "call1", gpu / "call2"
    shutil.rmtree(gpu, ignore_errors=True)
    (call1_dir / "model").mkdir(parents=True)
    call2_dir.mkdir(parents=True)
    _download_wheels(call1_dir / "wheels")
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copy2(folder / name, call1_dir / "model" / name)
    with safe_open(str(folder / "model.safetensors"), "np") as f:  # the probe's random weights
        spec = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    (call1_dir / "weights_spec.json").write_text(json.dumps(spec))
    job, extra = args.job, {}
    if job == "d2l":
        tok = load_tokenizer(folder)
        niah_tokens.NiahPieces.from_tokenizer(tok, NIAH_BINS).save(call1_dir / "niah_pieces.json")
    else:
        extra = {"subset": args.tasks, **_t2l_pack(call1_dir, args.tasks)}

    if not args.keep_tracked:
        untrack_shipped_params()
    tree = tree_bytes()
    gguf_bytes = gguf.stat().st_size
    part1 = CALL_LIMIT - tree - dir_bytes(call1_dir) - 64 * 1024  # the manifest and slack
    if gguf_bytes - part1 + tree > CALL_LIMIT:
        fail(
            f"the GGUF ({gguf_bytes / MiB:.1f} MiB) does not fit two calls beside a "
            f"{tree / MiB:.1f} MiB tree: make the traveling tree smaller"
        )
    with gguf.open("rb") as src:
        (call1_dir / "gguf.part1").write_bytes(src.read(part1))
        (call2_dir / "gguf.part2").write_bytes(src.read())
    manifest = {
        "job": job,
        **extra,
        "model": MODEL,
        "sha256": KNOWN_MODELS[MODEL].sha256,
        "bytes": gguf_bytes,
        "part1": {"bytes": part1, "sha256": sha256(call1_dir / "gguf.part1")},
        "part2": {"bytes": gguf_bytes - part1, "sha256": sha256(call2_dir / "gguf.part2")},
    }
    for d in (call1_dir, call2_dir):
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    sizes = {
        "tree": tree,
        "call1": tree + dir_bytes(call1_dir),
        "call2": tree + dir_bytes(call2_dir),
    }
    for k, v in sizes.items():
        log(f"{k}: {v / MiB:.2f} MiB")
    for k in ("call1", "call2"):
        if sizes[k] > CALL_LIMIT:
            fail(f"{k} would send {sizes[k] / MiB:.1f} MiB > {CALL_LIMIT / MiB:.0f} MiB")
    log(
        "ready. The shipped params are untracked until `python launch/device/lease.py restore`:"
        " commit nothing before that."
    )
    j = "" if job == "d2l" else f" --job {job}"
    log(
        f'call 1: run(command="python3 launch/device/lease.py call1{j}", carry=[".gpu/call1"], '
        "timeout_s=420)"
    )
    log(
        "call 2 (within 30 s of call 1's reply; D = min(420, budget_left_s - 90) from call 1's "
        f'lease): run(command="python3 launch/device/lease.py call2{j} --deadline-s D", '
        'carry=[".gpu/call2"], timeout_s=600)'
    )
    return sizes


# ============================================================================= there
class Device:
    """Paths and environment of a call on the device (or of the dry run here)."""

    def __init__(self, tiny: bool, job: str = "d2l"):
        self.tiny, self.job = tiny, job
        self.plan = PLANS[job, tiny]
        self.tmp = Path(os.environ.get("LEASE_TMP", "/tmp/lease"))
        self.out = Path(os.environ.get("OUT") or fail("$OUT is not set"))
        self.python = sys.executable
        self.env = dict(os.environ)
        paths = [str(REPO), str(self.tmp / "site"), os.environ.get("PYTHONPATH", "")]
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self.env["JAX_COMPILATION_CACHE_DIR"] = str(self.tmp / "jax_cache")
        self.env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        self.env["TQDM_DISABLE"] = "1"
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

    def run(self, *cmd: str, log_to: Path | None = None, check: bool = True) -> int:
        """Run a command with the lease environment, its output shown and appended to log_to."""
        log("$ " + " ".join(cmd))
        with subprocess.Popen(
            cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as p:
            sink = log_to.open("a") if log_to else None
            for line in p.stdout:
                sys.stdout.write(line)
                if sink:
                    sink.write(line)
            if sink:
                sink.close()
        if check and p.returncode:
            fail(f"`{' '.join(cmd)}` exited {p.returncode}", p.returncode)
        return p.returncode

    def cli(self, *args: str, **kw) -> int:
        return self.run(self.python, "-m", "hyperlora_jax.cli", *args, **kw)

    def train_args(self, workdir: Path, data: list[Path], *extra: str, rows=None, sets=()):
        """`train` arguments: the plan's overrides, call 1's `--set`s and rows per step (the
        probe's choice; call 2 reads both from /tmp/lease/plan.json, so it runs the program
        the probe compiled)."""
        if rows is None:
            plan = json.loads((self.tmp / "plan.json").read_text())
            rows, sets = plan["rows"], plan["sets"]
        args = ["train", f"--config={CONFIGS[self.job]}", f"--workdir={workdir}"]
        args += [f"--data={d}" for d in data] + list(self.plan["overrides"])
        args += [f"--config.{kv}" for kv in sets]
        return args + [f"--config.train.{ROWS_KEY[self.job]}={rows}", *extra]

    def manifest(self, folder: Path) -> dict:
        """A carried folder's manifest, which must be of this call's job."""
        m = json.loads((folder / "manifest.json").read_text())
        if m.get("job", "d2l") != self.job:
            fail(
                f"{folder} was prepared for the {m.get('job', 'd2l')} job, not {self.job}: pass "
                f"--job {m.get('job', 'd2l')}, or run `lease.py prepare --job {self.job}` here"
            )
        return m


def call1(args) -> None:
    """Stage GGUF part 1, install the wheels, report the machine, build the data, and run the
    real training step on random weights of the real shapes: it compiles into the persistent
    cache (call 2 reuses the program), saves, restores and measures the step time."""
    d = Device(args.tiny, args.job)
    t0 = time.time()
    d.tmp.mkdir(parents=True, exist_ok=True)
    d.out.mkdir(parents=True, exist_ok=True)
    logf = d.out / "call1.log"
    manifest = d.manifest(CALL1)
    shutil.copy2(CALL1 / "gguf.part1", d.tmp / "gguf.part1")
    if sha256(d.tmp / "gguf.part1") != manifest["part1"]["sha256"]:
        fail("GGUF part 1 arrived damaged: run prepare again", BAD_MODEL_EXIT)
    wheels = sorted(str(p) for p in (CALL1 / "wheels").glob("*.whl"))
    d.run(
        d.python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(d.tmp / "site"),
        *wheels,
        log_to=logf,
    )
    d.run(
        d.python, str(Path(__file__)), "report", "--json", str(d.tmp / "machine.json"), log_to=logf
    )

    data = d.tmp / "data"
    shutil.rmtree(data, ignore_errors=True)
    p = d.plan
    if d.job == "t2l":
        probe_data, probe_extra = t2l_data(data, max(p["rows"]))
    else:
        probe_data, probe_extra = d2l_data(d, data, logf), []

    # the probe: random weights, real shapes -> the same compiled program as call 2's training
    fake = d.tmp / "random_model"
    d.run(d.python, str(Path(__file__)), "random-weights", str(fake), log_to=logf)
    probe = d.tmp / "probe"
    n = p["probe_steps"]
    for rows in p["rows"]:  # the most rows per step that fit in the accelerator's memory
        shutil.rmtree(probe, ignore_errors=True)
        common = d.train_args(
            probe, probe_data, f"--base_model={fake}", *probe_extra, rows=rows, sets=args.set
        )
        rc = d.cli(
            *common,
            f"--config.train.steps={n}",
            f"--config.train.save_every={n}",
            log_to=logf,
            check=False,
        )
        if rc == 0:
            break
        if "RESOURCE_EXHAUSTED" not in logf.read_text()[-20000:] or rows == p["rows"][-1]:
            fail(f"the probe failed with {rows} rows per step (exit {rc}); see call1.log", rc)
        log(f"{rows} rows per step do not fit in memory; trying fewer")
    (d.tmp / "plan.json").write_text(json.dumps({"rows": rows, "sets": args.set}))
    # a new process restores step n and runs one more: Orbax restore, and the compile cache hit
    d.cli(*common, f"--config.train.steps={n + 1}", log_to=logf)
    rows = read_metrics(probe / "metrics.jsonl")
    if [r["step"] for r in rows][-2:] != [n, n + 1]:
        fail(f"the probe did not resume from its checkpoint: steps {[r['step'] for r in rows]}")
    timed = [r["step_time"] for r in rows[1:n]] or [rows[-1]["step_time"]]
    summary = {
        "job": d.job,
        "machine": json.loads((d.tmp / "machine.json").read_text()),
        "probe": {
            "first_step_s (compile)": rows[0]["step_time"],
            "resumed_first_step_s (cache)": rows[n]["step_time"],
            "step_s_median": sorted(timed)[len(timed) // 2],
            "matmul_flops_per_step": rows[-1]["flops_per_s"] * rows[-1]["step_time"],
            f"{UNIT[d.job]}_per_step": rows[-1]["num_items"],
            "rows_per_step": json.loads((d.tmp / "plan.json").read_text())["rows"],
        },
        "data_bytes": dir_bytes(data),
        "call1_s": round(time.time() - t0, 1),
    }
    (d.tmp / "call1.json").write_text(json.dumps(summary, indent=1))
    shutil.copy2(d.tmp / "call1.json", d.out / "call1.json")
    (d.tmp / "call1.ok").write_text(d.job)
    log(f"call 1 done in {summary['call1_s']} s: {json.dumps(summary['probe'])}")


def t2l_data(data: Path, n_probe: int) -> tuple[list[Path], list[str]]:
    """Unpack call 1's universe and embeddings into `data`; the probe's --data (the universe's
    first n_probe tasks: the same shapes, hence the same program, without tokenizing all of
    them twice) and overrides."""
    import tarfile

    import yaml

    data.mkdir(parents=True)
    with tarfile.open(CALL1 / T2L_PACK) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(data, filter="data")
        else:  # Python < 3.11.4 (the dry run on an older venv)
            tar.extractall(data)  # noqa: S202 (our own archive)
    names = yaml.safe_load((data / "universe" / "splits.yaml").read_text())["train"][:n_probe]
    probe = data / "probe_universe"
    probe.mkdir()
    (probe / "splits.yaml").write_text(yaml.safe_dump({"train": names}))
    for n in names:
        (probe / n).symlink_to(data / "universe" / n, target_is_directory=True)
    return [probe], [t2l_embeddings_flag(data)]


def t2l_embeddings_flag(data: Path) -> str:
    return f"--config.train.task_embeddings={data / 'task_embeddings.npz'}"


def d2l_data(d: Device, data: Path, logf: Path) -> list[Path]:
    """The NIAH shards and fact documents of the plan (call 1); the probe's --data."""
    p = d.plan
    bins = ",".join(f"{lo}-{hi}" for lo, hi in NIAH_BINS)
    d.cli(
        "data",
        "niah",
        f"--pieces={CALL1 / 'niah_pieces.json'}",
        f"--out={data / 'niah'}",
        f"--bins={bins}",
        f"--n-train={p['niah_train'] // len(NIAH_BINS)}",
        "--n-val=0",
        "--n-test=0",
        "--format=tokens",
        f"--workers={p['workers']}",
        log_to=logf,
    )
    d.cli(
        "data",
        "facts",
        f"--out={data / 'facts'}",
        f"--n-train={p['fact_docs']}",
        "--n-test=0",
        "--format=tokens",
        f"--tokenizer={CALL1 / 'model'}",
        log_to=logf,
    )
    return niah_dirs(data, NIAH_BINS[:1])


def niah_dirs(data: Path, bins=NIAH_BINS) -> list[Path]:
    """The NIAH training shards of these bins."""
    return [data / "niah" / f"ctx_magic_number_{lo}_{hi}" / "train" for lo, hi in bins]


def read_metrics(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if "loss" in r]


def call2(args) -> None:
    """Join and check the GGUF, convert it, train (d2l: stage 1, NIAH, and stage 2, NIAH +
    facts; t2l: T2L-SFT on the universe) under time budgets, export, and pack at most 8 files
    of at most 16 MiB into $OUT."""
    t0 = time.time()
    d = Device(args.tiny, args.job)
    p = d.plan
    if not (d.tmp / "call1.ok").exists():
        fail(
            "the machine went cold: call 1's files are gone from /tmp. Start over with call 1",
            COLD_EXIT,
        )
    d.out.mkdir(parents=True, exist_ok=True)
    logf = d.out / "call2.log"
    manifest = d.manifest(CALL2)
    gguf = d.tmp / "model.gguf"
    with gguf.open("wb") as f:
        for part in (d.tmp / "gguf.part1", CALL2 / "gguf.part2"):
            with part.open("rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)
    if sha256(gguf) != manifest["sha256"]:
        fail(
            f"the joined GGUF's sha256 is not {manifest['sha256']}: run prepare again",
            BAD_MODEL_EXIT,
        )
    model = d.tmp / "model"
    d.run(d.python, str(Path(__file__)), "convert", str(gguf), str(model), log_to=logf)

    data = d.tmp / "data"
    runs = d.tmp / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    deadline = t0 + (args.deadline_s or p["call2_deadline_s"])
    if d.job == "t2l":
        return call2_t2l(d, t0, deadline, model, data, runs, logf)
    train_s = deadline - time.time() - p["final_reserve_s"]
    share = p["stage2_share"] if args.stage2_share is None else args.stage2_share
    stage2_s = share * train_s
    stages = {}
    # stage 1: the official NIAH recipe, constant lr after warmup. A budget counts from the
    # train command's start; IMPORT_S more go to starting Python and importing JAX before it.
    s1 = runs / "stage1"
    budget1 = deadline - time.time() - p["final_reserve_s"] - stage2_s - IMPORT_S
    d.cli(
        *d.train_args(
            s1,
            niah_dirs(data),
            f"--base_model={model}",
            f"--config.train.time_budget_s={budget1:.0f}",
        ),
        log_to=logf,
    )
    d.cli("export-run", f"--workdir={s1}", f"--out={runs / 'stage1_export'}", log_to=logf)
    stages["stage1"] = stage_stats(s1, budget1)
    if not share:  # NIAH only: stage 1 is the result
        shutil.copytree(runs / "stage1_export", runs / "final")
        summary = {"call1": json.loads((d.tmp / "call1.json").read_text()), "stages": stages}
        summary["call2_s"] = round(time.time() - t0, 1)
        pack_out(d.out, runs / "final", summary, {"stage1": s1})
        log(f"call 2 done in {summary['call2_s']} s; stage1: {json.dumps(stages['stage1'])}")
        return
    # stage 2: NIAH + fact documents from stage 1's weights, lr cosine-decayed over the clock
    s2 = runs / "stage2"
    budget2 = deadline - time.time() - p["final_reserve_s"] - IMPORT_S
    # the longer NIAH bin beside the facts: ~3 NIAH contexts per fact QA (one per item)
    s2_data = [*niah_dirs(data, NIAH_BINS[1:]), data / "facts" / "train_docs"]
    d.cli(
        *d.train_args(
            s2,
            s2_data,
            f"--base_model={model}",
            f"--config.train.time_budget_s={budget2:.0f}",
            "--config.train.lr_time_decay=True",
            f"--config.train.init_from={runs / 'stage1_export'}",
        ),
        log_to=logf,
    )
    final = runs / "final"
    d.cli("export-run", f"--workdir={s2}", f"--out={final}", log_to=logf)
    stages["stage2"] = stage_stats(s2, budget2)
    summary = {
        "call1": json.loads((d.tmp / "call1.json").read_text()),
        "stages": stages,
        "call2_s": round(time.time() - t0, 1),
    }
    pack_out(d.out, final, summary, {"stage1": s1, "stage2": s2})
    log(f"call 2 done in {summary['call2_s']} s")
    for name, st in stages.items():
        log(f"{name}: {json.dumps(st)}")


def call2_t2l(d: Device, t0: float, deadline: float, model, data, runs, logf) -> None:
    """The t2l job's training: one run of T2L-SFT on the universe until the deadline's budget
    (lr cosine-decayed over it by the preset), the program call 1's probe compiled."""
    p = d.plan
    work = runs / "t2l"
    budget = deadline - time.time() - p["final_reserve_s"] - IMPORT_S
    d.cli(
        *d.train_args(
            work,
            [data / "universe"],
            f"--base_model={model}",
            t2l_embeddings_flag(data),
            f"--config.train.time_budget_s={budget:.0f}",
        ),
        log_to=logf,
    )
    final = runs / "final"
    d.cli("export-run", f"--workdir={work}", f"--out={final}", log_to=logf)
    stages = {"t2l": stage_stats(work, budget, "examples")}
    summary = {
        "job": "t2l",
        "call1": json.loads((d.tmp / "call1.json").read_text()),
        "stages": stages,
        "call2_s": round(time.time() - t0, 1),
    }
    pack_out(d.out, final, summary, {"t2l": work})
    log(f"call 2 done in {summary['call2_s']} s; t2l: {json.dumps(stages['t2l'])}")


def stage_stats(workdir: Path, budget: float, unit: str = "contexts") -> dict:
    """Steps, contexts, speed and the floor of a finished stage, from its metrics.jsonl."""
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in lines if "loss" in r]
    floor = next((r["context_blind_floor"] for r in lines if "context_blind_floor" in r), None)
    left = next(
        (r["left_context_blind_floor_at"] for r in rows if "left_context_blind_floor_at" in r), None
    )
    timed = rows[1:] or rows
    secs = sum(r["step_time"] for r in timed)
    tail = rows[-20:]
    return {
        "budget_s": round(budget),
        "steps": len(rows),
        unit: int(sum(r["num_items"] for r in rows)),
        "first_step_s": round(rows[0]["step_time"], 1),
        f"{unit}_per_s": round(sum(r["num_items"] for r in timed) / secs, 1),
        "matmul_tflops_per_s": round(
            sum(r.get("flops_per_s", 0) for r in timed) / len(timed) / 1e12, 2
        ),
        "main_loss_first10": round(sum(r["main_loss"] for r in rows[:10]) / len(rows[:10]), 4),
        "main_loss_last20": round(sum(r["main_loss"] for r in tail) / len(tail), 4),
        "context_blind_floor": floor,
        "left_floor_at": left,
    }


def pack_out(out: Path, final: Path, summary: dict, workdirs: dict[str, Path]) -> None:
    """$OUT: the checkpoint (params split in two under 16 MiB, its config: d2l_config.json or
    t2l.json), metrics (every n-th line if a file would pass 15 MiB), summary."""
    params = (final / "params.safetensors").read_bytes()
    half = (len(params) + 1) // 2
    (out / "params.safetensors.part1").write_bytes(params[:half])
    (out / "params.safetensors.part2").write_bytes(params[half:])
    summary["params_sha256"] = hashlib.sha256(params).hexdigest()
    for f in final.glob("*.json"):
        shutil.copy2(f, out / f.name)
    for name, w in workdirs.items():
        lines = (w / "metrics.jsonl").read_text().splitlines(keepends=True)
        every = max(1, -(-sum(map(len, lines)) // (15 * MiB)))
        (out / f"{name}_metrics.jsonl").write_text("".join(lines[::every]))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    check_out(out)


def check_out(out: Path) -> None:
    """The device tool's limits on what comes back from $OUT."""
    import re

    files = [p for p in out.rglob("*") if p.is_file()]
    bad = [
        p
        for p in files
        if not re.fullmatch(r"[A-Za-z0-9._-]+", p.name)
        or len(p.relative_to(out).parts) > 3
        or p.stat().st_size > OUT_FILE_BYTES
    ]
    if len(files) > OUT_FILES or bad:
        fail(f"$OUT breaks the return limits: {len(files)} files, bad: {bad}")


# ----------------------------------------------------------------------------- steps of a call
def report(args) -> None:
    """Versions, devices and the measured bf16 matmul peak of this machine."""
    import importlib.metadata as md

    import jax

    from benchmarks.harness import matmul_peak

    names = (
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "transformers",
        "tokenizers",
        "grain",
        "ml-collections",
        "gguf",
        "safetensors",
        "chex",
    )
    info = {"python": sys.version.split()[0], "devices": [str(x) for x in jax.devices()]}
    for n in names:
        try:
            info[n] = md.version(n)
        except md.PackageNotFoundError:
            info[n] = None
    big = jax.default_backend() != "cpu"
    info["matmul_peak_bf16_tflops"] = round(
        matmul_peak("bfloat16", 8192 if big else 512, 10 if big else 2)["flops_per_s"] / 1e12, 2
    )
    print(json.dumps(info, indent=1))
    Path(args.json).write_text(json.dumps(info, indent=1))


def random_weights(args) -> None:
    """A model folder of the real config and tokenizer with random weights of the real shapes."""
    import numpy as np
    from safetensors.numpy import save_file

    out = Path(args.folder)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (CALL1 / "model" / name).exists():
            shutil.copy2(CALL1 / "model" / name, out / name)
    spec = json.loads((CALL1 / "weights_spec.json").read_text())
    rng = np.random.default_rng(0)
    save_file(
        {k: (0.02 * rng.standard_normal(s, np.float32)) for k, s in spec.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )


def convert(args) -> None:
    """GGUF -> model folder: weights dequantized here, config and tokenizer from .gpu/call1."""
    import numpy as np
    from safetensors.numpy import save_file

    from hyperlora_jax.models import gguf as gg

    out = Path(args.folder)
    out.mkdir(parents=True, exist_ok=True)
    sd = gg.gguf_state_dict(gg.read_gguf(args.gguf), dtype=np.float32)
    spec = json.loads((CALL1 / "weights_spec.json").read_text())
    got = {k: list(v.shape) for k, v in sd.items()}
    if got != spec:
        fail("the converted weights differ from the shapes recorded by prepare", BAD_MODEL_EXIT)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (CALL1 / "model" / name).exists():
            shutil.copy2(CALL1 / "model" / name, out / name)
    log(f"converted {args.gguf} -> {out}")


# ============================================================================= the dry run
def check_t2l_return(out: Path, folder: Path, call1_dir: Path) -> dict:
    """What the README has the user do with call 2's $OUT of the t2l job: rebuild the checkpoint
    folder, load it with its own encoder spec (all-MiniLM-L6-v2 here) against this machine's
    SmolLM2 (the base fingerprint must match the device's converted GGUF), write an adapter for a
    held-out family's description; and the carried embeddings equal this encoder's."""
    import tarfile
    import tempfile

    import numpy as np

    from hyperlora_jax.hypernet.t2l.api import TextToLoRA
    from hyperlora_jax.hypernet.t2l.task_encoder import PrecomputedEncoder
    from hyperlora_jax.models.fetch import fetch_model

    folder.mkdir(parents=True)
    with (folder / "params.safetensors").open("wb") as f:
        for part in ("params.safetensors.part1", "params.safetensors.part2"):
            f.write((out / part).read_bytes())
    shutil.copy2(out / "t2l.json", folder / "t2l.json")
    t2l = TextToLoRA.from_checkpoint(folder, base_model=fetch_model(MODEL))
    adapter = t2l.generate(["Wrap the whole sentence in round brackets, in lower case."])
    if not all(
        np.isfinite(np.asarray(x)).all() for x in [*adapter.a.values(), *adapter.b.values()]
    ):
        fail("dry run: the returned T2L writes non-finite adapters")
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(call1_dir / T2L_PACK) as tar:
        npz = Path(tmp) / "task_embeddings.npz"
        npz.write_bytes(tar.extractfile("task_embeddings.npz").read())
        carried = PrecomputedEncoder(npz)  # what training on the device reads
    descs = list(carried.table)[:8]
    want = t2l.embed(descs)
    # int8 rounding: at most half a step, 1/254 of each vector's largest element
    rel = float((np.abs(want - carried.encode(descs)).max(1) / np.abs(want).max(1)).max())
    if rel > 0.005:
        fail(f"dry run: the carried embeddings differ from the encoder's by {rel:.2%} of a vector")
    return {
        "modules": sorted(adapter.a),
        "a_shape": list(np.shape(next(iter(adapter.a.values())))),
        "embedding_max_rel_diff": rel,
        "encoder": t2l.meta["encoder"]["model"],
    }


def dry_run(args) -> dict:
    """Both calls here, on the CPU, with the device's layout: a copy of the traveling tree (plus
    the carried .gpu/callN), `$OUT` per call, /tmp state kept between the calls, wheels installed
    into a target folder, the real GGUF halves and tiny sizes; then the cold-machine exit. t2l:
    the checkpoint folder rebuilt from $OUT loads here (check_t2l_return)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="lease-dry-"))
    gpu = Path(args.gpu_dir or REPO / ".gpu")
    made = gpu / "call1" / "manifest.json"
    made = json.loads(made.read_text()) if made.exists() else {}
    stale = made.get("job", "d2l") != args.job or made.get("subset", 0) != args.tasks
    if not made or stale:  # none, or for another job or universe subset
        prepare(args)
    dev = root / "repo"
    for f in traveling_files():
        dst = dev / f.relative_to(REPO)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
    shutil.copytree(gpu / "call1", dev / ".gpu" / "call1")
    env = {**os.environ, "LEASE_TMP": str(root / "tmp"), "JAX_PLATFORMS": "cpu"}
    if args.deprecations_as_errors:  # in every process of the calls, for our own modules
        strict = root / "strict"
        strict.mkdir()
        (strict / "sitecustomize.py").write_text(
            "import warnings\nwarnings.filterwarnings('error', category=DeprecationWarning, "
            "module=r'(hyperlora_jax|benchmarks|lease)(\\.|$)')\n"
        )
        env["PYTHONPATH"] = str(strict)
    py = args.python or sys.executable
    version = subprocess.run(
        [py, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != "3.12":  # the same wheels, built for the interpreter that plays the device
        wheels = dev / ".gpu" / "call1" / "wheels"
        shutil.rmtree(wheels)
        _download_wheels(wheels, version)
    res = {}
    call_args = {
        "call1": [f"--set={kv}" for kv in args.set],
        "call2": [] if args.stage2_share is None else [f"--stage2-share={args.stage2_share}"],
    }
    job = ["--job", args.job]
    for call in ("call1", "call2"):
        if call == "call2":
            shutil.copytree(gpu / "call2", dev / ".gpu" / "call2")
        out = root / f"out_{call}"
        out.mkdir()
        t = time.time()
        r = subprocess.run(
            [py, "launch/device/lease.py", call, "--tiny", *job, *call_args[call]],
            cwd=dev,
            env={**env, "OUT": str(out)},
        )
        res[call] = {
            "rc": r.returncode,
            "s": round(time.time() - t, 1),
            "files": sorted(p.name for p in out.iterdir()),
        }
        log(f"dry run {call}: exit {r.returncode} in {res[call]['s']} s, $OUT {res[call]['files']}")
        if r.returncode:
            fail(f"dry run: {call} failed (exit {r.returncode}); its output is above")
        check_out(out)
    out = root / "out_call2"
    params = (out / "params.safetensors.part1").read_bytes() + (
        out / "params.safetensors.part2"
    ).read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    if hashlib.sha256(params).hexdigest() != summary["params_sha256"]:
        fail("dry run: the returned params do not reassemble")
    if args.job == "t2l":
        res["t2l_check"] = check_t2l_return(out, root / "t2l_checkpoint", gpu / "call1")
    # a cold machine: call 2 without call 1's /tmp answers 42 at once
    cold = root / "cold"
    cold.mkdir()
    t = time.time()
    r = subprocess.run(
        [py, "launch/device/lease.py", "call2", "--tiny", *job],
        cwd=dev,
        env={**env, "LEASE_TMP": str(cold), "OUT": str(root / "out_cold")},
        capture_output=True,
        text=True,
    )
    res["cold"] = {"rc": r.returncode, "s": round(time.time() - t, 1), "stderr": r.stderr[-300:]}
    if r.returncode != COLD_EXIT:
        fail(f"dry run: a cold call 2 exited {r.returncode}, not {COLD_EXIT}")
    res["summary"] = summary
    res["root"] = str(root)
    log(f"dry run passed: {json.dumps({k: v for k, v in res.items() if k != 'summary'})}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return res


def job_arg(parser) -> None:
    parser.add_argument(
        "--job",
        choices=JOBS,
        default="d2l",
        help="d2l: the embedded D2L (NIAH + facts); t2l: T2L-SFT on the task universe, in a "
        "session whose d2l lease is done (default d2l)",
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="build .gpu/ and check the two calls' sizes (here)")
    sub.add_parser("restore", help="track the shipped params again after the lease (here)")
    dr = sub.add_parser("dry-run", help="both calls end to end on this CPU, tiny sizes (here)")
    for x in (pr, dr):
        x.add_argument("--gpu-dir", help="where to build call1/ and call2/ (default .gpu)")
        x.add_argument(
            "--tasks",
            type=int,
            default=0,
            help="t2l: carry only the universe's first N training tasks (rehearsals; 0: all)",
        )
        x.add_argument(
            "--keep-tracked",
            action="store_true",
            help="leave the shipped params tracked (sizes computed without them)",
        )
    dr.add_argument("--python", help="interpreter that plays the device's python3")
    dr.add_argument("--json", help="write the result here")
    dr.add_argument("--keep", action="store_true", help="keep the scratch folder")
    dr.add_argument("--set", action="append", default=[], help="passed to call 1")
    dr.add_argument("--stage2-share", type=float, help="passed to call 2")
    dr.add_argument(
        "--deprecations-as-errors",
        action="store_true",
        help="DeprecationWarnings raised in our own modules fail the run",
    )
    for name in ("call1", "call2"):
        c = sub.add_parser(name, help=f"{name} on the device")
        c.add_argument("--tiny", action="store_true", help="dry-run sizes")
        job_arg(c)
        if name == "call1":
            c.add_argument(
                "--set",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="config override for the probe and both stages, e.g. "
                "hypernet.latent_size=64 (call 2 takes them from call 1)",
            )
        if name == "call2":
            c.add_argument(
                "--stage2-share",
                type=float,
                help=f"of the training time (default {PLAN['stage2_share']}; 0: NIAH only)",
            )
            c.add_argument(
                "--deadline-s",
                type=float,
                help="seconds for the whole call (default "
                f"{PLAN['call2_deadline_s']}; less when the lease has less left)",
            )
    r = sub.add_parser("report")
    r.add_argument("--json", required=True)
    w = sub.add_parser("random-weights")
    w.add_argument("folder")
    c = sub.add_parser("convert")
    c.add_argument("gguf")
    c.add_argument("folder")
    for x in (pr, dr):
        job_arg(x)
    args = ap.parse_args(argv)
    if args.cmd in ("prepare", "dry-run") and args.tasks and args.job != "t2l":
        fail("--tasks subsets the t2l job's universe: pass --job t2l, or drop --tasks")
    if args.cmd in ("call2", "dry-run") and args.job == "t2l" and args.stage2_share is not None:
        fail("--stage2-share splits the d2l job's two stages; the t2l job has one: drop it")
    if args.cmd in ("prepare", "dry-run"):
        sys.path.insert(0, str(REPO))
    {
        "prepare": prepare,
        "restore": lambda a: restore(),
        "dry-run": dry_run,
        "call1": call1,
        "call2": call2,
        "report": report,
        "random-weights": random_weights,
        "convert": convert,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
