"""A task universe for Text-to-LoRA: parametric families whose members are distinct tasks.

Every family is a rule with parameters (a separator, a bracket pair, k, a label pair, an operand,
a date format, ...); every member is one parameter setting, with its own instruction-free
input -> output generator (exact-match answers) and 18 descriptions (3 phrasings that name the
parameters x the 6 framings of `task_suite.FRAMES`). Three splits:

* train: most members of most families;
* held_out_members (a): members of trained families never trained on -- new combinations of
  parameter values the training members use separately, and new operand values;
* held_out_families (b): whole families never trained on.

`write_universe` writes the same Lots-of-LoRAs layout as `task_suite.write_suite`, with
`splits.yaml` holding the three lists, so every loader, trainer and `eval t2l-suite` reads it.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path

from hyperlora_jax.data.task_suite import (
    ANIMALS,
    BAD,
    CITIES,
    COLORS,
    DAYS,
    FRUITS,
    GOOD,
    NAMES,
    THINGS,
    WORDS,
    Task,
    write_tasks,
)

EVAL_DESCRIPTIONS = 2  # per training task, its last descriptions are kept for evaluation
HELD_OUT_FAMILIES = ("wrap_all", "date_format", "to_json")

Make = Callable[[random.Random], tuple[str, str]]

# (slug, text, names in words): what the descriptions call a separator
SEPS = [
    ("hyphen", "-", ["hyphens", 'a dash "-"', 'the "-" character']),
    ("underscore", "_", ["underscores", 'an underscore "_"', 'the "_" character']),
    ("comma", ", ", ["commas", 'a comma and a space ", "', "a comma"]),
    ("slash", "/", ["slashes", 'a slash "/"', 'the "/" character']),
    ("pipe", " | ", ["pipes", 'a vertical bar " | "', 'the pipe symbol "|"']),
    ("plus", "+", ["plus signs", 'a plus "+"', 'the "+" character']),
    ("dot", ".", ["dots", 'a period "."', "full stops with no spaces"]),
    ("semicolon", "; ", ["semicolons", 'a semicolon and a space "; "', "a semicolon"]),
    ("and", " and ", ['the word "and"', '" and " between them', '"and"']),
    ("none", "", ["nothing", "no space at all", "no separator"]),
    ("star", "*", ["asterisks", 'a star "*"', 'the "*" character']),
    ("colon", ":", ["colons", 'a colon ":"', 'the ":" character']),
    ("tilde", "~", ["tildes", 'a tilde "~"', 'the "~" character']),
    ("arrow", " -> ", ['arrows " -> "', 'an arrow "->"', 'the arrow "->"']),
    ("hash", "#", ["hash signs", 'a hash "#"', 'the "#" character']),
    ("at", "@", ["at signs", 'an at sign "@"', 'the "@" character']),
    ("equals", "=", ["equals signs", 'an equals sign "="', 'the "=" character']),
]
CASES = [
    ("lower", str.lower, ["in lower case", "in small letters", "all lowercase"]),
    ("upper", str.upper, ["in upper case", "in capital letters", "all in caps"]),
    ("title", str.title, ["in title case", "with each word capitalized", "capitalizing words"]),
]
BRACKETS = [
    ("paren", "(", ")", "round brackets"),
    ("square", "[", "]", "square brackets"),
    ("curly", "{", "}", "curly braces"),
    ("angle", "<", ">", "angle brackets"),
    ("dquote", '"', '"', "double quotes"),
    ("squote", "'", "'", "single quotes"),
    ("star", "*", "*", "asterisks"),
    ("under", "_", "_", "underscores"),
    ("bar", "|", "|", "vertical bars"),
    ("hash", "#", "#", "hash signs"),
    ("dollar", "$", "$", "dollar signs"),
    ("tilde", "~", "~", "tildes"),
    # wrap_each only from here: wrap_all, a held-out family, keeps the first 12
    ("plus", "+", "+", "plus signs"),
    ("percent", "%", "%", "percent signs"),
    ("equals", "=", "=", "equals signs"),
    ("caret", "^", "^", "carets"),
    ("at", "@", "@", "at signs"),
    ("dash", "-", "-", "dashes"),
]
# (slug, function of the word list, phrasings)
SELECTS: list[tuple[str, Callable[[list[str]], list[str]], list[str]]] = [
    ("reversed", lambda w: w[::-1], ["reverse the word order", "put the words in reverse order"]),
    ("sorted", sorted, ["sort the words alphabetically", "put the words in A-Z order"]),
    (
        "sorted_desc",
        lambda w: sorted(w, reverse=True),
        ["sort the words from Z to A", "put the words in reverse alphabetical order"],
    ),
    ("first2", lambda w: w[:2], ["keep only the first two words", "take the first 2 words"]),
    ("first3", lambda w: w[:3], ["keep only the first three words", "take the first 3 words"]),
    ("last2", lambda w: w[-2:], ["keep only the last two words", "take the final 2 words"]),
    ("last3", lambda w: w[-3:], ["keep only the last three words", "take the final 3 words"]),
    ("every2nd", lambda w: w[::2], ["keep every second word", "keep words 1, 3, 5 and so on"]),
    ("last4", lambda w: w[-4:], ["keep only the last four words", "take the final 4 words"]),
    (
        "every2nd_from2",
        lambda w: w[1::2],
        ["keep every second word starting from the second", "keep words 2, 4, 6 and so on"],
    ),
    ("middle", lambda w: w[1:-1], ["drop the first and the last word", "keep the inner words"]),
]
PREFIXES = (
    "Note:",
    "Answer:",
    "Hello",
    "Yes,",
    "OK",
    "Sure:",
    "Today",
    "Result:",
    "Well,",
    "So",
    "Hey",
    "Output:",
    "Alert:",
    "Fact:",
    "Maybe",
    "Look:",
    "Info:",
    "Quote:",
    "Hint:",
    "Wow,",
    "Done:",
    "Reply:",
    "Listen",
    "Okay,",
    "Dear",
    "Thanks",
    "Step:",
    "Oh,",
    "Now",
    "Here:",
)
SUFFIXES = (
    *("!", "?", "...", ".", "done", "end", "please", "ok", ":)", "#", "?!", "now"),
    *("!!", "yes", "bye", "thanks", ";)", "--", "over", "amen", "lol", "~", "again", "***"),
)
ORDINALS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth"}
LABELS = [
    ("positive", "negative"),
    ("yes", "no"),
    ("good", "bad"),
    ("1", "0"),
    ("true", "false"),
    ("A", "B"),
    ("happy", "sad"),
    ("up", "down"),
    ("on", "off"),
    ("pass", "fail"),
    ("+", "-"),
    ("correct", "wrong"),
    ("high", "low"),
    ("left", "right"),
]
MONTHS = (
    "January February March April May June July August September October November December".split()
)
HOT = "boiling hot warm sunny burning steaming scorching toasty".split()
COLD = "icy freezing cold chilly frosty snowy frozen cool".split()
KEYS = ("name", "city", "color", "day", "fruit", "pet")


def _words(r: random.Random, lo: int = 3, hi: int = 5) -> list[str]:
    return [r.choice(WORDS) for _ in range(r.randint(lo, hi))]


def _member(family: str, slug: str, whats: list[str], make: Make) -> Task:
    return Task(f"{family}__{slug}", family, tuple(whats), make)


# ---- word transformations


def _join() -> list[Task]:
    out = []
    for (s, sep, names), (c, case, cnames) in itertools.product(SEPS, CASES):
        whats = [
            f"join the words with {names[0]}, {cnames[0]}",
            f"write the words {cnames[1]}, separated by {names[1]}",
            f"put {names[2]} between the words and write them {cnames[2]}",
        ]

        def make(r, sep=sep, case=case):
            w = _words(r)
            return " ".join(w), case(sep.join(w))

        out.append(_member("join", f"{s}__{c}", whats, make))
    return out


def _select() -> list[Task]:
    out = []
    for (s, f, names), (c, case, cnames) in itertools.product(SELECTS, CASES):
        whats = [
            f"{names[0]} and write the result {cnames[0]}",
            f"{names[1]}, then write them {cnames[1]}",
            f"{names[0]}; output the words {cnames[2]}",
        ]

        def make(r, f=f, case=case):
            w = _words(r, 4, 6)
            return " ".join(w), case(" ".join(f(w)))

        out.append(_member("select", f"{s}__{c}", whats, make))
    return out


def _select_join() -> list[Task]:
    """Compositions: a selection, then a separator."""
    out = []
    for (s, f, names), (p, sep, snames) in itertools.product(SELECTS[:7], SEPS[:7]):
        whats = [
            f"{names[0]}, then join them with {snames[0]}",
            f"{names[1]} and connect them using {snames[1]}",
            f"first {names[0]}, then put {snames[2]} between the words",
        ]

        def make(r, f=f, sep=sep):
            w = _words(r, 4, 6)
            return " ".join(w), sep.join(f(w))

        out.append(_member("select_join", f"{s}__{p}", whats, make))
    return out


def _wrap(family: str, each: bool) -> list[Task]:
    out = []
    brackets = BRACKETS if each else BRACKETS[:12]
    for (b, lo, hi, name), (c, case, cnames) in itertools.product(brackets, CASES[:2]):
        if each:
            whats = [
                f"wrap every word in {name}, {cnames[0]}",
                f"put each word between {lo} and {hi} and write it {cnames[1]}",
                f"enclose each single word in {name} ({lo}word{hi}), {cnames[2]}",
            ]
        else:
            whats = [
                f"wrap the whole sentence in {name}, {cnames[0]}",
                f"put the entire text between {lo} and {hi} and write it {cnames[1]}",
                f"enclose the full input in one pair of {name}, {cnames[2]}",
            ]

        def make(r, lo=lo, hi=hi, case=case):
            w = _words(r)
            body = " ".join(f"{lo}{x}{hi}" for x in w) if each else f"{lo}{' '.join(w)}{hi}"
            return " ".join(w), case(body)

        out.append(_member(family, f"{b}__{c}", whats, make))
    return out


def _prefix() -> list[Task]:
    out = []
    for i, word in enumerate(PREFIXES):
        for c, case, cnames in CASES[:2]:
            whats = [
                f'start the output with "{word}" followed by the sentence {cnames[0]}',
                f'prepend "{word}" to the text, written {cnames[1]}',
                f'write "{word}" and then the input {cnames[2]}',
            ]

            def make(r, word=word, case=case):
                x = " ".join(_words(r))
                return x, f"{word} {case(x)}"

            out.append(_member("prefix", f"{i:02d}__{c}", whats, make))
    return out


def _suffix() -> list[Task]:
    out = []
    for i, end in enumerate(SUFFIXES):
        sep = "" if not end[0].isalpha() else " "
        whats = [
            f'end the sentence with "{end}"',
            f'append "{end}" to the text',
            f'repeat the input and add "{end}" at the end',
        ]

        def make(r, end=end, sep=sep):
            x = " ".join(_words(r))
            return x, f"{x}{sep}{end}"

        out.append(_member("suffix", f"{i:02d}", whats, make))
    return out


def _kth_word() -> list[Task]:
    out = []
    picks = [(f"k{k}", k - 1, f"the {ORDINALS[k]} word", f"word number {k}") for k in range(1, 6)]
    picks += [
        ("last", -1, "the last word", "the final word"),
        ("last2", -2, "the second-to-last word", "the word before the last one"),
        ("last3", -3, "the third word from the end", "the third-last word"),
    ]
    for (s, i, n1, n2), (c, case, cnames) in itertools.product(picks, CASES[:2]):
        whats = [
            f"output {n1} only, {cnames[0]}",
            f"give {n2} of the sentence {cnames[1]}",
            f"extract {n1} and write it {cnames[2]}",
        ]

        def make(r, i=i, case=case):
            w = _words(r, 5, 6)
            return " ".join(w), case(w[i])

        out.append(_member("kth_word", f"{s}__{c}", whats, make))
    return out


def _drop_kth() -> list[Task]:
    out = []
    for k, (c, case, cnames) in itertools.product(range(1, 6), CASES[:2]):
        whats = [
            f"remove the {ORDINALS[k]} word and keep the rest {cnames[0]}",
            f"delete word number {k}, writing the others {cnames[1]}",
            f"output the sentence without its {ORDINALS[k]} word, {cnames[2]}",
        ]

        def make(r, k=k, case=case):
            w = _words(r, 5, 6)
            return " ".join(w), case(" ".join(w[: k - 1] + w[k:]))

        out.append(_member("drop_kth", f"k{k}__{c}", whats, make))
    return out


def _repeat() -> list[Task]:
    out = []
    times = {2: "twice", 3: "three times", 4: "four times"}
    for n, (s, sep, names) in itertools.product(
        (2, 3, 4), [SEPS[i] for i in (0, 2, 4, 9, 8, 7, 3, 5)]
    ):
        whats = [
            f"repeat the text {n} times, joined by {names[0]}",
            f"write the input {n} times in a row with {names[1]} in between",
            f"say the sentence {times[n]}, separated by {names[2]}",
        ]

        def make(r, n=n, sep=sep):
            x = " ".join(_words(r, 2, 3))
            return x, sep.join([x] * n)

        out.append(_member("repeat", f"n{n}__{s}", whats, make))
    return out


def _char_ops() -> list[Task]:
    out = []

    def add(slug, whats, f, lo=3, hi=5):
        def make(r):
            w = _words(r, lo, hi)
            return " ".join(w), f(w)

        out.append(_member("char_ops", slug, whats, make))

    add(
        "acronym_upper",
        [
            "make an acronym of the first letters in capitals",
            "output the initials in upper case",
            "take each word's first letter, capitalized",
        ],
        lambda w: "".join(x[0] for x in w).upper(),
    )
    add(
        "acronym_lower",
        [
            "make an acronym of the first letters in small letters",
            "output the initials in lower case",
            "take each word's first letter, lowercase",
        ],
        lambda w: "".join(x[0] for x in w),
    )
    add(
        "last_letters",
        [
            "output the last letter of every word, joined",
            "take each word's final letter",
            "write the words' last letters together",
        ],
        lambda w: "".join(x[-1] for x in w),
    )
    for s, sep, names in (SEPS[0], SEPS[2], ("space", " ", ["spaces", "a space", "blanks"])):
        add(
            f"lengths__{s}",
            [
                f"give the length of every word, separated by {names[0]}",
                f"count the letters in each word and join the counts with {names[1]}",
                f"output each word's number of letters with {names[2]} in between",
            ],
            lambda w, sep=sep: sep.join(str(len(x)) for x in w),
        )
        add(
            f"spell__{s}",
            [
                f"spell the first word letter by letter, separated by {names[0]}",
                f"split the first word into its letters joined with {names[1]}",
                f"write the opening word's letters with {names[2]} between them",
            ],
            lambda w, sep=sep: sep.join(w[0]),
            1,
            2,
        )
    for a, b in (
        ("a", "@"),
        ("e", "3"),
        ("o", "0"),
        ("i", "1"),
        ("s", "$"),
        ("t", "7"),
        ("u", "*"),
    ):
        add(
            f"replace_{a}",
            [
                f'replace every "{a}" with "{b}"',
                f'substitute "{b}" for each letter {a}',
                f'swap all "{a}" characters for "{b}"',
            ],
            lambda w, a=a, b=b: " ".join(w).replace(a, b),
        )
    add(
        "double",
        ["write every word twice", "double each word", "repeat each word once right after itself"],
        lambda w: " ".join(f"{x} {x}" for x in w),
    )
    return out


def _count() -> list[Task]:
    out = []

    def add(slug, whats, f):
        def make(r):
            w = _words(r, 2, 8)
            return " ".join(w), str(f(w))

        out.append(_member("count", slug, whats, make))

    add(
        "words",
        ["count the words", "output how many words there are", "give the number of words"],
        len,
    )
    for n in (5, 6, 7):  # one word has 4 letters, the others 5 to 8
        add(
            f"longer{n}",
            [
                f"count the words longer than {n} letters",
                f"how many words have more than {n} letters",
                f"give the number of words with over {n} characters",
            ],
            lambda w, n=n: sum(len(x) > n for x in w),
        )
    add(
        "vowel_start",
        [
            "count the words that start with a vowel",
            "how many words begin with a, e, i, o or u",
            "give the number of words starting with a vowel",
        ],
        lambda w: sum(x[0] in "aeiou" for x in w),
    )
    for n in (6, 7):
        add(
            f"shorter{n}",
            [
                f"count the words shorter than {n} letters",
                f"how many words have fewer than {n} letters",
                f"give the number of words with under {n} characters",
            ],
            lambda w, n=n: sum(len(x) < n for x in w),
        )
    for ch in "aeo":
        add(
            f"has_{ch}",
            [
                f'count the words containing the letter "{ch}"',
                f'how many words have an "{ch}" in them',
                f'give the number of words that include "{ch}"',
            ],
            lambda w, ch=ch: sum(ch in x for x in w),
        )
    add(
        "vowel_end",
        [
            "count the words that end with a vowel",
            "how many words finish with a, e, i, o or u",
            "give the number of words ending in a vowel",
        ],
        lambda w: sum(x[-1] in "aeiou" for x in w),
    )
    add(
        "first_len",
        [
            "count the letters of the first word",
            "give the length of the first word",
            "how many characters does the opening word have",
        ],
        lambda w: len(w[0]),
    )
    return out


def _filter_words() -> list[Task]:
    out = []

    def add(slug, whats, keep):
        def make(r):
            while True:
                w = _words(r, 4, 6)
                kept = [x for x in w if keep(x)]
                if kept:
                    return " ".join(w), " ".join(kept)

        out.append(_member("filter_words", slug, whats, make))

    for n in (4, 5, 6, 7):
        add(
            f"longer{n}",
            [
                f"keep only the words longer than {n} letters",
                f"list the words with more than {n} letters",
                f"output the words that have over {n} characters",
            ],
            lambda x, n=n: len(x) > n,
        )
    for n in (6, 7):
        add(
            f"shorter{n}",
            [
                f"keep only the words shorter than {n} letters",
                f"list the words with fewer than {n} letters",
                f"output the words that have under {n} characters",
            ],
            lambda x, n=n: len(x) < n,
        )
    for ch in "aeoiur":
        add(
            f"has_{ch}",
            [
                f'keep only the words containing the letter "{ch}"',
                f'list the words with an "{ch}" in them',
                f'output the words that include "{ch}"',
            ],
            lambda x, ch=ch: ch in x,
        )
    return out


# ---- extraction, numbers, classification, formatting


def _record(r: random.Random) -> tuple[str, dict[str, str]]:
    f = {
        "name": r.choice(NAMES),
        "city": r.choice(CITIES),
        "day": r.choice(DAYS),
        "year": str(r.randint(1900, 2030)),
        "amount": str(r.randint(2, 99)),
        "currency": r.choice(["dollars", "euros", "pounds", "yen", "francs"]),
        "color": r.choice(COLORS),
    }
    text = (
        f"{f['name']} paid {f['amount']} {f['currency']} for a {f['color']} "
        f"{r.choice(THINGS)} in {f['city']} on {f['day']} in {f['year']}."
    )
    return text, f


def _extract() -> list[Task]:
    out = []
    fields = {
        "name": ("the person's name", "who paid"),
        "city": ("the city", "where it happened"),
        "day": ("the weekday", "which day of the week it was"),
        "currency": ("the currency", "which currency was used"),
        "color": ("the color", "which color is mentioned"),
        "year": ("the year", "which year it was"),
        "amount": ("the amount of money as a number", "how much was paid, digits only"),
    }
    styles = [
        ("plain", lambda v: v, ["as written", "exactly as it appears", "unchanged"]),
        ("upper", str.upper, ["in capital letters", "in upper case", "all in caps"]),
        ("quoted", lambda v: f'"{v}"', ["in double quotes", 'wrapped in "quotes"', "quoted"]),
    ]
    for field, (n1, n2) in fields.items():
        for st, f, snames in styles:
            if st == "upper" and field in ("year", "amount"):
                continue  # same output as plain
            whats = [
                f"extract {n1} and write it {snames[0]}",
                f"tell {n2}, {snames[1]}",
                f"output only {n1}, {snames[2]}",
            ]

            def make(r, field=field, f=f):
                text, rec = _record(r)
                return text, f(rec[field])

            out.append(_member("extract", f"{field}__{st}", whats, make))
    return out


def _arith() -> list[Task]:
    out = []
    ops = [("add", k, lambda n, k: n + k) for k in (1, 2, 3, 4, 5, 7, 10, 20, 50, 100)]
    ops += [("sub", k, lambda n, k: n - k) for k in (1, 2, 3, 5, 10, 20)]
    ops += [("mul", k, lambda n, k: n * k) for k in (2, 3, 4, 5, 10)]
    ops += [("add", k, lambda n, k: n + k) for k in (6, 8, 9, 15, 30)]
    ops += [("sub", k, lambda n, k: n - k) for k in (4, 7, 15, 50)]
    ops += [("mul", k, lambda n, k: n * k) for k in (6, 7, 8, 9)]
    words = {
        "add": (
            "add {k} to the number",
            "increase the number by {k}",
            "output the number plus {k}",
        ),
        "sub": (
            "subtract {k} from the number",
            "decrease the number by {k}",
            "output the number minus {k}",
        ),
        "mul": (
            "multiply the number by {k}",
            "output {k} times the number",
            "give the product of the number and {k}",
        ),
    }
    for op, k, f in ops:

        def make(r, k=k, f=f):
            n = r.randint(0, 99)  # "sub" may go below zero
            return str(n), str(f(n, k))

        out.append(_member("arith", f"{op}{k}", [w.format(k=k) for w in words[op]], make))
    return out


def _nums(r: random.Random) -> list[int]:
    return [r.randint(1, 60) for _ in range(r.randint(3, 5))]


def _list_stat() -> list[Task]:
    stats = [
        (
            "max",
            max,
            ["output the largest number", "give the maximum of the list", "find the biggest value"],
        ),
        (
            "min",
            min,
            ["output the smallest number", "give the minimum of the list", "find the lowest value"],
        ),
        ("sum", sum, ["add up the numbers", "give the sum of the list", "compute the total"]),
        (
            "count",
            len,
            [
                "count the numbers in the list",
                "how many numbers are there",
                "give the length of the list",
            ],
        ),
        (
            "range",
            lambda x: max(x) - min(x),
            [
                "give the largest minus the smallest number",
                "compute the range of the list",
                "output max minus min",
            ],
        ),
        (
            "first",
            lambda x: x[0],
            [
                "output the first number",
                "give the number that comes first",
                "return the opening number",
            ],
        ),
        (
            "last",
            lambda x: x[-1],
            ["output the last number", "give the final number", "return the number at the end"],
        ),
        (
            "second",
            lambda x: x[1],
            ["output the second number", "give the number in second place", "return number two"],
        ),
        (
            "second_last",
            lambda x: x[-2],
            [
                "output the second-to-last number",
                "give the number before the last one",
                "return the penultimate number",
            ],
        ),
    ]
    out = []
    for s, f, whats in stats:

        def make(r, f=f):
            x = _nums(r)
            return ", ".join(map(str, x)), str(f(x))

        out.append(_member("list_stat", s, whats, make))
    return out


def _threshold() -> list[Task]:
    out = []
    for t in (10, 20, 30, 40, 50, 25, 35, 45):
        for s, whats, f in (
            (
                "above",
                [
                    f"list the numbers above {t}",
                    f"keep only the numbers greater than {t}",
                    f"output every number bigger than {t}",
                ],
                lambda x, t: ", ".join(str(n) for n in x if n > t) or "none",
            ),
            (
                "below",
                [
                    f"list the numbers below {t}",
                    f"keep only the numbers smaller than {t}",
                    f"output every number less than {t}",
                ],
                lambda x, t: ", ".join(str(n) for n in x if n < t) or "none",
            ),
            (
                "count_above",
                [
                    f"count the numbers above {t}",
                    f"how many numbers are greater than {t}",
                    f"give the number of values bigger than {t}",
                ],
                lambda x, t: str(sum(n > t for n in x)),
            ),
        ):

            def make(r, f=f, t=t):
                x = _nums(r)
                return ", ".join(map(str, x)), f(x, t)

            out.append(_member("threshold", f"{s}{t}", whats, make))
    return out


def _rules() -> list[tuple[str, str, Callable[[random.Random], tuple[str, bool]]]]:
    """(slug, 'if ... / otherwise' wording, input maker returning (text, is_first_label))."""

    def sentiment(r):
        good = r.random() < 0.5
        return f"The {r.choice(THINGS)} was {r.choice(GOOD if good else BAD)}.", good

    def temperature(r):
        hot = r.random() < 0.5
        return (
            f"The {r.choice(['water', 'room', 'day', 'soup', 'air'])} was "
            f"{r.choice(HOT if hot else COLD)}.",
            hot,
        )

    def parity(r):
        n = r.randint(1, 99)
        return str(n), n % 2 == 1

    def weekend(r):
        d = r.choice(DAYS)
        return f"We meet on {d}.", d in ("Saturday", "Sunday")

    def size(r):
        n = r.randint(1, 100)
        return str(n), n > 50

    def animal(r):
        a = r.random() < 0.5
        return r.choice(ANIMALS if a else FRUITS), a

    def city(r):
        c = r.random() < 0.5
        return r.choice(CITIES if c else NAMES), c

    def question(r):
        q = r.random() < 0.5
        w = " ".join(_words(r, 3, 4))
        return (f"is the {w}?" if q else f"the {w} is here."), q

    def long(r):
        n = r.randint(2, 8)
        return " ".join(_words(r, n, n)), n > 4

    return [
        ("sentiment", "the review is positive", sentiment),
        ("temperature", "the sentence describes something hot", temperature),
        ("parity", "the number is odd", parity),
        ("weekend", "the day is on a weekend", weekend),
        ("size", "the number is larger than 50", size),
        ("animal", "the word is an animal (not a fruit)", animal),
        ("city", "the word is a city (not a person's name)", city),
        ("question", "the text is a question", question),
        ("long", "the text has more than four words", long),
    ]


def _classify() -> list[Task]:
    out = []
    for (s, cond, f), (yes, no) in itertools.product(_rules(), LABELS):
        whats = [
            f'answer "{yes}" if {cond}, otherwise "{no}"',
            f"reply {yes} when {cond} and {no} when not",
            f'label the input: "{yes}" if {cond}, else "{no}"',
        ]

        def make(r, f=f, yes=yes, no=no):
            x, first = f(r)
            return x, yes if first else no

        out.append(_member("classify", f"{s}__{LABELS.index((yes, no)):02d}", whats, make))
    return out


def _date_format() -> list[Task]:
    formats = [
        ("iso", "{y}-{m:02d}-{d:02d}", "YYYY-MM-DD"),
        ("eu", "{d:02d}/{m:02d}/{y}", "DD/MM/YYYY"),
        ("us", "{m:02d}/{d:02d}/{y}", "MM/DD/YYYY"),
        ("dots", "{d:02d}.{m:02d}.{y}", "DD.MM.YYYY"),
        ("ymd_slash", "{y}/{m:02d}/{d:02d}", "YYYY/MM/DD"),
        ("month_year", "{month} {y}", "Month YYYY"),
        ("day_month", "{d} {month}", "D Month"),
        ("year", "{y}", "YYYY (the year only)"),
    ]
    out = []
    for s, fmt, name in formats:
        whats = [
            f"rewrite the date in the format {name}",
            f"convert the date to {name}",
            f"output the date as {name}",
        ]

        def make(r, fmt=fmt):
            y, m, d = r.randint(1950, 2029), r.randint(1, 12), r.randint(1, 28)
            return f"{MONTHS[m - 1]} {d}, {y}", fmt.format(y=y, m=m, d=d, month=MONTHS[m - 1])

        out.append(_member("date_format", s, whats, make))
    return out


def _to_json() -> list[Task]:
    out = []
    for key in ("items", "words", "list", "tags", "values", "data"):
        for s, f, form in (
            ("list", lambda w, key: json.dumps({key: w}), "a list of strings"),
            ("string", lambda w, key: json.dumps({key: " ".join(w)}), "one string"),
        ):
            whats = [
                f'write the words as JSON with the key "{key}" holding {form}',
                f'output a JSON object {{"{key}": ...}} with the words as {form}',
                f'format the input as JSON under "{key}", as {form}',
            ]

            def make(r, f=f, key=key):
                w = _words(r, 2, 4)
                return " ".join(w), f(w, key)

            out.append(_member("to_json", f"{key}__{s}", whats, make))
    return out


def _kv_format() -> list[Task]:
    out = []
    pair_seps = [
        ("eq", "=", "an equals sign"),
        ("colon", ": ", "a colon"),
        ("arrow", "->", "an arrow ->"),
        ("dash", "-", "a hyphen"),
    ]
    item_seps = [
        ("comma", ", ", "commas"),
        ("semicolon", "; ", "semicolons"),
        ("pipe", " | ", "vertical bars"),
        ("slash", " / ", "slashes"),
    ]
    for (p, ps, pn), (i, its, iname) in itertools.product(pair_seps, item_seps):
        whats = [
            f"write each key and value joined by {pn}, pairs separated by {iname}",
            f"format the pairs as key{ps.strip()}value, separated by {iname}",
            f"connect every key to its value with {pn} and list the pairs with {iname}",
        ]

        def make(r, ps=ps, its=its):
            keys = r.sample(KEYS, r.randint(2, 3))
            pool = {
                "name": NAMES,
                "city": CITIES,
                "color": COLORS,
                "day": DAYS,
                "fruit": FRUITS,
                "pet": ANIMALS,
            }
            vals = [r.choice(pool[k]) for k in keys]
            x = " ".join(f"{k} {v}" for k, v in zip(keys, vals))
            return x, its.join(f"{k}{ps}{v}" for k, v in zip(keys, vals))

        out.append(_member("kv_format", f"{p}__{i}", whats, make))
    return out


def _families() -> dict[str, list[Task]]:
    fams = [
        _join(),
        _select(),
        _select_join(),
        _wrap("wrap_each", True),
        _wrap("wrap_all", False),
        _prefix(),
        _suffix(),
        _kth_word(),
        _drop_kth(),
        _repeat(),
        _char_ops(),
        _count(),
        _filter_words(),
        _extract(),
        _arith(),
        _list_stat(),
        _threshold(),
        _classify(),
        _date_format(),
        _to_json(),
        _kv_format(),
    ]
    return {f[0].category: f for f in fams}


FAMILIES: dict[str, list[Task]] = _families()
TASKS: list[Task] = [t for f in FAMILIES.values() for t in f]


# (a), fixed by name so that growing a family leaves the set alone. The first 41 were drawn at
# random (9% of every family of at least 6 members) when the universe had 497 tasks; the last 10
# are new combinations of values added later (e.g. "#" as a separator, trained in upper and title
# case only), new operands and one cross-family composition (counting by filter_words' rule).
HELD_OUT_MEMBERS: tuple[str, ...] = (
    *("join__hyphen__upper", "join__pipe__title", "join__plus__upper", "join__slash__title"),
    *("select__first3__lower", "select__first3__upper", "select_join__last2__slash"),
    *("select_join__reversed__pipe", "select_join__sorted__hyphen"),
    *("select_join__sorted_desc__hyphen", "wrap_each__bar__lower", "wrap_each__hash__lower"),
    *("prefix__01__upper", "prefix__05__lower", "prefix__10__lower", "prefix__18__lower"),
    *("suffix__07", "kth_word__last2__upper", "drop_kth__k3__upper", "repeat__n2__and"),
    *("char_ops__double", "count__first_len", "filter_words__longer5", "extract__color__plain"),
    *("extract__day__plain", "arith__mul10", "arith__mul2", "list_stat__max"),
    *("threshold__count_above40", "classify__city__05", "classify__long__09"),
    *("classify__long__10", "classify__parity__13", "classify__question__02"),
    *("classify__question__10", "classify__sentiment__08", "classify__temperature__06"),
    *("classify__weekend__08", "classify__weekend__09", "classify__weekend__12"),
    "kv_format__arrow__comma",
    # added with the wider families
    *("join__hash__lower", "select__last4__lower", "wrap_each__percent__lower"),
    *("prefix__21__lower", "suffix__15", "count__has_e", "filter_words__has_i", "arith__add8"),
    *("threshold__above25", "kv_format__dash__comma"),
)


def splits() -> dict[str, list[str]]:
    """{"train", "held_out_members", "held_out_families"}: task names."""
    fam = [t.name for t in TASKS if t.category in HELD_OUT_FAMILIES]
    members = list(HELD_OUT_MEMBERS)
    held = set(fam) | set(members)
    return {
        "train": [t.name for t in TASKS if t.name not in held],
        "held_out_members": members,
        "held_out_families": fam,
    }


def oracle_check_tasks() -> list[str]:
    """The tasks whose oracle LoRAs a CPU can afford: both held-out sets whole (their oracles are
    the evaluation's upper bound) and the first training member of every family (a learnability
    check per family)."""
    s = splits()
    train = set(s["train"])
    firsts = [
        next(t.name for t in ms if t.name in train)
        for f, ms in FAMILIES.items()
        if any(t.name in train for t in ms)
    ]
    return s["held_out_members"] + s["held_out_families"] + firsts


def write_universe(
    out_dir: str | Path,
    n_train: int = 200,
    n_valid: int = 20,
    n_test: int = 50,
    seed: int = 0,
    drop: tuple[str, ...] = (),
    definition: str = "none",
) -> Path:
    """Write every task (minus `drop`, e.g. tasks whose oracle LoRA failed) in the suite layout;
    `splits.yaml` lists train, held_out_members and held_out_families, and `held_out` (both
    held-out sets) for readers of the two-way suite. `definition`: see `task_suite.write_tasks`."""
    s = {k: [t for t in v if t not in drop] for k, v in splits().items()}
    s["held_out"] = s["held_out_members"] + s["held_out_families"]
    tasks = [t for t in TASKS if t.name not in drop]
    return write_tasks(
        out_dir, tasks, s, EVAL_DESCRIPTIONS, n_train, n_valid, n_test, seed, definition
    )
