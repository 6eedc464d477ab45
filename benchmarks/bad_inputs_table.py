"""The bad-input table of tests/test_bad_inputs.py as markdown: each case run once, in-process,
with its exit code and the error line it prints.

    python benchmarks/bad_inputs_table.py > benchmarks/results/bad_inputs.md
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    os.chdir(ROOT)  # the cases name configs/d2l.py relative to the checkout
    sys.path.insert(0, str(ROOT / "tests"))
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # as tests/conftest.py: grain reads absl flags
    import test_bad_inputs as T

    rows = []
    for case in T.CASES:
        with tempfile.TemporaryDirectory() as tmp:
            err, out = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                rc = T.run_case(case, Path(tmp).resolve())
            lines = T.error_lines(err.getvalue()) or err.getvalue().strip().splitlines()[-1:]
            line = (lines[0] if lines else "(nothing)").replace(tmp, "$TMP")
        for path in map(str, T.PLACES.values()):
            line = line.replace(path, "fixtures/" + path.split("fixtures/official/")[-1])
        owner = next((m.kwargs["reason"] for m in case.marks if m.name == "xfail"), "")
        what = case.what + (f" (xfail, {owner})" if owner else "")
        rows.append((case.command(), what, rc, line))
    print("# Bad inputs: one line, exit code 2, nothing written\n")
    print(
        f"{len(rows)} cases from tests/test_bad_inputs.py "
        "(`python benchmarks/bad_inputs_table.py`).\n"
    )
    print("| command | bad input | exit code | first line printed |")
    print("|---|---|---|---|")
    for cmd, what, rc, line in rows:
        cells = [cmd, what, str(rc), f"`{line}`"]
        print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
