"""`hyperlora-jax internalize`: a document -> a D2L adapter folder (our adapter format)."""

from __future__ import annotations

from hyperlora_jax.cli.common import (
    MODEL_HELP,
    add_allow_other_base,
    add_mesh,
    mesh_from_args,
    positive_int,
)
from hyperlora_jax.errors import InputError
from hyperlora_jax.paths import as_path


def register(subparsers) -> None:
    """Add `internalize` to the `hyperlora-jax` parser."""
    p = subparsers.add_parser(
        "internalize",
        help="turn a document into a LoRA adapter with a Doc-to-LoRA hypernetwork",
        description="Run a Doc-to-LoRA hypernetwork over documents and save the adapter folder "
        "(our format: `chat --adapter`, `export-peft`). The frozen base model reads each chunk "
        "of the document, the hypernetwork writes one LoRA per chunk, and the chunks compose by "
        "rank concatenation. Without --hypernet / --base-model: the shipped SmolLM2 default.",
    )
    p.add_argument(
        "--hypernet",
        default=None,
        help="our D2L checkpoint folder or an official pytorch_model.bin (default: the shipped "
        "SmolLM2-135M-Instruct hypernetwork)",
    )
    p.add_argument(
        "--base-model",
        default=None,
        help=MODEL_HELP + " (default: the one the checkpoint names)",
    )
    p.add_argument(
        "--doc",
        action="append",
        default=[],
        help="UTF-8 text file; repeat for several documents (a batched adapter)",
    )
    p.add_argument(
        "--image",
        action="append",
        default=[],
        help="image file (PNG, JPEG, ...); repeat for several: the images (then the text of one "
        "--doc, if given) are ONE document. Needs a Gemma-3 vision-language context encoder "
        "(--ctx-model); the base model stays text-only",
    )
    p.add_argument(
        "--ctx-model",
        default=None,
        help="the context encoder, when it differs from the base model (e.g. a gemma-3-4b-it "
        "folder for images; default: the one the checkpoint names, else the base model)",
    )
    p.add_argument("--out", required=True, help="output adapter folder")
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=None,
        help="max tokens per chunk (official split rule; > 0); default: the chunk length the "
        "hypernetwork was trained with, where its checkpoint records it (the shipped default: "
        "256), else no chunking (the document must then fit the context model's window)",
    )
    p.add_argument(
        "--iterative",
        action="store_true",
        help="make each layer's LoRA as the context encoder produces that layer's activations "
        "(the least memory, same result)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_mesh(p)
    add_allow_other_base(p, "checkpoint")
    p.set_defaults(func=_internalize)


def _internalize(args) -> int:
    from hyperlora_jax.api import load_d2l
    from hyperlora_jax.lora.storage import save_adapter

    if not args.doc and not args.image:
        raise InputError("nothing to internalize: give --doc FILE and/or --image FILE")
    if args.image and len(args.doc) > 1:
        raise InputError("with --image, give at most one --doc (the text after the images)")
    if args.image and args.chunk_size is not None:
        raise InputError("images and their text are one chunk: drop --chunk-size with --image")
    texts = []
    for f in args.doc:
        p = as_path(f)  # gs:// too
        if not p.is_file():
            raise InputError(f"no document file at {p}")
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"{p} is not UTF-8 text ({e})") from e
        if not texts[-1].strip():
            raise InputError(f"document {p} is empty; give it some text")
    if args.image:  # a bad file: one clear line before any model loads
        from hyperlora_jax.models.vision import load_image

        for f in args.image:
            load_image(f)
    mesh = mesh_from_args(args)
    from hyperlora_jax.embedded import EMBEDDED_D2L

    args.hypernet = args.hypernet or str(EMBEDDED_D2L)
    d2l = load_d2l(
        args.hypernet,
        base_model=args.base_model,
        allow_other_base=args.allow_other_base,
        mesh=mesh,
        **({"ctx_model": args.ctx_model} if args.ctx_model else {}),
    )
    if args.image:
        adapter = d2l.internalize(texts[0] if texts else None, images=args.image)
    elif args.chunk_size is None:
        from hyperlora_jax.hypernet.d2l.checkpoint import trained_chunk_size

        args.chunk_size = trained_chunk_size(d2l.meta)
        if args.chunk_size is not None:
            from hyperlora_jax.models.fetch import progress

            progress(
                f"internalize: chunks of at most {args.chunk_size} tokens, the length this "
                "hypernetwork was trained on (--chunk-size N to change)"
            )
    if not args.image:
        adapter = d2l.internalize(
            texts[0] if len(texts) == 1 else texts, args.chunk_size, iterative=args.iterative
        )
    meta = {
        "base_model": args.base_model or d2l.meta.get("base_model"),
        "base_fingerprint": d2l.base_fingerprint,
        "source": {
            "kind": "doc-to-lora",
            "hypernet": str(args.hypernet),
            "docs": [str(d) for d in args.doc],
            **({"images": [str(i) for i in args.image]} if args.image else {}),
            "chunk_size": args.chunk_size,
        },
    }
    save_adapter(adapter, args.out, meta, overwrite=args.overwrite)
    print(
        f"wrote {args.out}: rank {adapter.rank}, scale {adapter.scale:.4f}, "
        f"modules {list(adapter.modules)}"
    )
    return 0
