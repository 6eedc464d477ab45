"""One exception type per failure family; the CLI prints them without a traceback."""


class HyperLoraError(Exception):
    """Base class for every error this library raises on purpose."""


class ConfigError(HyperLoraError, ValueError):
    """A malformed or unsupported configuration (model config, hypernetwork config, CLI flags)."""


class CheckpointError(HyperLoraError, ValueError):
    """A missing, corrupt, truncated, unsafe or mismatched weights/checkpoint file."""


class InputError(HyperLoraError, ValueError):
    """Bad user input: empty documents or descriptions, wrong shapes, mismatched adapters."""
