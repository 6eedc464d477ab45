"""Synthetic fact documents: answers in the text, deterministic, disjoint names per split."""

from hyperlora_jax.data.facts import generate_fact_documents


def test_every_answer_is_in_its_document():
    for doc in generate_fact_documents(60, "train", seed=3):
        assert len(doc.qas) >= 5
        for qa in doc.qas:
            assert qa.answer in doc.text, (qa, doc.text)
            assert len(qa.questions) >= 2 and len(set(qa.questions)) == len(qa.questions)


def test_deterministic_for_a_seed_and_varies_with_it():
    a = [d.text for d in generate_fact_documents(10, "val", seed=1)]
    assert a == [d.text for d in generate_fact_documents(10, "val", seed=1)]
    assert a != [d.text for d in generate_fact_documents(10, "val", seed=2)]


def test_splits_use_disjoint_names():
    def names(split, n):
        docs = generate_fact_documents(n, split, kinds=("profile",))
        return {
            d.qas[0].questions[0].removeprefix("In what year was ")[: -len(" born?")] for d in docs
        }

    train, test = names("train", 900), names("test", 150)
    assert len(train) > 500 and len(test) > 100
    assert not train & test
