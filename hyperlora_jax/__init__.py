"""hyperlora_jax: hypernetworks that write LoRA adapters (Doc-to-LoRA, Text-to-LoRA) in JAX/Flax."""

__version__ = "0.1.0"
