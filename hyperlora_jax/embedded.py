"""The embedded default: the base model `make demo` fetches and the hypernetworks shipped for it."""

from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_D2L = Path(__file__).parent / "checkpoints" / "d2l-smollm2-135m-instruct"
EMBEDDED_T2L = Path(__file__).parent / "checkpoints" / "t2l-smollm2-135m-instruct"
# T2L-SFT on the task universe: better on held-out tasks, weaker on the classic suite's own tasks
UNIVERSE_T2L = Path(__file__).parent / "checkpoints" / "t2l-smollm2-135m-instruct-universe"
EXAMPLES = Path(__file__).parents[1] / "examples"  # the demo's document, questions and task
