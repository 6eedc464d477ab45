"""The mesh and logical-axis helpers, moved to hyperlora_jax.models.sharding (inference uses them
too, and models sit below train); this name stays for the training code and older imports."""

from hyperlora_jax.models.sharding import *  # noqa: F403
from hyperlora_jax.models.sharding import _rules_dict  # noqa: F401
