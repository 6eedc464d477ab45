"""`hyperlora-jax convert official-d2l|official-t2l SRC OUT`: official checkpoints -> ours."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert an official D2L/T2L checkpoint")
    kinds = p.add_subparsers(dest="kind", required=True)
    d2l = kinds.add_parser("official-d2l", help="a released D2L pytorch_model.bin")
    d2l.add_argument("src", help="path to pytorch_model.bin")
    d2l.add_argument("out", help="output checkpoint folder")
    d2l.add_argument(
        "--base-model",
        default=None,
        help="HF model folder: checked against the hypernet's shapes, its fingerprint recorded",
    )
    d2l.set_defaults(func=_convert_d2l)
    t2l = kinds.add_parser("official-t2l", help="a released T2L folder (hypermod.pt, args.yaml)")
    t2l.add_argument("src", help="release folder: hypermod.pt, args.yaml, adapter_config.json")
    t2l.add_argument("out", help="output checkpoint folder")
    t2l.add_argument(
        "--base-model",
        default=None,
        help="HF model folder: checked against the hypernet's shapes, its fingerprint recorded",
    )
    t2l.set_defaults(func=_convert_t2l)


def _convert_d2l(args) -> int:
    from hyperlora_jax.convert.official_d2l import convert

    print(convert(args.src, args.out, base_model=args.base_model))
    return 0


def _convert_t2l(args) -> int:
    from hyperlora_jax.convert.official_t2l import convert

    print(convert(args.src, args.out, base_model=args.base_model))
    return 0
