"""Synthetic "fact documents" for fact-internalization training and held-out evaluation.

Each document states a handful of invented facts about one invented entity (a person's profile, a
company record, or a short story); every fact comes with templated questions in several
paraphrases and a short gold answer. The facts are random combinations, so a model cannot know
them without reading the document. Splits use disjoint entity names, so held-out documents never
share an entity with training ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

FIRST = """Ada Bram Cora Dion Elsa Finn Gala Hugo Iris Jory Kaia Lars Mira Nils Oona Pim Quin Rosa
Soren Tova Ugo Vera Wren Xavi Yara Zeno Alba Bodo Cleo Dara Eno Faye Gus Hedda Ivo Juna Kito Lio
Maren Nico Orla Pavo Rhea Sami Tilde Ulla Viggo Wilma Yusuf Zita""".split()
LAST = """Alder Birch Corran Dunmore Ellery Fenwick Garrow Halden Ingram Jessop Kestrel Lowry
Marlow Norcott Oakes Penhale Quarry Rowan Selwyn Thorne Upfield Varga Whitlock Yardley Zennor
Ashgrove Bellamy Crane Darrow Eastley""".split()
CITIES = """Ashford Brimley Caldor Dunmere Elsworth Farrow Glenhaven Harlow Ivybridge Kestle
Lowmoor Marsden Northam Oakridge Pellham Quenby Redcliff Stavely Tarrow Umber Vellin
Westmere""".split()
JOBS = """baker pilot carpenter librarian chemist gardener violinist architect nurse cartographer
beekeeper potter geologist translator blacksmith astronomer""".split()
PETS = "cat dog parrot tortoise rabbit goldfish ferret hamster lizard owl".split()
COLORS = "red blue green yellow purple orange teal silver amber crimson".split()
FOODS = "pancakes|lentil soup|dumplings|figs|paella|ramen|apple pie|olives|curry|porridge".split(
    "|"
)
PRODUCTS = """lanterns bicycles umbrellas telescopes kettles sailcloth clocks compasses pianos
skates""".split()
ANIMALS = "fox heron badger otter lynx crow hare stag".split()
OBJECTS = "brass key|silver coin|blue lantern|wooden flute|red scarf|old map|glass bead".split("|")


@dataclass(frozen=True)
class FactQA:
    """One fact: its paraphrased questions and the short gold answer."""

    questions: tuple[str, ...]
    answer: str


@dataclass
class FactDocument:
    kind: str
    text: str
    qas: list[FactQA] = field(default_factory=list)


def _names(split: str, seed: int) -> list[tuple[str, str]]:
    """Disjoint (first, last) pools per split: 80% train, 10% val, 10% test of all pairs."""
    pairs = [(f, s) for f in FIRST for s in LAST]
    random.Random(seed).shuffle(pairs)
    n = len(pairs)
    bounds = {
        "train": (0, int(0.8 * n)),
        "val": (int(0.8 * n), int(0.9 * n)),
        "test": (int(0.9 * n), n),
    }
    lo, hi = bounds[split]
    return pairs[lo:hi]


def _profile(rng: random.Random, first: str, last: str) -> FactDocument:
    name = f"{first} {last}"
    year, city, job = rng.randint(1901, 1999), rng.choice(CITIES), rng.choice(JOBS)
    pet, color, food = rng.choice(PETS), rng.choice(COLORS), rng.choice(FOODS)
    sentences = [
        f"{name} was born in {year} in the town of {city}.",
        f"{first} works as a {job}.",
        f"At home, {first} keeps a {pet}.",
        f"{first}'s favourite colour is {color}.",
        f"For breakfast, {first} always eats {food}.",
    ]
    rng.shuffle(sentences)
    qas = [
        FactQA(
            (
                f"In what year was {name} born?",
                f"When was {name} born?",
                f"What is {name}'s year of birth?",
            ),
            str(year),
        ),
        FactQA(
            (
                f"In which town was {name} born?",
                f"Where was {name} born?",
                f"What is the birthplace of {name}?",
            ),
            city,
        ),
        FactQA(
            (
                f"What is {name}'s job?",
                f"What does {name} do for a living?",
                f"What is the profession of {name}?",
            ),
            job,
        ),
        FactQA(
            (
                f"What pet does {name} keep?",
                f"Which animal does {name} have at home?",
                f"What kind of pet does {name} own?",
            ),
            pet,
        ),
        FactQA(
            (
                f"What is {name}'s favourite colour?",
                f"Which colour does {name} like best?",
                f"Name the favourite colour of {name}.",
            ),
            color,
        ),
        FactQA(
            (
                f"What does {name} eat for breakfast?",
                f"What is {name}'s usual breakfast?",
                f"Which food does {name} always have for breakfast?",
            ),
            food,
        ),
    ]
    return FactDocument("profile", " ".join(sentences), qas)


def _company(rng: random.Random, first: str, last: str) -> FactDocument:
    company = f"{last} {rng.choice(['Works', 'Company', 'Brothers', '& Daughters', 'Guild'])}"
    year, city, product = rng.randint(1820, 2010), rng.choice(CITIES), rng.choice(PRODUCTS)
    workers, ceo = rng.randint(12, 950), f"{first} {rng.choice(LAST)}"
    sentences = [
        f"{company} was founded in {year}.",
        f"The company is based in {city}.",
        f"{company} is best known for making {product}.",
        f"It employs {workers} people.",
        f"Its current director is {ceo}.",
    ]
    qas = [
        FactQA(
            (
                f"When was {company} founded?",
                f"In what year was {company} founded?",
                f"What is the founding year of {company}?",
            ),
            str(year),
        ),
        FactQA(
            (
                f"Where is {company} based?",
                f"In which town is {company} located?",
                f"Which town is home to {company}?",
            ),
            city,
        ),
        FactQA(
            (
                f"What does {company} make?",
                f"What product is {company} known for?",
                f"What is {company} best known for making?",
            ),
            product,
        ),
        FactQA(
            (
                f"How many people work at {company}?",
                f"How many employees does {company} have?",
                f"What is the number of employees of {company}?",
            ),
            str(workers),
        ),
        FactQA(
            (
                f"Who is the director of {company}?",
                f"Who runs {company}?",
                f"Name the current director of {company}.",
            ),
            ceo,
        ),
    ]
    return FactDocument("company", " ".join(sentences), qas)


def _story(rng: random.Random, first: str, last: str) -> FactDocument:
    animal, obj, city = rng.choice(ANIMALS), rng.choice(OBJECTS), rng.choice(CITIES)
    day = rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"])
    friend = rng.choice(FIRST)
    text = (
        f"On a cold {day}, {first} {last} walked from the market to the river near {city}. "
        f"By the water, {first} met a {animal} that was guarding a {obj}. "
        f"The {animal} let {first} take the {obj} only after {first} promised to bring it back. "
        f"That evening {first} showed the {obj} to a friend named {friend}."
    )
    qas = [
        FactQA(
            (
                f"On which day did {first} {last} walk to the river?",
                f"What day of the week was it when {first} {last} went to the river?",
            ),
            day,
        ),
        FactQA(
            (
                f"Which animal did {first} {last} meet by the river?",
                f"What animal was guarding something by the river near {city}?",
            ),
            animal,
        ),
        FactQA(
            ("What was the animal guarding?", f"What did {first} {last} take from the animal?"), obj
        ),
        FactQA(
            (
                f"Near which town is the river that {first} {last} visited?",
                f"Where did {first} {last} walk to the river?",
            ),
            city,
        ),
        FactQA(
            (
                f"To whom did {first} {last} show the {obj}?",
                f"What is the name of {first} {last}'s friend?",
            ),
            friend,
        ),
    ]
    return FactDocument("story", text, qas)


KINDS = {"profile": _profile, "company": _company, "story": _story}


def generate_fact_documents(
    n: int, split: str = "train", seed: int = 0, kinds: tuple[str, ...] = tuple(KINDS)
) -> list[FactDocument]:
    """n documents of the given kinds, deterministic for (split, seed); entity names per split."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, not {split!r}")
    names = _names(split, seed=1234)  # the name split is fixed; `seed` only varies the facts
    rng = random.Random(f"{split}-{seed}")
    docs = []
    for i in range(n):
        first, last = names[i % len(names)]
        docs.append(KINDS[kinds[i % len(kinds)]](rng, first, last))
    return docs


