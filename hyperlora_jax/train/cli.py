"""CLI subcommands of this area (see hyperlora_jax/cli.py)."""


def register(subparsers) -> None:
    """Add this area's subcommands to the `hyperlora-jax` parser."""
