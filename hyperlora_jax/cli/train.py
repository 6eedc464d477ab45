"""`hyperlora-jax train` and `hyperlora-jax plan`.

Both take an ml_collections config file with a preset and dotted overrides, parsed with absl
flags inside the subcommand:

    hyperlora-jax train --config configs/d2l.py:tiny --config.train.steps=50 --workdir runs/tiny
    hyperlora-jax plan --config configs/d2l.py:gemma2_2b_qa --mesh data=1,fsdp=8,tensor=1
"""

from __future__ import annotations

import sys
from pathlib import Path

from hyperlora_jax.errors import ConfigError
from hyperlora_jax.train.config_file import define_config_flag, load_config, one_line

TRAIN_HELP = """usage: hyperlora-jax train --config FILE.py:PRESET [--config.a.b=VALUE ...]
                           [--workdir DIR] [--data PATH ...] [--base_model DIR]
                           [--ctx_model DIR] [--mesh data=N,fsdp=N,tensor=N]
                           [--coordinator HOST:PORT --num_processes N --process_id I]

Meta-trains the hypernetwork of the config; resumes from the newest checkpoint in --workdir.
A progress bar shows the steps; the first step compiles (seconds for `tiny`, minutes for a real
base model). Real presets run for long: t2l.py:smollm2_sft ~40 min, d2l.py:smollm2_embedded
~70 min on 2 CPU cores (their model cards); the official presets are meant for accelerators.

options:
  --config FILE.py:PRESET   experiment config (required); --config.a.b=VALUE overrides a key
                            (an unknown key is an error naming the valid ones)
  --workdir DIR             run folder: checkpoints, metrics.jsonl, tb/ (default: runs/PRESET)
  --data PATH               training records, repeatable. D2L: token shards (`data niah|facts
                            --format tokens`: a shard or a folder of them), text QA records
                            (NIAH, facts) or self-generated QA records (official columns;
                            JSONL/Parquet/ArrayRecord). T2L: a `data task-suite` folder or a
                            Lots-of-LoRAs task folder. Without it the `tiny` presets train on a
                            built-in synthetic task.
  --base_model DIR          base model: known name, folder, .gguf or hub id (default: the
                            config's base_model)
  --ctx_model DIR           cross-model D2L presets (d2l.py:gemma2_2b_vlm_ctx, tiny_vlm_ctx):
                            the context encoder, e.g. a Gemma-3 VLM folder (default: the
                            config's ctx_model; tiny_vlm_ctx: a random tiny encoder). Its
                            tokenizer reads the contexts of --data (text records; self-gen
                            records are decoded and re-tokenized; token shards are refused)
  --mesh SPEC               device mesh data=N,fsdp=N,tensor=N, -1 = the remaining devices
                            (default: the config's train.mesh)
  --coordinator, --num_processes, --process_id   multi-process runs (launch/README.md)

Exit status: 0 done; 2 an error, or training diverged (train.max_bad_steps skipped steps in a
row; the last good checkpoint is kept); 143 stopped by SIGTERM after saving (rerun to resume).
"""

PLAN_HELP = """usage: hyperlora-jax plan --config FILE.py:PRESET [--config.a.b=VALUE ...]
                          --mesh data=N,fsdp=N,tensor=N [--rows N] [--analytic_only]
                          [--chip NAME] [--json]

Compiles the real-size training step on fake CPU devices (abstract inputs: nothing is
allocated) and prints XLA:CPU's per-device memory and the FLOPs per step, next to the analytic
per-device memory (parameters, optimizer state, gradients, activations under the remat policy
and the sharding) and whether it fits each chip's HBM (v4, v5e, v5p, v6e, H100, H200).
Compiling takes minutes for a real base model (gemma2_2b_qa on 8 fake devices: ~4 min on 2
cores); it says so while it works. --analytic_only skips it (shapes only: seconds).

options:
  --config FILE.py:PRESET   experiment config (required), with --config.a.b=VALUE overrides
  --mesh SPEC               data=N,fsdp=N,tensor=N: N1*N2*N3 fake devices (required)
  --rows N                  global rows per step (default: the config's)
  --analytic_only           skip the compilation: the analytic memory plan only
  --chip NAME               the fit line for one chip only (v4, v5e, v5p, v6e, H100, H200)
  --json                    print the measurements as JSON
"""


def _configs_dir() -> Path | None:
    """configs/ of the checkout: the working directory's, else the one beside the package."""
    for d in (Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs"):
        if (d / "d2l.py").is_file():
            return d
    return None


def preset_names(path: Path) -> list[str]:
    """The names in a config file's `PRESETS` (a tuple of names, or a dict built from a tuple of
    functions), read from its syntax tree: `--help` neither runs the file nor waits for jax."""
    import ast

    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    for node in tree.body:
        targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "PRESETS" for t in targets):
            names = []
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Tuple):
                    for e in sub.elts:
                        if isinstance(e, ast.Name):
                            names.append(e.id)
                        elif isinstance(e, ast.Constant) and isinstance(e.value, str):
                            names.append(e.value)
                    break
            return names
    return []


