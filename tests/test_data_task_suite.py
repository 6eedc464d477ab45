"""The T2L task suite: size, description paraphrases, held-out splits, deterministic generators."""

from hyperlora_jax.data import task_suite as ts


def test_suite_shape_and_splits():
    assert len(ts.TASKS) >= 40
    assert len({t.name for t in ts.TASKS}) == len(ts.TASKS)
    held = {t.name for t in ts.held_out_tasks()}
    assert len(held) == 8 and held == set(ts.HELD_OUT_TASKS)
    assert not held & {t.name for t in ts.train_tasks()}
    for t in ts.TASKS:
        assert len(set(t.descriptions)) >= 24, t.name
        seen, unseen = ts.description_split(t)
        assert unseen and not set(seen) & set(unseen)


def test_generators_are_deterministic_and_varied():
    for t in ts.TASKS:
        a = ts.examples(t, 20, seed=1)
        assert a == ts.examples(t, 20, seed=1)
        assert all(isinstance(x, str) and isinstance(y, str) and x and y for x, y in a), t.name
        assert len({x for x, _ in a}) > 5, t.name  # inputs vary


def test_outputs_follow_the_rule():
    ((x, y),) = ts.examples(ts.get_task("uppercase"), 1)
    assert y == x.upper()
    ((x, y),) = ts.examples(ts.get_task("add"), 1)
    a, b = map(int, x.split(" and "))
    assert int(y) == a + b
    probes = ts.random_descriptions(5)
    assert probes[0] == "dogs;cats;bananas;" and len(set(probes)) == 5


def test_written_suite_reads_back_through_the_sni_reader(tmp_path):
    from hyperlora_jax.data import sni

    ts.write_suite(tmp_path, n_train=6, n_valid=2, n_test=3)
    task = sni.load_task(tmp_path / "uppercase", split="train")
    assert len(task.examples) == 6
    ex = task.examples[0]
    x, y = ts.examples(ts.get_task("uppercase"), 1)[0]
    assert ex["problem"] == x and ex["answer"] == y
    assert "upper" not in ex["task_def"].lower()  # instruction-free prompt
