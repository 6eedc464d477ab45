"""README.md runs as written: its ```bash and ```python blocks, in document order, in one
temporary copy of the working tree, with this venv's `hyperlora-jax` on the PATH.

The convention for lines that would train or download for long (README states it in an HTML
comment at the top of its Quick start): a command whose trailing comment contains
`readme-test: CMD` runs CMD instead; `readme-test: skip` runs nothing. The rest of the comment
says what the real command costs, e.g.

    hyperlora-jax train --config configs/t2l.py:smollm2_sft ...   # ~40 min; readme-test: <tiny>

A command continued with `\\` carries the comment on its last line and is replaced whole; a
`make`, `pip` or `pytest` command must carry one (checked before anything runs: run as written it
would install into this venv or start the suite from inside itself). Only
```bash and ```python blocks run; output samples are fenced ```text. Each bash block is one
`bash -e -o pipefail` script (variables do not carry over between blocks; background processes
it leaves are killed with its process group); a python block runs with `python -`.

The copy holds the files git tracks or would track (no runs/, out/, data/); its
`.venv/bin/activate` puts this venv on the PATH, so `source .venv/bin/activate` works as
written. The real SmolLM2-135M-Instruct is used where the README uses it (`fetch-model` caches it
under ~/.cache/hyperlora_jax). On failure the block's output (with each command traced and
timed) is in the message.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARK = re.compile(r"#.*\breadme-test:\s*(.*?)\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


def blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, first line number, source) of every fenced block."""
    out, lang, start, body = [], None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if lang is None and m:
            lang, start, body = m.group(1), i + 1, []
        elif lang is not None and line.strip() == "```":
            out.append((lang, start, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"README.md: the block opened at line {start - 1} is never closed"
    return out


def substitute(script: str) -> str:
    """Apply the `readme-test: CMD` convention to a bash block (see the module docstring)."""
    out, command = [], []
    for line in script.splitlines():
        command.append(line)
        if line.rstrip().endswith("\\"):  # the command goes on
            continue
        m = MARK.search(line)
        if m is None:
            out += command
        else:
            indent = re.match(r"\s*", command[0]).group(0)
            replacement = m.group(1)
            assert replacement, f"empty `readme-test:` in {line!r}; write a command or skip"
            out.append(indent + (":" if replacement == "skip" else replacement))
        command = []
    assert not command, f"a bash block ends inside a continued command: {command}"
    return "\n".join(out) + "\n"


def test_substitute_convention():
    script = (
        "a=1\n"
        "long run \\\n"
        "    --flag   # ~1 h; readme-test: short run --flag\n"
        "  install   # readme-test: skip\n"
        "echo 'no # marker here'\n"
    )
    assert substitute(script) == "a=1\nshort run --flag\n  :\necho 'no # marker here'\n"


# Commands the test must never run as written: they would install into (or re-point the
# editable install of) this venv, or run the test suite from inside it.
NEVER = re.compile(r"(^|[\s;&|(/])(make|pip|pip3)(\s|$)|-m\s+pip\s|\bpytest\b")


def test_readme_blocks_are_fenced():
    """Every block names its language (only bash and python run, output samples are text), and
    every install / make / pytest line carries a `readme-test:` override."""
    found = blocks((REPO / "README.md").read_text(encoding="utf-8"))
    langs = {lang for lang, _, _ in found}
    assert "" not in langs, "a README block has no language: fence it ```bash/python/text"
    assert {"bash", "python"} <= langs
    for lang, line, source in found:
        if lang == "bash":
            bad = [x for x in substitute(source).splitlines() if NEVER.search(x.split("#")[0])]
            assert not bad, f"README.md block at line {line}: mark {bad} `# readme-test: skip`"


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # `source .venv/bin/activate` as written: an activate script that puts this venv's bin first
    # on the PATH. No link to the venv itself, so nothing in the copy can install into it.
    (dest / ".venv" / "bin").mkdir(parents=True)
    (dest / ".venv" / "bin" / "activate").write_text(
        f'export VIRTUAL_ENV="{sys.prefix}"\nexport PATH="{Path(sys.executable).parent}:$PATH"\n'
    )


def _run(cmd: list[str], source: str, cwd: Path, env: dict, timeout: float) -> tuple[int, str]:
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: whatever it leaves running is killed
    )
    try:
        out, _ = proc.communicate(source, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, out + f"\n[timed out after {timeout:.0f} s]"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path):
    test_readme_blocks_are_fenced()  # nothing that installs or runs the suite, before any block
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    work = tmp_path / "repo"
    _copy_tree(work)
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(work),  # the copy's package, not the editable install's
        "JAX_PLATFORMS": "cpu",
        "TQDM_DISABLE": "1",
    }
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    ran = []
    for lang, line, source in blocks(readme):
        if lang == "bash":
            # the trace says when each command started (bash as root ignores PS4 from env)
            source = 'PS4="+ [${SECONDS}s] "\n' + substitute(source)
            cmd = ["bash", "-e", "-o", "pipefail", "-x", "-s"]
        elif lang == "python":
            cmd = [sys.executable, "-"]
        else:
            continue
        t0 = time.perf_counter()
        rc, out = _run(cmd, source, work, env, timeout=1800)
        ran.append(f"README.md:{line} ({lang}) {time.perf_counter() - t0:.0f} s")
        assert rc == 0, (
            f"README.md block at line {line} ({lang}) failed with exit {rc}:\n"
            f"{source}\n--- output (last 6000 chars) ---\n{out[-6000:]}"
        )
    print("\n".join(ran), file=sys.stderr)
    assert len(ran) >= 3