def training_records(
    docs: list[FactDocument], seed: int = 0, instruction: str = "{input}", per_doc: int = 3
) -> list[dict]:
    """Training rows {context, prompts, responses}: `per_doc` random facts per document, one
    random paraphrase each, wrapped in `instruction` (use the evaluation's QA wording so training
    and evaluation ask alike). Gold-answer CE trains on them directly (`train --data`);
    `data selfgen --text-field context --questions-field prompts` adds teacher log-probs."""
    rng = random.Random(f"questions-{seed}")
    out = []
    for d in docs:
        qas = rng.sample(d.qas, min(per_doc, len(d.qas)))
        out.append(
            {
                "context": d.text,
                "kind": d.kind,
                "prompts": [instruction.format(input=rng.choice(qa.questions)) for qa in qas],
                "responses": [qa.answer for qa in qas],
            }
        )
    return out


def qa_records(docs: list[FactDocument], seed: int = 0, per_doc: int = 2) -> list[dict]:
    """Evaluation rows in the `plain` QA format (context / question / answers)."""
    rng = random.Random(f"qa-{seed}")
    out = []
    for d in docs:
        for qa in rng.sample(d.qas, min(per_doc, len(d.qas))):
            q = rng.choice(qa.questions)
            out.append({"context": d.text, "question": q, "answers": [qa.answer], "kind": d.kind})
    return out
