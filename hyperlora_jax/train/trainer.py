"""Training loop: sharded jitted step, Orbax checkpoints (async) with the grain iterator state and a
JSON to rebuild everything and sha256 checksums per step (a damaged step is moved aside and the
run falls back to the previous one), automatic resume, save on SIGTERM (then exit 143), a
wall-clock budget, a divergence guard (skipped steps are never saved; too many in a row stop the
run), TensorBoard + JSONL metrics (whole lines; a torn last one is repaired on resume), tqdm
progress, periodic eval hook, and the step at which the loss first leaves the data's
context-blind floor (`hyperlora_jax/data/floor.py`).

The loop is model-agnostic: it takes a loss function (see update.py), the frozen base params, an
initializer for the trainable params and a checkpointable host-local batch iterator.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from flax.core import meta
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hyperlora_jax.errors import CheckpointError, HyperLoraError
from hyperlora_jax.paths import Path, as_path, files_under, is_remote
from hyperlora_jax.train import sharding as shd
from hyperlora_jax.train.flops import jaxpr_flops
from hyperlora_jax.train.update import TrainState, all_finite, make_train_step

log = logging.getLogger(__name__)


class Diverged(HyperLoraError):
    """Training stopped: too many consecutive steps skipped by the divergence guard."""


class Interrupted(HyperLoraError):
    """Training stopped by SIGTERM after saving a checkpoint (rerun the command to resume)."""

    exit_code = 128 + signal.SIGTERM  # what a shell reports for a SIGTERM-killed process


CHECKSUMS = "sha256.json"  # in each step folder, written once Orbax has committed the step


FLOOR_WINDOW = 10  # steps averaged when comparing the loss with the context-blind floor
FLOOR_MARGIN = 0.9  # "below the floor" = the window's mean main loss < 0.9 x floor


@dataclasses.dataclass
class TrainOptions:
    """Loop settings (built from an experiment config's `train` section by train/build.py)."""

    steps: int
    workdir: str
    seed: int = 0
    grad_accum_steps: int = 1
    log_every: int = 1
    save_every: int = 1000
    eval_every: int = 0
    max_to_keep: int = 3
    max_bad_steps: int = 10  # stop after this many skipped (diverging) steps in a row
    # Divergence guard (train/update.py): skip an update larger than this x the param norm.
    max_update_ratio: float = 1.0
    async_checkpointing: bool = True
    progress: bool = True
    inject_nan_at: int | None = None  # tests: poison the gradient of this step
    # Wall-clock seconds from clock_start (default: the start of run(); `hyperlora-jax train`
    # passes its own start, so model loading and data indexing count too), compilation
    # included: stop after the step that would leave less than two step times plus two saves,
    # and write a complete checkpoint.
    time_budget_s: float | None = None
    clock_start: float | None = None  # a time.perf_counter() value
    # Cosine-decay the learning rate over the wall-clock budget (from the end of the first step
    # to time_budget_s) down to min_lr_ratio x, instead of over a step count: for runs whose
    # speed is not known in advance (a lent GPU). The step program does not depend on the run
    # length, so a program compiled (and cached) earlier serves any budget.
    lr_time_decay: bool = False
    min_lr_ratio: float = 0.0
    context_blind_floor: float | None = None  # of the training data, in main-loss units


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
    )


