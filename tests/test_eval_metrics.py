"""Metrics against hand-computed values and against the reference packages (rouge_score)."""

import pytest

from hyperlora_jax.eval import metrics as M


def test_normalize_answer_punctuation_articles_case():
    assert M.normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffel tower in paris"
    assert M.normalize_answer("An apple a day") == "apple day"
    # articles only as whole words; "theory" keeps its "the"
    assert M.normalize_answer("theory of a thing") == "theory of thing"
    # typographic characters are mapped first (curly quote, em dash, nbsp)
    assert M.normalize_answer("it\u2019s\u00a0well\u2014known") == "it s well known"
    assert M.normalize_answer("") == ""


def test_qa_f1_hand_computed():
    # pred words [paris, france], ref words [paris]: p=1/2, r=1, f1=2/3
    assert M.qa_f1("Paris, France.", ["paris"]) == pytest.approx(2 / 3)
    # articles and punctuation do not count
    assert M.qa_f1("the answer: 42", ["answer 42"]) == 1.0
    # hyphen splits words: [state, of, the, art] -> [state, of, art] vs [state, art]: p=2/3 r=1
    assert M.qa_f1("state-of-the-art", ["state art"]) == pytest.approx(0.8)
    # repeated words are counted with multiplicity: pred [a1 a1 a1] vs [a1]: p=1/3, r=1 -> 0.5
    assert M.qa_f1("yes yes yes", ["yes"]) == pytest.approx(0.5)


def test_qa_f1_empty_and_multiple_references():
    assert M.qa_f1("", ["paris"]) == 0.0
    assert M.qa_f1("paris", [""]) == 0.0
    assert M.qa_f1("", [""]) == 0.0  # official: no common word -> 0
    assert M.qa_f1("...", ["!"]) == 0.0
    # max over references, precision/recall of the best one
    f1, p, r = M.qa_f1_prf("new york city", ["boston", "new york", "york city hall"])
    assert f1 == pytest.approx(0.8) and p == pytest.approx(2 / 3) and r == 1.0
    assert M.qa_f1("x", "x") == 1.0  # a bare string is one reference


def test_exact_match():
    assert M.exact_match("The Beatles!", ["beatles"]) == 1.0
    assert M.exact_match("Beatles band", ["beatles"]) == 0.0
    assert M.exact_match("", [""]) == 1.0
    assert M.exact_match("b", ["a", "B."]) == 1.0


def test_rouge_l_hand_computed():
    # 4-digit needle: exact match or nothing
    assert M.rouge_l_f1("4821", "4821") == 1.0
    assert M.rouge_l_f1("The number is 4821.", "4821") == pytest.approx(2 * 0.25 / 1.25)
    assert M.rouge_l_f1("", "4821") == 0.0
    assert M.rouge_l_f1("!!!", "") == 0.0
    # LCS of [a b c d] and [a c b d] is 3: p = r = 3/4
    assert M.rouge_l_f1("a b c d", "a c b d", use_stemmer=False) == pytest.approx(0.75)
    # stemming: "running cats" ~ "run cat"
    assert M.rouge_l_f1("Running cats", "run cat") == 1.0
    assert M.rouge_l_f1("Running cats", "run cat", use_stemmer=False) == 0.0


def test_rouge_l_matches_rouge_score_package():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [
        ("The quick brown fox jumps over the lazy dog", "A quick brown dog jumped over a fox"),
        ("generalization of adapters", "Generalizing adapters, generally"),
        ("1,234 apples -- and 5 oranges", "1234 apples and five oranges"),
        ("", "empty"),
        ("caf\u00e9 na\u00efve r\u00e9sum\u00e9", "cafe naive resume"),
    ]
    for pred, ref in pairs:
        want = scorer.score(pred, ref)["rougeL"].fmeasure
        assert M.rouge_l_f1(pred, ref) == pytest.approx(want, abs=1e-12), (pred, ref)


def test_choice_parser_parity_quirks_and_fixed():
    # official quirks
    assert M.get_choice("Apple", parity=True) == "a"
    assert M.get_choice("Answer: B", parity=True) == "a"
    assert M.get_choice("10", parity=True) == "1"
    assert M.get_choice("(C).", parity=True) == "c"
    assert M.get_choice("", parity=True) is None
    assert M.choice_accuracy("", "", parity=True) == 1  # None == None
    # corrected parser
    assert M.get_choice("Answer: B") == "b"
    assert M.get_choice("The answer is (D).") == "d"
    assert M.get_choice("Apple") is None
    assert M.get_choice("10") == "10"
    assert M.get_choice("2: the second option") == "2"
    assert M.choice_accuracy("", "") == 0
    assert M.choice_accuracy("B", "b") == 1


def test_bool_parser_parity_quirks_and_fixed():
    assert M.get_bool("I don't know, 1 think yes", parity=True) is True  # "1" wins
    assert M.get_bool("I do not know", parity=True) is False  # "no" in "not"/"know"
    assert M.get_bool("invalid", parity=True) is True  # "valid" tested before "invalid"
    assert M.get_bool("maybe", parity=True) is None
    assert M.get_bool("False") is False
    assert M.get_bool("Yes, it is true") is True
    assert M.get_bool("invalid") is False
    assert M.get_bool("nothing here") is None
    assert M.bool_accuracy("true", "True") == 1
    assert M.bool_accuracy("false", "True") == 0
    assert M.bool_accuracy("unsure", "True") == 0


def test_number_parser_parity_quirks_and_fixed():
    assert M.last_number("so -3 apples", parity=True) == 3.0
    assert M.last_number("total 1,000", parity=True) == 0.0
    assert M.last_number("pi is 3.14", parity=True) == 3.14
    assert M.last_number("none", parity=True) is None
    assert M.last_number("so -3 apples") == -3.0
    assert M.last_number("total 1,000.5 dollars") == 1000.5
    assert M.last_number("It costs $18. Done.") == 18.0
    assert M.gsm8k_target("48/2 = 24\n#### 72") == 72
    assert M.gsm8k_target("#### 1,000", parity=True) == 0
    assert M.gsm8k_target("#### 1,000") == 1000
    assert M.number_accuracy("The answer is 72.", 72) == 1
    assert M.number_accuracy("The answer is 72.0", 72, parity=True) == 1
    assert M.number_accuracy("no number", None) == 0


def test_per_length_bin_overlapping_bins():
    out = M.per_length_bin([10, 200, 600, 40000], [1.0, 0.0, 1.0, 0.5])
    assert out["0-127"] == {"score": 1.0, "count": 1}
    assert out["0-511"] == {"score": 0.5, "count": 2}
    assert out["512-1023"] == {"score": 1.0, "count": 1}
    assert out["32768-inf"] == {"score": 0.5, "count": 1}
    assert out["0-8191"]["count"] == 3
    assert "1024-2047" not in out
