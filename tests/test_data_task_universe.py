"""The T2L task universe: sizes of the three splits, distinct members, rule-checked outputs, the
oracle-check subset and `--drop` through the CLI, the evaluation's groups."""

import json
import random

import pytest
import yaml

from hyperlora_jax.data import task_suite as ts
from hyperlora_jax.data import task_universe as U


def test_splits_are_large_disjoint_and_mean_what_they_say():
    s = U.splits()
    train, members, families = (
        set(s[k]) for k in ("train", "held_out_members", "held_out_families")
    )
    assert len(train) >= 400 and len(members) >= 30 and len(families) >= 30
    assert not train & members and not train & families and not members & families
    assert train | members | families == {t.name for t in U.TASKS}
    by_name = {t.name: t for t in U.TASKS}
    trained_families = {by_name[n].category for n in train}
    assert {by_name[n].category for n in members} <= trained_families  # (a): seen families
    assert not {by_name[n].category for n in families} & trained_families  # (b): never trained
    for t in U.TASKS:
        assert len(set(t.descriptions)) >= 16, t.name


def test_members_of_a_family_are_distinct_tasks():
    """Same input (same random state), different parameters -> a different answer somewhere."""
    for fam, members in U.FAMILIES.items():
        outs = {}
        for t in members:
            key = tuple(t.make(random.Random(i)) for i in range(12))
            assert key not in outs, (fam, t.name, outs.get(key))
            outs[key] = t.name


def _one(name):
    return ts.examples(next(t for t in U.TASKS if t.name == name), 1, seed=3)[0]


def test_outputs_follow_the_stated_rule():
    x, y = _one("join__hyphen__upper")
    assert y == "-".join(x.split()).upper()
    x, y = _one("arith__add7")
    assert int(y) == int(x) + 7
    x, y = _one("classify__parity__13")  # labels ("left", "right"): left if odd
    assert y == ("left" if int(x) % 2 else "right")
    x, y = _one("date_format__iso")
    month, day, year = x.replace(",", "").split()
    assert y == f"{year}-{U.MONTHS.index(month) + 1:02d}-{int(day):02d}"
    x, y = _one("to_json__tags__list")
    assert json.loads(y) == {"tags": x.split()}
    x, y = _one("select_join__sorted__slash")
    assert y == "/".join(sorted(x.split()))


def test_oracle_check_subset_and_drop_through_the_cli(tmp_path, capsys):
    from hyperlora_jax.cli import main
    from hyperlora_jax.data import sni
    from hyperlora_jax.eval.suite import suite_splits

    small = ["--n-train", "3", "--n-valid", "1", "--n-test", "2"]
    assert (
        main(["data", "task-suite", "--out", str(tmp_path / "oc"), "--oracle-check", *small]) == 0
    )
    got = yaml.safe_load((tmp_path / "oc" / "splits.yaml").read_text())
    assert len(got["train"]) == len(U.FAMILIES) - len(U.HELD_OUT_FAMILIES)  # one per family
    assert got["held_out"] == got["held_out_members"] + got["held_out_families"]
    capsys.readouterr()

    # an oracle check's results.json: tasks under --min-oracle are left out of the universe
    weak, fine = got["held_out_members"][0], got["held_out_families"][0]
    results = {"tasks": {weak: {"oracle": 0.3}, fine: {"oracle": 0.9}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "checked"
    drop = ["--drop", str(tmp_path / "results.json")]
    assert main(["data", "task-suite", "--out", str(out), *drop, *small]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] == 1
    groups = suite_splits(out)
    assert weak not in groups["held_out_members"] and fine in groups["held_out_families"]
    assert set(groups) == {"train", "held_out_members", "held_out_families"}
    task = sni.load_task(out / fine, split="test")
    assert len(task.examples) == 2 and task.metadata["eval_descriptions"]

    (tmp_path / "bad.json").write_text(json.dumps(["no_such_task"]))
    bad = ["--drop", str(tmp_path / "bad.json")]
    assert main(["data", "task-suite", "--out", str(tmp_path / "x"), *bad]) == 2
    assert "unknown tasks, first 'no_such_task'" in capsys.readouterr().err


def test_suite_eval_refuses_unknown_modes(tmp_path):
    from hyperlora_jax.errors import InputError
    from hyperlora_jax.eval.suite import evaluate_suite

    with pytest.raises(InputError, match="unknown \\['oracles'\\]"):
        evaluate_suite(None, None, None, tmp_path, tasks={}, modes=("oracles",))


def test_definition_in_the_prompt(tmp_path):
    """--definition description: every row's parsed task definition is the task's first
    description (training tasks: a training description; held-out tasks: the first evaluation
    description, the one `eval t2l-suite --descriptions 1` gives the T2L); default: empty."""
    from hyperlora_jax.cli import main
    from hyperlora_jax.data import sni

    small = ["--n-train", "2", "--n-valid", "1", "--n-test", "2", "--oracle-check"]
    suffix = " Please complete the task without any explanation."
    for definition in ("description", "none"):
        out = tmp_path / definition
        assert (
            main(["data", "task-suite", "--out", str(out), "--definition", definition, *small]) == 0
        )
        s = yaml.safe_load((out / "splits.yaml").read_text())
        for name in (s["train"][0], s["held_out_members"][0], s["held_out_families"][0]):
            task = sni.load_task(out / name, split="test")
            first = (
                task.metadata["descriptions"]
                if name in s["train"]
                else task.metadata["eval_descriptions"]
            )[0]
            assert first == next(t for t in U.TASKS if t.name == name).descriptions[0]
            want = first + suffix if definition == "description" else suffix
            assert [ex["task_def"] for ex in task.examples] == [want, want], name
    with pytest.raises(ts.InputError, match="definition 'task' is not one of"):
        ts.write_tasks(tmp_path / "bad", [], {}, 2, 1, 1, 1, 0, definition="task")