def _step_files(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a step folder but the checksum file itself."""
    out = {}
    for f in files_under(folder):
        if f.name != CHECKSUMS:
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[str(f.relative_to(folder))] = h.hexdigest()
    return out


def write_checksums(folder: Path) -> None:
    """Record the committed step's files; written to a temporary name then renamed, so a crash
    leaves either no checksum file or a whole one."""
    tmp = folder / f"{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(_step_files(folder), indent=0))
    tmp.replace(folder / CHECKSUMS)


def step_damage(folder: Path) -> str | None:
    """Why a committed step folder cannot be trusted (None: its files match its checksums; a
    step without checksums, e.g. killed between Orbax's commit and their write, is left to the
    restore to judge)."""
    sums = folder / CHECKSUMS
    if not sums.exists():
        return None
    try:
        want = json.loads(sums.read_text())
    except ValueError:
        return f"{CHECKSUMS} is not valid JSON"
    have = _step_files(folder)
    bad = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    return f"{len(bad)} file(s) differ from {CHECKSUMS}, e.g. {bad[0]}" if bad else None


def quiet_closed_loop_callbacks() -> None:
    """Call before restoring a step that may be damaged. When a restore fails, the reads it
    still has in flight finish after Orbax closed its event loop, and each tensorstore callback
    prints a "RuntimeError: Event loop is closed" traceback through sys.unraisablehook (~100
    per damaged step). Nothing awaits those reads: drop exactly that error, pass on the rest."""
    prev = sys.unraisablehook
    if getattr(prev, "_drops_closed_loop", False):
        return

    def hook(u):
        if not (
            isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
        ):
            prev(u)

    hook._drops_closed_loop = True
    sys.unraisablehook = hook


def restore_newest_good(root: Path, steps, restore, on_damaged):
    """(step, restore(step)) of the first of `steps` whose files match their checksums and that
    restores; each damaged one goes to on_damaged(step, why) first. (None, None) if none does."""
    quiet_closed_loop_callbacks()
    for step in steps:
        why = step_damage(root / str(step))
        if why is None:
            try:
                return step, restore(step)
            except Exception as e:  # noqa: BLE001 - any damage: fall back
                why = f"unreadable: {' '.join(str(e).split())[:200]}"
        on_damaged(step, why)
    return None, None


def move_aside(folder: Path) -> Path:
    """Rename a damaged step folder to <step>.corrupt[-N]: kept for inspection, out of the
    step listing (so the step can be saved again)."""
    dest = folder.with_name(f"{folder.name}.corrupt")
    n = 1
    while dest.exists():
        n += 1
        dest = folder.with_name(f"{folder.name}.corrupt-{n}")
    folder.rename(dest)
    return dest


def _complete_steps(root: Path) -> list[int]:
    """Committed checkpoint steps, newest first (tmp / half-written dirs are skipped). On an
    object store Orbax writes a step in place and marks it committed with commit_success.txt."""
    out = []
    if not root.exists():
        return out
    marker = "commit_success.txt" if is_remote(root) else "_CHECKPOINT_METADATA"
    for p in root.iterdir():
        if p.is_dir() and p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists():
            if not (p / marker).exists():
                continue
            items = [q for q in p.iterdir() if q.is_dir()]
            if items and all(any(q.iterdir()) for q in items):
                out.append(int(p.name))
    return sorted(out, reverse=True)


class Trainer:
    """Owns the mesh, the train state, the jitted step and the checkpoint manager."""

    def __init__(
        self,
        *,
        loss_fn,
        count_fn,
        init_params: Callable[[jax.Array], Any],
        base_params: Any,
        tx: optax.GradientTransformation,
        schedule: optax.Schedule | None,
        data: Iterator[dict],
        options: TrainOptions,
        mesh: Mesh | None = None,
        rules=shd.DEFAULT_RULES,
        base_shardings=None,
        rebuild_info: dict | None = None,
        eval_fn: Callable[[TrainState], dict] | None = None,
        tokens_fn: Callable[[dict], int] | None = None,
        hooks: list[Callable[[Trainer, int, dict], None]] | None = None,
        fsdp_min_size: int = 2**18,
    ):
        self.o = options
        self.mesh = mesh or shd.make_mesh(data=len(jax.devices()))
        self.rules = rules
        self.data = data
        self.eval_fn = eval_fn
        self.tokens_fn = tokens_fn or _count_tokens
        self.hooks = hooks or []
        self.rebuild_info = rebuild_info or {}
        self.workdir = as_path(options.workdir)
        self.ckpt_dir = self.workdir / "checkpoints"
        self._stop = False
        self._flops = None
        self.stopped_by: str | None = None  # "steps", "time_budget", "sigterm" or "data"
        self.left_floor_at: int | None = None  # first step of the window below the floor

        # params: born sharded (jit of the initializer with out_shardings)
        abstract_params = jax.eval_shape(init_params, jax.random.key(options.seed))
        self.param_shardings = shd.tree_shardings(
            abstract_params, self.mesh, rules, fsdp_fallback_min=fsdp_min_size
        )
        params = jax.jit(lambda r: meta.unbox(init_params(r)), out_shardings=self.param_shardings)(
            jax.random.key(options.seed)
        )
        state = jax.jit(lambda p: TrainState.create(p, tx, options.seed))(params)
        self.state_shardings = self._state_shardings(state)
        self.state = jax.device_put(state, self.state_shardings)

        if base_shardings is None:
            base_shardings = shd.tree_shardings(base_params, self.mesh, rules)
        self.base_shardings = base_shardings
        self.base_params = shd.shard_tree(base_params, base_shardings) if base_params else {}

        step = make_train_step(
            loss_fn,
            tx,
            count_fn,
            grad_accum_steps=options.grad_accum_steps,
            schedule=schedule,
            inject_nan_at=options.inject_nan_at,
            max_update_ratio=options.max_update_ratio,
            micro_batch_axes=tuple(a for a in ("data", "fsdp") if self.mesh.shape[a] > 1) or None,
        )
        self._step_fn = step
        self._jitted = None  # built at the first batch (needs its shardings)
        self.manager = self._make_manager()

    # ------------------------------------------------------------------ sharding helpers
    def _state_shardings(self, state: TrainState):
        return state_shardings(state, self.param_shardings, self.mesh)

    def batch_shardings(self, batch: dict):
        return {k: shd.batch_sharding(self.mesh, np.ndim(v), self.rules) for k, v in batch.items()}

    def _compile(self, gbatch: dict):
        self._jitted = jax.jit(
            self._step_fn,
            in_shardings=(
                self.state_shardings,
                self.base_shardings,
                self.batch_shardings(gbatch),
                shd.replicated(self.mesh),
            ),
            out_shardings=(self.state_shardings, shd.replicated(self.mesh)),
            donate_argnums=(0,),
        )
        with jax.set_mesh(self.mesh):
            traced = self._jitted.trace(self.state, self.base_params, gbatch, jnp.float32(1))
            self._compiled = traced.lower().compile()
        # global matmul FLOPs per step (XLA's cost analysis counts scanned layers once)
        self._flops = jaxpr_flops(traced.jaxpr.jaxpr)

    # ------------------------------------------------------------------ checkpoints
    def _make_manager(self):
        import orbax.checkpoint as ocp

        opts = ocp.CheckpointManagerOptions(
            max_to_keep=self.o.max_to_keep,
            enable_async_checkpointing=self.o.async_checkpointing,
            create=True,
        )
        return ocp.CheckpointManager(self.ckpt_dir, options=opts)

    def _data_args(self, save: bool):
        import grain

        if not hasattr(self.data, "get_state"):
            return {}
        if save:
            return {"data": grain.checkpoint.CheckpointSave(self.data)}
        return {"data": grain.checkpoint.CheckpointRestore(self.data)}

    def save(self, force: bool = False) -> bool:
        """Save the state at its current step; never while the divergence guard is skipping
        steps (nor with non-finite params), so every saved step is a good one and Orbax's
        max_to_keep rotation can only drop older good steps."""
        import orbax.checkpoint as ocp

        step = int(jax.device_get(self.state.step))
        bad = int(jax.device_get(self.state.bad_in_a_row))
        if bad:
            log.warning(
                "not saving step %d: the last %d step(s) were skipped (diverging)", step, bad
            )
            return False
        if not bool(jax.device_get(all_finite(self.state.params))):
            log.error("not saving step %d: non-finite parameters", step)
            return False
        if step in self.manager.all_steps():
            return False
        meta = {**self.rebuild_info, "step": step}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(serialization.to_state_dict(self.state)),
            meta=ocp.args.JsonSave(meta),
            **self._data_args(True),
        )
        self.manager.save(step, args=args, force=True)
        return True

    def restore_latest(self) -> int | None:
        """Restore the newest good checkpoint (params, optimizer, step, RNG, data position). A
        step whose files do not match their checksums, or that fails to restore, is moved aside
        (<step>.corrupt) with a warning and the previous one is tried; the loop then saves that
        step again when it gets there."""
        import orbax.checkpoint as ocp

        def restore(step):
            target = _abstract(
                serialization.to_state_dict(self.state),
                serialization.to_state_dict(self.state_shardings),
            )
            return self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    meta=ocp.args.JsonRestore(),
                    **self._data_args(False),
                ),
            )

        def damaged(step, why):
            if jax.process_index() == 0:
                dest = move_aside(self.ckpt_dir / str(step))
                log.warning("checkpoint step %d is corrupt (%s); moved to %s", step, why, dest)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("hyperlora_move_aside")

        found, restored = restore_newest_good(
            self.ckpt_dir, _complete_steps(self.ckpt_dir), restore, damaged
        )
        if found is not None:
            self.state = serialization.from_state_dict(self.state, restored["state"])
        self.manager.reload()  # forget the steps moved aside
        return found

    # ------------------------------------------------------------------ loop
    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint after the current step, then exiting")
        self._stop = True

    def _stop_requested(self) -> bool:
        if jax.process_count() == 1:
            return self._stop

        flags = multihost_utils.process_allgather(np.array([self._stop]))
        return bool(np.any(flags))

    def run(self) -> list[dict]:
        """Train until options.steps (resuming if a checkpoint exists), the time budget or SIGTERM
        (saves, then raises Interrupted); returns the metric rows. `stopped_by` says which."""
        o = self.o
        t_start = o.clock_start if o.clock_start is not None else time.perf_counter()
        resumed = self.restore_latest()
        start = int(jax.device_get(self.state.step))
        if resumed is not None:
            log.info("resumed from step %d", resumed)
        self.workdir.mkdir(parents=True, exist_ok=True)
        main = jax.process_index() == 0
        writer = jsonl = None
        if main:
            repair_jsonl(self.workdir / "metrics.jsonl")
            jsonl = open_jsonl(self.workdir / "metrics.jsonl")
            try:
                writer = tensorboard_writer(self.workdir / "tb")
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                writer = None
            (self.workdir / "rebuild.json").write_text(json.dumps(self.rebuild_info, indent=1))
        old = signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = None
        if o.progress and main:
            from tqdm import tqdm

            bar = tqdm(total=o.steps, initial=start, desc="train", dynamic_ncols=True)
        rows = []
        recent_main = collections.deque(maxlen=FLOOR_WINDOW)
        step_times = collections.deque(maxlen=5)
        save_s = 2.0  # a save's wall time (measured at each save; a guess until then)
        t_first = None  # end of the first step (compilation included)
        # Time kept at the end of a budget: two of the slowest recent steps (not the compiling
        # first one) and two saves. It never shrinks, so the wall-clock lr decay is monotone.
        margin = 0.0

        def grown_margin() -> float:
            return max(margin, 2 * max(step_times, default=0.0) + 2 * save_s)

        if main and o.context_blind_floor is not None:
            log.info("context-blind floor of the data: %.4f (main loss)", o.context_blind_floor)
            _write_line(jsonl, {"step": start, "context_blind_floor": o.context_blind_floor})
        try:
            step = start
            while step < o.steps:
                t0 = time.perf_counter()
                try:
                    local = next(self.data)
                except StopIteration:
                    log.warning("data exhausted at step %d", step)
                    self.stopped_by = "data"
                    break
                gbatch = shd.make_global_batch(local, self.mesh, self.rules)
                if self._jitted is None:
                    self._compile(gbatch)
                margin = grown_margin()
                scale = jnp.float32(self._lr_scale(t_start, t_first, margin))
                with jax.set_mesh(self.mesh):
                    self.state, metrics = self._jitted(self.state, self.base_params, gbatch, scale)
                metrics = jax.device_get(metrics)
                dt = time.perf_counter() - t0
                step += 1
                row = {k: float(v) for k, v in metrics.items()}
                row.update(step=step, step_time=dt, tokens_per_s=self.tokens_fn(local) / dt)
                row["tokens_per_s"] *= jax.process_count()
                if self._flops:
                    row["flops_per_s"] = self._flops / dt
                bad_row = int(jax.device_get(self.state.bad_in_a_row))
                row["skipped_total"] = int(jax.device_get(self.state.bad_total))
                if step > start + 1:  # the first step's time is mostly compilation
                    step_times.append(dt)
                else:
                    t_first = time.perf_counter()
                self._track_floor(step, row, recent_main)
                rows.append(row)
                if main and (step % o.log_every == 0 or not row["finite"]):
                    _write_line(jsonl, row)
                    if writer is not None:
                        for k, v in row.items():
                            if k != "step":
                                writer.add_scalar(f"train/{k}", v, step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row.get('lr', 0):.2e}")
                if bad_row >= o.max_bad_steps:
                    self.manager.wait_until_finished()
                    good = _complete_steps(self.ckpt_dir)
                    last = f"step {good[0]} in {self.ckpt_dir}" if good else "none saved yet"
                    raise Diverged(
                        f"training diverged: {bad_row} steps in a row skipped at step {step} "
                        f"({_why_skipped(row, o.max_update_ratio)}); nothing saved since; last "
                        f"good checkpoint: {last}. Lower train.learning_rate or check the data."
                    )
                if self.eval_fn is not None and o.eval_every and step % o.eval_every == 0:
                    ev = {f"eval/{k}": float(v) for k, v in self.eval_fn(self.state).items()}
                    if main:
                        _write_line(jsonl, {"step": step, **ev})
                        if writer is not None:
                            for k, v in ev.items():
                                writer.add_scalar(k, v, step)
                if step % o.save_every == 0 or step == o.steps:
                    save_s = max(save_s, self._timed_save())
                for h in self.hooks:
                    h(self, step, row)
                if self._stop_requested():
                    self._timed_save()
                    self.stopped_by = "sigterm"
                    break
                if o.time_budget_s is not None and step < o.steps:
                    left = o.time_budget_s - (time.perf_counter() - t_start)
                    margin = grown_margin()
                    if left < margin:
                        self._timed_save()
                        self.stopped_by = "time_budget"
                        log.warning("time budget: stopped after step %d (%.0f s left)", step, left)
                        break
            else:
                self.stopped_by = "steps"
        finally:
            signal.signal(signal.SIGTERM, old)
            self.manager.wait_until_finished()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            if jsonl is not None:
                jsonl.close()
        if self.stopped_by == "sigterm":
            raise Interrupted(
                f"interrupted by SIGTERM at step {step} (checkpoint saved in {self.ckpt_dir}); "
                "run the same command again to resume"
            )
        return rows

    def _lr_scale(self, t_start: float, t_first: float | None, stop_margin: float) -> float:
        """The wall-clock cosine factor of the learning rate (1.0 without lr_time_decay): from 1
        at the end of the first step to min_lr_ratio when the budget stop is due."""
        o = self.o
        if not o.lr_time_decay or o.time_budget_s is None or t_first is None:
            return 1.0
        span = max(t_start + o.time_budget_s - stop_margin - t_first, 1e-6)
        progress = min(max((time.perf_counter() - t_first) / span, 0.0), 1.0)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _timed_save(self) -> float:
        """save(), waiting until it is on disk, then its checksums; returns the seconds."""
        t0 = time.perf_counter()
        saved = self.save()
        self.manager.wait_until_finished()
        if saved and jax.process_index() == 0:
            write_checksums(self.ckpt_dir / str(int(jax.device_get(self.state.step))))
        return time.perf_counter() - t0

    def _track_floor(self, step: int, row: dict, recent: collections.deque) -> None:
        """Record the first step whose FLOOR_WINDOW-step mean main loss is under the floor."""
        floor = self.o.context_blind_floor
        if floor is None or self.left_floor_at is not None or not row["finite"]:
            return
        recent.append(row.get("main_loss", row["loss"]))
        mean = sum(recent) / len(recent)
        if len(recent) == FLOOR_WINDOW and mean < FLOOR_MARGIN * floor:
            self.left_floor_at = step - FLOOR_WINDOW + 1
            row["left_context_blind_floor_at"] = self.left_floor_at
            log.warning(
                "loss left the context-blind floor %.3f: mean %.3f over steps %d-%d",
                floor,
                mean,
                self.left_floor_at,
                step,
            )

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def state_shardings(state: TrainState, param_shardings, mesh: Mesh) -> TrainState:
    """TrainState shardings: params as given, optimizer moments like their params (matched by
    shape), counters and RNG replicated."""
    rep = shd.replicated(mesh)
    by_shape = {}
    for x, s in zip(
        jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(param_shardings)
    ):
        by_shape.setdefault(tuple(np.shape(x)), s)

    def opt_sh(x):
        return by_shape.get(tuple(np.shape(x)), rep) if np.ndim(x) else rep

    return TrainState(
        step=rep,
        params=param_shardings,
        opt_state=jax.tree_util.tree_map(opt_sh, state.opt_state),
        rng=rep,
        bad_in_a_row=rep,
        bad_total=rep,
    )


def _count_tokens(batch: dict) -> int:
    """Non-padding tokens of a host batch: every *segment_ids array counts its nonzero entries."""
    n = 0
    for k, v in batch.items():
        if k.endswith("segment_ids"):
            n += int(np.count_nonzero(v))
    if n == 0 and "tokens" in batch:
        n = int(np.size(batch["tokens"]))
    return n


def _why_skipped(row: dict, max_update_ratio: float) -> str:
    """Which rule of the divergence guard (train/update.py) skipped the step of a metrics row."""
    if not math.isfinite(row["loss"]):
        return f"loss {row['loss']}"
    if not math.isfinite(row["grad_norm"]):
        return f"gradient norm {row['grad_norm']}"
    if not math.isfinite(row["update_ratio"]) or row["update_ratio"] > max_update_ratio:
        return (
            f"update {row['update_ratio']:.3g} x the param norm > "
            f"train.max_update_ratio={max_update_ratio:g}"
        )
    return "non-finite update"


class _RewrittenJsonl:
    """Append-only JSONL on an object store (no append there): the whole file is rewritten at
    each flush, so it is always whole lines."""

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes() if path.exists() else b""

    def write(self, text: str) -> None:
        self.data += text.encode()

    def flush(self) -> None:
        self.path.write_bytes(self.data)

    def close(self) -> None:
        self.flush()


def open_jsonl(path: Path):
    """A JSONL file opened for appending: a local file, or a rewritten object (remote)."""
    return _RewrittenJsonl(path) if is_remote(path) else open(path, "a")


class _EpathEvents:
    """tensorboardX writer factory for a URL scheme: event files written through epath."""

    def open(self, path: str):
        return Path(path).open("wb")

    def directory_check(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)


def tensorboard_writer(logdir: Path):
    """A tensorboardX SummaryWriter for a local folder or an object-store URL (epath)."""
    from tensorboardX import SummaryWriter, record_writer

    if is_remote(logdir):
        record_writer.register_writer_factory(str(logdir).split("://")[0], _EpathEvents())
    return SummaryWriter(str(logdir))


def _write_line(f, record: dict) -> None:
    """One JSONL record in one write, flushed: a crash leaves whole lines or a torn last one."""
    f.write(json.dumps(record) + "\n")
    f.flush()


def repair_jsonl(path: Path) -> None:
    """Truncate a torn last line (no newline, or not JSON: a crash mid-write) with a warning, so
    the appended file still parses line by line."""
    if not path.exists():
        return
    data = path.read_bytes()
    cut = data.rfind(b"\n", 0, len(data) - 1) + 1  # start of the last line
    last = data[cut:]
    try:
        whole = last.endswith(b"\n") and isinstance(json.loads(last), dict)
    except ValueError:
        whole = False
    if last and not whole:
        if is_remote(path):  # no truncate on an object store: rewrite it
            path.write_bytes(data[:cut])
        else:
            with open(path, "r+b") as f:
                f.truncate(cut)
        log.warning("%s: dropped a torn last line (%d bytes)", path, len(last))


def load_rebuild_info(workdir: str | Path) -> dict:
    """The JSON written next to the checkpoints (config, base model, hypernet/LoRA settings)."""
    p = as_path(workdir) / "rebuild.json"
    if not p.exists():
        raise CheckpointError(f"no rebuild.json in {workdir}; is this a training workdir?")
    return json.loads(p.read_text())


def finite(x) -> bool:
    return bool(jnp.all(jnp.isfinite(x)))