def presets_help() -> str:
    """'presets:' lines for --help: every PRESETS entry of configs/d2l.py and configs/t2l.py."""
    import textwrap

    d = _configs_dir()
    if d is None:
        return "presets: see configs/d2l.py and configs/t2l.py in the repository\n"
    lines = ["presets (FILE.py:PRESET; each file's docstring describes them):"]
    for f in sorted(d.glob("*.py")):
        names = preset_names(f)
        if names:
            rel = f"configs/{f.name}" if d == Path.cwd() / "configs" else str(f)
            lines += textwrap.wrap(
                ", ".join(names), 96, initial_indent=f"  {rel}: ", subsequent_indent="    "
            )
    return "\n".join(lines) + "\n"


def _flags(name: str, argv: list[str]):
    from absl import flags

    fv = flags.FlagValues()
    define_config_flag(fv, [name, *argv])
    flags.DEFINE_string("mesh", "", "data=N,fsdp=N,tensor=N", flag_values=fv)
    if name == "train":
        flags.DEFINE_string("workdir", None, "run directory", flag_values=fv)
        flags.DEFINE_multi_string("data", [], "training records", flag_values=fv)
        flags.DEFINE_string(
            "base_model", None, "base model folder (save_pretrained)", flag_values=fv
        )
        flags.DEFINE_string(
            "ctx_model", None, "cross-model D2L: the context encoder", flag_values=fv
        )
        flags.DEFINE_string("coordinator", None, "multi-process coordinator", flag_values=fv)
        flags.DEFINE_integer("num_processes", None, "multi-process count", flag_values=fv)
        flags.DEFINE_integer("process_id", None, "this process", flag_values=fv)
    else:
        flags.DEFINE_integer(
            "rows", None, "global rows per step (default: the config's)", flag_values=fv
        )
        flags.DEFINE_bool("json", False, "print JSON", flag_values=fv)
        flags.DEFINE_bool("analytic_only", False, "skip the compilation", flag_values=fv)
        flags.DEFINE_string("chip", None, "fit for this chip only", flag_values=fv)
    return fv


def _parse(name: str, args: list[str]):
    if not args or any(a in ("-h", "--help") for a in args):
        print(TRAIN_HELP if name == "train" else PLAN_HELP)
        print(presets_help())
        raise SystemExit(0)
    config_arg, overrides = _config_arg(args)
    if config_arg is None:
        raise ConfigError(f"{name}: --config FILE.py:PRESET is required")
    load_config(config_arg, overrides)  # config errors as one line, before the other flags
    fv = _flags(name, args)
    try:
        fv([name, *args])
    except Exception as e:  # absl: unknown flag, bad value
        raise ConfigError(f"{name}: {one_line(e)}") from e
    return fv


def _config_arg(args: list[str]) -> tuple[str, list[str]]:
    """Split '--config X' / '--config=X' from the dotted overrides."""
    rest, arg, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            arg, i = args[i + 1], i + 2
            continue
        if a.startswith("--config="):
            arg = a.split("=", 1)[1]
        elif a.startswith("--config."):
            rest.append(a)
        i += 1
    return arg, rest


def cmd_plan(ns) -> int:
    fv = _parse("plan", ns.args)  # --help before the jax imports below

    from hyperlora_jax.train import plan as plan_mod
    from hyperlora_jax.train.build import derive
    from hyperlora_jax.train.memory import CHIPS
    from hyperlora_jax.train.sharding import parse_mesh_spec

    if not fv.mesh:
        raise ConfigError("plan: --mesh data=N,fsdp=N,tensor=N is required")
    if fv.chip is not None and fv.chip not in CHIPS:
        raise ConfigError(f"plan: unknown --chip {fv.chip!r}; choose one of {', '.join(CHIPS)}")
    mesh = parse_mesh_spec(fv.mesh)
    if -1 in mesh.values():
        raise ConfigError(f"plan: --mesh {fv.mesh}: give every axis a size (-1 needs devices)")
    config_arg, overrides = _config_arg(ns.args)
    derive(fv.config)  # value errors here, not as the subprocess's traceback
    res = plan_mod.run_subprocess(
        config_arg, overrides, mesh, fv.rows, compile_step=not fv.analytic_only
    )
    if fv.json:
        import json

        print(json.dumps(res, indent=1))
    else:
        print(plan_mod.format_plan(res, fv.chip))
    return 0


def cmd_train(ns) -> int:
    fv = _parse("train", ns.args)  # --help and config errors before jax is imported
    from hyperlora_jax.train.factory import train_from_flags

    train_from_flags(fv)
    return 0


def cmd_export(ns) -> int:
    from hyperlora_jax.train.export import export_run

    out = export_run(ns.workdir, ns.out, step=ns.step, overwrite=ns.overwrite)
    print(f"wrote {out}")
    return 0


def register(subparsers) -> None:
    """Add `train`, `plan` (their flags are parsed by absl inside the command) and
    `export-run`."""
    for name, fn, help_ in (
        ("train", cmd_train, "meta-train a D2L / T2L hypernetwork from a config"),
        (
            "plan",
            cmd_plan,
            "size a training step for a mesh: compiled + analytic memory, chip fit, FLOPs",
        ),
    ):
        p = subparsers.add_parser(name, help=help_, prefix_chars="+", add_help=False)
        p.add_argument("args", nargs="*")
        p.set_defaults(func=fn)
    e = subparsers.add_parser(
        "export-run", help="a training run's hypernetwork -> a checkpoint folder to ship / load"
    )
    e.add_argument("--workdir", required=True, help="the run's --workdir")
    e.add_argument("--out", required=True, help="checkpoint folder to write")
    e.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)


if __name__ == "__main__":  # pragma: no cover
    from hyperlora_jax.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
