"""A CPU-scale task suite for Text-to-LoRA: 46 generated tasks with paraphrased descriptions.

Every task has an instruction-free input -> output generator (exact-match answers) and at least
24 descriptions, built as every combination of a few phrasings of *what* the task does with
framing templates. 8 tasks are held out entirely; for the other tasks the last
`HELD_OUT_DESCRIPTIONS` descriptions are held out. `write_suite` writes the suite in the
Lots-of-LoRAs / Super-NaturalInstructions layout that `hyperlora_jax.data.sni` reads.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from hyperlora_jax.errors import InputError

WORDS = """apple river stone cloud garden window silver forest candle market bridge orange
winter summer pencil mountain basket thunder island marble rabbit lantern meadow coffee harbor
violin ladder feather blanket castle desert engine planet rocket mirror jacket pepper tiger
rain honey paper music shadow ocean cotton""".split()
NAMES = (
    "Anna Boris Clara David Emma Felix Greta Hassan Irene Jonas Karla Leon Maya Nora Omar".split()
)
CITIES = "Paris Lima Oslo Cairo Delhi Quito Tokyo Dakar Perth Riga Seoul Lagos Bern Hanoi".split()
COLORS = "red blue green yellow purple orange pink brown black white".split()
ANIMALS = "dog cat horse lion eagle shark rabbit tiger wolf whale".split()
FRUITS = "apple banana cherry grape lemon mango peach pear plum melon".split()
GOOD = "wonderful great lovely excellent delightful fantastic superb pleasant".split()
BAD = "terrible awful horrible dreadful boring disappointing poor miserable".split()
THINGS = "movie meal trip book concert hotel game show".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()

FRAMES = (
    "{what}.",
    "Given the input, {what}.",
    "In this task you {what}.",
    "Your job: {what}.",
    "Read the input and {what}.",
    "Task: {what}. Reply with the result only.",
)
HELD_OUT_DESCRIPTIONS = 4  # per training task, taken from the end of its description list


@dataclass(frozen=True)
class Task:
    name: str
    category: str
    whats: tuple[str, ...]  # phrasings of what to do, lower-case imperative without a period
    make: Callable[[random.Random], tuple[str, str]]

    @property
    def descriptions(self) -> list[str]:
        out = []
        for frame in FRAMES:
            for what in self.whats:
                text = frame.format(what=what)
                out.append(text[0].upper() + text[1:])
        return out


def _sentence(r: random.Random, n: int | None = None) -> str:
    return " ".join(r.choice(WORDS) for _ in range(n or r.randint(3, 6)))


def _items(r: random.Random, pool=WORDS, lo=3, hi=5) -> list[str]:
    return r.sample(pool, r.randint(lo, hi))


def _nums(r: random.Random, lo=3, hi=5, top=50) -> list[int]:
    return [r.randint(1, top) for _ in range(r.randint(lo, hi))]


def _sentiment(r):
    good = r.random() < 0.5
    word = r.choice(GOOD if good else BAD)
    return f"The {r.choice(THINGS)} was {word}.", "positive" if good else "negative"


def _category(r):
    kind = r.choice(["animal", "fruit", "color"])
    return r.choice({"animal": ANIMALS, "fruit": FRUITS, "color": COLORS}[kind]), kind


def _email(r):
    name = r.choice(NAMES).lower()
    addr = f"{name}@{r.choice(['mail', 'post', 'inbox'])}.{r.choice(['com', 'org', 'net'])}"
    return f"Please write to {addr} before {r.choice(DAYS)}.", addr


def _camel(ws):
    return ws[0] + "".join(w.capitalize() for w in ws[1:])


def _t(name, category, whats, make):
    return Task(name, category, tuple(whats), make)


def _tasks() -> list[Task]:
    s = _sentence
    return [
        # ---- text transformations
        _t(
            "uppercase",
            "transform",
            [
                "convert the text to upper case",
                "rewrite every letter in capitals",
                "write the sentence in all caps",
                "turn all letters into uppercase letters",
            ],
            lambda r: (x := s(r), x.upper()),
        ),
        _t(
            "title_case",
            "transform",
            [
                "capitalize the first letter of every word",
                "put the text in title case",
                "start each word with a capital letter",
                "make every word begin with an uppercase letter",
            ],
            lambda r: (x := s(r), x.title()),
        ),
        _t(
            "reverse_words",
            "transform",
            [
                "reverse the order of the words",
                "write the words backwards, last word first",
                "output the words in reverse order",
                "flip the word order of the sentence",
            ],
            lambda r: (x := s(r), " ".join(x.split()[::-1])),
        ),
        _t(
            "first_word",
            "transform",
            [
                "return only the first word",
                "output the word that comes first",
                "give the opening word of the text",
                "say just the first word of the sentence",
            ],
            lambda r: (x := s(r), x.split()[0]),
        ),
        _t(
            "last_word",
            "transform",
            [
                "return only the last word",
                "output the final word",
                "give the word at the end of the text",
                "say just the last word of the sentence",
            ],
            lambda r: (x := s(r), x.split()[-1]),
        ),
        _t(
            "sort_words",
            "transform",
            [
                "sort the words alphabetically",
                "put the words in alphabetical order",
                "arrange the words from A to Z",
                "list the words sorted in dictionary order",
            ],
            lambda r: (x := s(r), " ".join(sorted(x.split()))),
        ),
        _t(
            "snake_case",
            "transform",
            [
                "join the words with underscores",
                "convert the phrase to snake_case",
                "replace each space with an underscore",
                "write the words as one snake case identifier",
            ],
            lambda r: (x := s(r, r.randint(2, 4)), x.replace(" ", "_")),
        ),
        _t(
            "kebab_case",
            "transform",
            [
                "join the words with hyphens",
                "convert the phrase to kebab-case",
                "replace each space with a dash",
                "write the words as one hyphenated identifier",
            ],
            lambda r: (x := s(r, r.randint(2, 4)), x.replace(" ", "-")),
        ),
        _t(
            "camel_case",
            "transform",
            [
                "convert the phrase to camelCase",
                "join the words in camel case, capitalizing every word after the first",
                "write the words as one camelCase identifier",
                "merge the words into lower camel case",
            ],
            lambda r: (x := s(r, r.randint(2, 4)), _camel(x.split())),
        ),
        _t(
            "acronym",
            "transform",
            [
                "make an acronym from the first letters of the words",
                "output the capitalized initials of the words",
                "abbreviate the phrase to its initials",
                "write the uppercase first letter of each word, joined together",
            ],
            lambda r: (x := s(r), "".join(w[0].upper() for w in x.split())),
        ),
        _t(
            "repeat_twice",
            "transform",
            [
                "repeat the text twice, separated by a space",
                "say the input two times in a row",
                "echo the text two times",
                "write the input and then write it again",
            ],
            lambda r: (x := s(r, r.randint(1, 3)), f"{x} {x}"),
        ),
        _t(
            "drop_first_word",
            "transform",
            [
                "remove the first word",
                "output everything except the first word",
                "delete the opening word of the sentence",
                "drop the first word and keep the rest",
            ],
            lambda r: (x := s(r), " ".join(x.split()[1:])),
        ),
        # ---- formatting rules
        _t(
            "brackets",
            "format",
            [
                "wrap the text in square brackets",
                "put the input between [ and ]",
                "enclose the text in square brackets",
                "surround the input with square brackets",
            ],
            lambda r: (x := s(r), f"[{x}]"),
        ),
        _t(
            "quotes",
            "format",
            [
                "wrap the text in double quotes",
                "put the input inside quotation marks",
                "enclose the text in double quotation marks",
                "surround the input with double quotes",
            ],
            lambda r: (x := s(r), f'"{x}"'),
        ),
        _t(
            "json_value",
            "format",
            [
                'wrap the text as a JSON object with the key "text"',
                'output {"text": ...} holding the input',
                'return a JSON object whose "text" field is the input',
                'encode the input as JSON under the key "text"',
            ],
            lambda r: (x := s(r), '{"text": "' + x + '"}'),
        ),
        _t(
            "answer_prefix",
            "format",
            [
                'prefix the text with "Answer: "',
                'write "Answer: " followed by the input',
                'start the output with "Answer: " and then the text',
                'prepend the label "Answer: " to the input',
            ],
            lambda r: (x := s(r), f"Answer: {x}"),
        ),
        _t(
            "semicolons",
            "format",
            [
                "replace the commas in the list with semicolons",
                "rewrite the comma separated list with semicolons",
                "separate the items with semicolons instead of commas",
                "turn the commas into semicolons",
            ],
            lambda r: (x := _items(r), (", ".join(x), "; ".join(x)))[1],
        ),
        _t(
            "bullets",
            "format",
            [
                "turn the comma separated items into a bulleted list",
                "write each item on its own line starting with a dash",
                "format the list as bullet points",
                "output the items as a dash list, one per line",
            ],
            lambda r: (x := _items(r, lo=2, hi=4), (", ".join(x), "\n".join(f"- {w}" for w in x)))[
                1
            ],
        ),
        _t(
            "count_label",
            "format",
            [
                'report how many items the list has as "count: N"',
                'output "count: " and the number of items',
                'count the comma separated items and write "count: N"',
                'give the item count in the form "count: N"',
            ],
            lambda r: (x := _items(r, lo=2, hi=7), (", ".join(x), f"count: {len(x)}"))[1],
        ),
        # ---- classification with fixed label sets
        _t(
            "sentiment",
            "classify",
            [
                "classify the sentiment as positive or negative",
                "say whether the review is positive or negative",
                "decide if the opinion is positive or negative",
                "label the sentence positive or negative",
            ],
            _sentiment,
        ),
        _t(
            "even_odd",
            "classify",
            [
                "say whether the number is even or odd",
                "classify the number as even or odd",
                "answer even or odd for the given number",
                "tell if the integer is even or odd",
            ],
            lambda r: (str(n := r.randint(0, 999)), "even" if n % 2 == 0 else "odd"),
        ),
        _t(
            "word_category",
            "classify",
            [
                "classify the word as animal, fruit or color",
                "say whether the word names an animal, a fruit or a color",
                "label the word animal, fruit or color",
                "decide which category the word is in: animal, fruit or color",
            ],
            _category,
        ),
        _t(
            "question_or_statement",
            "classify",
            [
                "say whether the text is a question or a statement",
                "classify the sentence as question or statement",
                "label the input question or statement",
                "decide if the input asks something (question) or says something (statement)",
            ],
            lambda r: (
                q := r.random() < 0.5,
                x := s(r).capitalize(),
                (x + ("?" if q else "."), "question" if q else "statement"),
            )[2],
        ),
        _t(
            "weekend",
            "classify",
            [
                "say whether the day is a weekday or weekend",
                "classify the day of the week as weekday or weekend",
                "label the day weekday or weekend",
                "tell if the given day falls on the weekend or is a weekday",
            ],
            lambda r: (
                d := r.choice(DAYS),
                "weekend" if d in ("Saturday", "Sunday") else "weekday",
            ),
        ),
        _t(
            "hot_cold",
            "classify",
            [
                "say hot if the temperature is above 25 degrees, otherwise cold",
                "classify the temperature as hot (over 25) or cold",
                "label the reading hot or cold, with 25 as the limit",
                "answer hot for temperatures above 25 and cold otherwise",
            ],
            lambda r: (str(t := r.randint(-10, 45)) + " degrees", "hot" if t > 25 else "cold"),
        ),
        _t(
            "has_digit",
            "classify",
            [
                "answer yes if the text contains a digit, otherwise no",
                "say yes or no: does the input contain a number digit",
                "check for digits and reply yes or no",
                "tell with yes or no whether any digit appears",
            ],
            lambda r: (
                d := r.random() < 0.5,
                x := s(r).split(),
                (" ".join(x + [str(r.randint(0, 99))] if d else x), "yes" if d else "no"),
            )[2],
        ),
        _t(
            "longer_word",
            "classify",
            [
                "output the longer of the two words",
                "return whichever word has more letters",
                "give the longest word of the pair",
                "pick the word with the most characters",
            ],
            lambda r: (
                p := r.sample([w for w in WORDS if len(w) != 6], 2),
                (" ".join(p), max(p, key=len))
                if len(p[0]) != len(p[1])
                else (f"{p[0]} {p[1]}s", p[1] + "s"),
            )[1],
        ),
        # ---- extraction
        _t(
            "extract_number",
            "extract",
            [
                "extract the number from the sentence",
                "return the number that appears in the text",
                "find the number mentioned and output it",
                "pull out the numeric value in the input",
            ],
            lambda r: (
                n := r.randint(2, 999),
                f"There were {n} {r.choice(WORDS)}s at the {r.choice(WORDS)}.",
                str(n),
            )[1:],
        ),
        _t(
            "extract_email",
            "extract",
            [
                "extract the email address",
                "return the email address in the text",
                "find the email address and output it",
                "pull out the e-mail address from the input",
            ],
            _email,
        ),
        _t(
            "extract_name",
            "extract",
            [
                "extract the person's name",
                "return the name of the person mentioned",
                "find who is mentioned and output the name",
                "pull out the personal name from the sentence",
            ],
            lambda r: (
                n := r.choice(NAMES),
                f"Yesterday {n} bought a {r.choice(WORDS)} in {r.choice(CITIES)}.",
                n,
            )[1:],
        ),
        _t(
            "extract_city",
            "extract",
            [
                "extract the city",
                "return the name of the city mentioned",
                "find which city appears in the text and output it",
                "pull out the place name from the sentence",
            ],
            lambda r: (
                c := r.choice(CITIES),
                f"{r.choice(NAMES)} flew to {c} on {r.choice(DAYS)}.",
                c,
            )[1:],
        ),
        _t(
            "extract_year",
            "extract",
            [
                "extract the year",
                "return the year mentioned in the text",
                "find the year and output it",
                "pull out the four digit year",
            ],
            lambda r: (
                y := r.randint(1500, 2030),
                f"The {r.choice(WORDS)} was built in {y} near {r.choice(CITIES)}.",
                str(y),
            )[1:],
        ),
        _t(
            "extract_color",
            "extract",
            [
                "extract the color word",
                "return the color mentioned",
                "find which color appears and output it",
                "pull out the name of the colour",
            ],
            lambda r: (
                c := r.choice(COLORS),
                f"She painted the {r.choice(WORDS)} {c} last {r.choice(DAYS)}.",
                c,
            )[1:],
        ),
        _t(
            "extract_day",
            "extract",
            [
                "extract the day of the week",
                "return the weekday mentioned",
                "find which day is named and output it",
                "pull out the day name from the text",
            ],
            lambda r: (
                d := r.choice(DAYS),
                f"The {r.choice(THINGS)} is on {d} in {r.choice(CITIES)}.",
                d,
            )[1:],
        ),
        # ---- arithmetic on numbers in text
        _t(
            "add",
            "arithmetic",
            [
                "add the two numbers",
                "output the sum of the two numbers",
                "compute the total of both numbers",
                "give the result of adding the numbers",
            ],
            lambda r: (a := r.randint(1, 50), b := r.randint(1, 50), f"{a} and {b}", str(a + b))[
                2:
            ],
        ),
        _t(
            "subtract",
            "arithmetic",
            [
                "subtract the second number from the first",
                "output the first number minus the second",
                "compute the difference, first minus second",
                "give the result of taking the second number away from the first",
            ],
            lambda r: (a := r.randint(20, 99), b := r.randint(1, 19), f"{a} and {b}", str(a - b))[
                2:
            ],
        ),
        _t(
            "double",
            "arithmetic",
            [
                "double the number",
                "output twice the number",
                "multiply the number by two",
                "give the number times 2",
            ],
            lambda r: (n := r.randint(1, 60), str(n), str(2 * n))[1:],
        ),
        _t(
            "increment",
            "arithmetic",
            [
                "add one to the number",
                "output the next integer",
                "increase the number by 1",
                "give the number that follows",
            ],
            lambda r: (n := r.randint(0, 998), str(n), str(n + 1))[1:],
        ),
        _t(
            "max_number",
            "arithmetic",
            [
                "output the largest number in the list",
                "return the maximum of the numbers",
                "find the biggest number",
                "give the highest value in the list",
            ],
            lambda r: (x := _nums(r), ", ".join(map(str, x)), str(max(x)))[1:],
        ),
        _t(
            "min_number",
            "arithmetic",
            [
                "output the smallest number in the list",
                "return the minimum of the numbers",
                "find the smallest number",
                "give the lowest value in the list",
            ],
            lambda r: (x := _nums(r), ", ".join(map(str, x)), str(min(x)))[1:],
        ),
        _t(
            "count_words",
            "arithmetic",
            [
                "count the words",
                "output how many words the text has",
                "give the number of words in the sentence",
                "tell how many words there are",
            ],
            lambda r: (x := s(r, r.randint(1, 8)), str(len(x.split()))),
        ),
        _t(
            "sum_list",
            "arithmetic",
            [
                "add up all the numbers in the list",
                "output the sum of the list",
                "compute the total of the numbers",
                "give the sum of all the values",
            ],
            lambda r: (x := _nums(r, 2, 4, 20), ", ".join(map(str, x)), str(sum(x)))[1:],
        ),
        # ---- style constraints
        _t(
            "shout",
            "style",
            [
                "answer in capitals and end with an exclamation mark",
                "shout the text: all caps with a ! at the end",
                "repeat the input loudly in upper case with an exclamation mark",
                "write the sentence in uppercase followed by !",
            ],
            lambda r: (x := s(r), x.upper() + "!"),
        ),
        _t(
            "polite",
            "style",
            [
                'add "please" at the start of the request',
                'make the request polite by starting it with "Please"',
                'begin the text with "Please"',
                'prefix the instruction with "Please"',
            ],
            lambda r: (
                x
                := f"{r.choice(['open', 'close', 'bring', 'clean', 'move'])} the {r.choice(WORDS)}",
                f"Please {x}",
            ),
        ),
        _t(
            "always_ok",
            "style",
            [
                'reply with the single word "OK" whatever the input',
                'always answer "OK"',
                'respond only with "OK"',
                'output "OK" and nothing else',
            ],
            lambda r: (s(r), "OK"),
        ),
        _t(
            "end_period",
            "style",
            [
                "end the sentence with a period and capitalize its first letter",
                "fix the sentence: capital first letter and a final period",
                "make it a proper sentence with a capital and a full stop",
                "capitalize the start and add a period at the end",
            ],
            lambda r: (x := s(r), x.capitalize() + "."),
        ),
    ]


TASKS: list[Task] = _tasks()
HELD_OUT_TASKS = (
    "kebab_case",
    "quotes",
    "hot_cold",
    "extract_year",
    "increment",
    "min_number",
    "polite",
    "drop_first_word",
)


def get_task(name: str) -> Task:
    for t in TASKS:
        if t.name == name:
            return t
    raise KeyError(f"unknown task {name!r}; known: {[t.name for t in TASKS]}")


def train_tasks() -> list[Task]:
    return [t for t in TASKS if t.name not in HELD_OUT_TASKS]


def held_out_tasks() -> list[Task]:
    return [t for t in TASKS if t.name in HELD_OUT_TASKS]


def description_split(task: Task) -> tuple[list[str], list[str]]:
    """(train descriptions, held-out descriptions) of a training task."""
    d = task.descriptions
    return d[:-HELD_OUT_DESCRIPTIONS], d[-HELD_OUT_DESCRIPTIONS:]


def examples(task: Task, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (input, output) pairs, deterministic for (task, seed)."""
    r = random.Random(f"{task.name}-{seed}")
    return [task.make(r) for _ in range(n)]


