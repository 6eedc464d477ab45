"""`hyperlora-jax export-run`: a training run's checkpoint -> the shippable hypernetwork folder."""

from __future__ import annotations

import logging

import jax
import numpy as np

from hyperlora_jax.data.feeds import RECON_STATS
from hyperlora_jax.errors import CheckpointError
from hyperlora_jax.hypernet.t2l.model import T2LConfig
from hyperlora_jax.lora.storage import load_safetensors
from hyperlora_jax.paths import Path, as_path
from hyperlora_jax.train.trainer import (
    _complete_steps,
    load_rebuild_info,
    restore_newest_good,
)

log = logging.getLogger(__name__)


def _newest_good_params(root: Path, step: int | None):
    """(step, numpy params) of `step`, else of the newest complete step whose files match their
    checksums and restore; damaged steps are skipped with a warning (left in place: the next
    `train` moves them aside). (None, what was asked) when there is none."""
    import orbax.checkpoint as ocp

    steps = _complete_steps(root)
    if step is not None and step not in steps:
        return None, step

    def restore(s):
        with ocp.CheckpointManager(root) as mgr:
            args = ocp.args.Composite(state=ocp.args.StandardRestore())
            return jax.tree_util.tree_map(np.asarray, mgr.restore(s, args=args)["state"]["params"])

    def damaged(s, why):
        log.warning("checkpoint step %d is corrupt (%s); skipping it", s, why)

    found, params = restore_newest_good(
        root, [step] if step is not None else steps, restore, damaged
    )
    return (found, params) if found is not None else (None, step)


def export_run(workdir: str, out: str, *, step: int | None = None, overwrite: bool = False):
    """A training run's hypernetwork (newest complete checkpoint, or `step`) -> the shippable
    checkpoint folder that DocToLoRA / TextToLoRA load (params only, f32 safetensors + config)."""

    info = load_rebuild_info(workdir)
    root = as_path(workdir) / "checkpoints"
    step, params = _newest_good_params(root, step)
    if step is None:
        raise CheckpointError(f"no good checkpoint {params or ''} in {root}")
    training = {"workdir": str(workdir), "step": step, "config": info.get("config")}
    # the base the run trained against; a run on the random tiny base has no fingerprint
    base = {k: info[k] for k in ("base_model", "base_fingerprint") if info.get(k)}
    if info["kind"] == "d2l":
        from hyperlora_jax.hypernet.d2l.checkpoint import save_checkpoint
        from hyperlora_jax.hypernet.d2l.model import D2LConfig

        cfg = D2LConfig.from_json(info["hypernet_config"])
        meta = {**base, "training": training}
        if info.get("ctx_model"):  # cross-model: the context encoder it trained with
            meta["ctx_encoder_model"] = info["ctx_model"]
        return save_checkpoint(out, cfg, params, meta, overwrite=overwrite)
    from hyperlora_jax.hypernet.t2l.checkpoint import save_checkpoint

    cfg = T2LConfig.from_json(info["hypernet_config"])
    if (info.get("config") or {}).get("train", {}).get("objective") == "lora":
        from hyperlora_jax.lora.adapter import Adapter
        from hyperlora_jax.lora.storage import save_adapter

        lib = Adapter(params["a"], params["b"], cfg.scale())
        meta = {
            **base,
            "tasks": info.get("tasks") or [],
            "training": training,
        }
        return save_adapter(lib, out, meta, overwrite=overwrite)
    encoder = dict((info.get("config") or {}).get("encoder") or {})
    meta = {**base, "encoder": encoder, "training": training}
    stats = as_path(workdir) / RECON_STATS
    constants = load_safetensors(stats) if cfg.pred_z_score and stats.is_file() else None
    if cfg.pred_z_score and constants is None:
        raise CheckpointError(f"{stats} is missing: a pred_z_score run cannot be un-normalised")
    return save_checkpoint(out, cfg, params, meta, constants=constants, overwrite=overwrite)
