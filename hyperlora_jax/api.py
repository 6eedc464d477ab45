"""The few objects a notebook user touches, importable from one place.

from hyperlora_jax.api import DocToLoRA, TextToLoRA, Adapter, save_adapter, export_peft
"""

from pathlib import Path

from hyperlora_jax.convert.official_d2l import read_official
from hyperlora_jax.hypernet.d2l.api import DocToLoRA
from hyperlora_jax.hypernet.t2l.api import TextToLoRA
from hyperlora_jax.lora.adapter import Adapter, concat
from hyperlora_jax.lora.peft import export_peft, import_peft
from hyperlora_jax.lora.storage import load_adapter, save_adapter
from hyperlora_jax.models.fetch import fetch_model
from hyperlora_jax.paths import as_path

__all__ = [
    "Adapter",
    "DocToLoRA",
    "TextToLoRA",
    "concat",
    "export_peft",
    "fetch_model",
    "import_peft",
    "load_adapter",
    "load_d2l",
    "save_adapter",
]


def load_d2l(path: str | Path, base_model=None, **kw) -> DocToLoRA:
    """Our D2L checkpoint folder or an official pytorch_model.bin (read in memory, not converted).

    base_model and **kw: as DocToLoRA.from_params; models an official file names are also looked
    up beside it.
    """
    path = as_path(path)  # gs:// too (our folders; an official file is read locally)
    if not path.is_file():
        return DocToLoRA.from_checkpoint(path, base_model, **kw)
    config, params, meta = read_official(path)
    return DocToLoRA.from_params(
        config, params, meta, base_model, search=[path.parent], where=str(path), **kw
    )