def random_descriptions(n: int, seed: int = 0) -> list[str]:
    """The official robustness probe: random strings instead of descriptions."""
    r = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation
    return [
        "dogs;cats;bananas;",
        "7@9.qwepra#/.sd,s'2OC^039u#rdagjbL",
        "g" * 40,
    ][:n] + ["".join(r.choice(alphabet) for _ in range(32)) for _ in range(max(0, n - 3))]


def _lol_row(task: Task, i: int, split: str, x: str, y: str, definition: str = "") -> dict:
    # No examples (the empty "Positive Example" header only ends the definition for the
    # Lots-of-LoRAs parser): the prompt holds the definition (empty: instruction-free), the problem
    # and the official "Please complete the task without any explanation." suffix.
    text = (
        f"Definition: {definition}\n\nPositive Example\n\nNow complete the following example -\n"
        f"Input: {x}\nOutput:\n\n"
    )
    return {"id": f"{task.name}-{split}-{i}", "input": text, "output": [y]}


DEFINITIONS = ("none", "description")


def write_suite(
    out_dir: str | Path,
    n_train: int = 400,
    n_valid: int = 50,
    n_test: int = 100,
    seed: int = 0,
    definition: str = "none",
) -> Path:
    """Write the 46-task suite (what the shipped T2L was trained and evaluated on)."""
    s = {"train": [t.name for t in train_tasks()], "held_out": list(HELD_OUT_TASKS)}
    return write_tasks(
        out_dir, TASKS, s, HELD_OUT_DESCRIPTIONS, n_train, n_valid, n_test, seed, definition
    )


