"""The embedded default: the base model `make demo` fetches and the hypernetworks shipped for it."""

from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_D2L = Path(__file__).parent / "checkpoints" / "d2l-smollm2-135m-instruct"
EMBEDDED_T2L = Path(__file__).parent / "checkpoints" / "t2l-smollm2-135m-instruct"
EXAMPLES = Path(__file__).parents[1] / "examples"  # the demo's document, questions and task
