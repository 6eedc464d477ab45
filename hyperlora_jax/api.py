"""The few objects a notebook user touches, importable from one place.

from hyperlora_jax.api import DocToLoRA, TextToLoRA, Adapter, save_adapter, export_peft
"""

from hyperlora_jax.hypernet.d2l.api import DocToLoRA
from hyperlora_jax.hypernet.t2l.api import TextToLoRA
from hyperlora_jax.lora.adapter import Adapter, concat
from hyperlora_jax.lora.peft import export_peft, import_peft
from hyperlora_jax.lora.storage import load_adapter, save_adapter
from hyperlora_jax.models.fetch import fetch_model

__all__ = [
    "Adapter",
    "DocToLoRA",
    "TextToLoRA",
    "concat",
    "export_peft",
    "fetch_model",
    "import_peft",
    "load_adapter",
    "save_adapter",
]
