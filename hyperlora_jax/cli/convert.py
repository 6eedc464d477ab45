"""`hyperlora-jax convert official-d2l|official-t2l SRC OUT`: official checkpoints -> ours."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert an official D2L/T2L checkpoint")
    kinds = p.add_subparsers(dest="kind", required=True)
    for kind, what, src, func in (
        (
            "official-d2l",
            "a released D2L pytorch_model.bin",
            "path to pytorch_model.bin",
            _convert_d2l,
        ),
        (
            "official-t2l",
            "a released T2L folder (hypermod.pt, args.yaml)",
            "release folder: hypermod.pt, args.yaml, adapter_config.json",
            _convert_t2l,
        ),
    ):
        k = kinds.add_parser(kind, help=what)
        k.add_argument("src", help=src)
        k.add_argument("out", help="output checkpoint folder")
        k.add_argument(
            "--base-model",
            default=None,
            help="HF model folder: checked against the hypernet's shapes, its fingerprint recorded",
        )
        k.set_defaults(func=func)


def _convert_d2l(args) -> int:
    from hyperlora_jax.convert.official_d2l import convert

    print(convert(args.src, args.out, base_model=args.base_model))
    return 0


def _convert_t2l(args) -> int:
    from hyperlora_jax.convert.official_t2l import convert

    print(convert(args.src, args.out, base_model=args.base_model))
    return 0