def read_splits(suite: str | Path) -> dict[str, list[str]]:
    """The suite's splits.yaml: {split name: task names}."""
    return yaml.safe_load((Path(suite) / "splits.yaml").read_text())


def write_tasks(
    out_dir: str | Path,
    tasks: list[Task],
    splits: dict[str, list[str]],
    eval_descriptions: int,
    n_train: int,
    n_valid: int,
    n_test: int,
    seed: int,
    definition: str = "none",
) -> Path:
    """Write every task as `<out_dir>/<task>/{metadata.yaml, train/valid/test.jsonl}`.

    metadata.yaml holds the training descriptions under `descriptions` and the evaluation ones
    under `eval_descriptions` (a held-out task's are all of them; a training task keeps its last
    `eval_descriptions` out of training); `<out_dir>/splits.yaml` is `splits` (task name lists;
    `held_out` marks the held-out tasks). `definition`: what every prompt's task definition is:
    "none" (instruction-free: the task is only in the T2L description) or "description" (the
    task's first description, in training and evaluation, as the official SNI prompts always hold
    the task's definition; a held-out task's first is its first evaluation description)."""
    if definition not in DEFINITIONS:
        raise InputError(f"definition {definition!r} is not one of {DEFINITIONS}")
    out = Path(out_dir)
    held = set(splits.get("held_out", []))
    for task in tasks:
        d = task.descriptions
        seen, unseen = d[:-eval_descriptions], d[-eval_descriptions:]
        if task.name in held:
            seen, unseen = [], d
        t = out / task.name
        t.mkdir(parents=True, exist_ok=True)
        meta = {
            "descriptions": seen or unseen,
            "eval_descriptions": unseen,
            "category": task.category,
            "user_prompt_template": "{task_def}\n\n{problem}",
            "response_field": "answer",
            "system_message": "",
            "assistant_prefill": "",
        }
        (t / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=True))
        pairs = examples(task, n_train + n_valid + n_test, seed=seed)
        task_def = d[0] if definition == "description" else ""
        cuts = {"train": (0, n_train), "valid": (n_train, n_train + n_valid)}
        cuts["test"] = (n_train + n_valid, len(pairs))
        for split, (lo, hi) in cuts.items():
            rows = [_lol_row(task, i, split, *pairs[i], task_def) for i in range(lo, hi)]
            (t / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "splits.yaml").write_text(yaml.safe_dump(splits))
    return out
