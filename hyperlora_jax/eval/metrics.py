"""Answer metrics: QA-F1 (LongBench normalisation), ROUGE-L F1, exact match, T2L answer parsers.

QA-F1 and ROUGE-L follow D2L's `eval_utils.py` / `metrics.py`; the choice, boolean and number
parsers follow T2L's `utils/eval_tasks.py` and fishfarm. `parity=True` reproduces the official
parsers bit for bit, quirks included (see each function); the default is a corrected parser.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

# --- D2L: LongBench-style normalisation and QA-F1 ---------------------------------------------

_HIDDEN_CHARS = re.compile(r"[\u00AD\u180E\u200B-\u200F\u202A-\u202E\u2060\u2066-\u2069\uFEFF]")
_TRAILING_WS = re.compile(r"[ \t\x0B\f]+$", re.MULTILINE)
_PUNCT_SPLIT = re.compile(f"[{string.punctuation}]")  # the official class, ranges included
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORD_SPLIT = re.compile(r"[- \s]")


def humanize(text: str) -> str:
    """Map typographic characters to ASCII (hidden chars, nbsp, dashes, curly quotes, ellipsis)."""
    text = _HIDDEN_CHARS.sub("", text)
    text = _TRAILING_WS.sub("", text)
    text = text.replace("\u00a0", " ")
    text = re.sub(r"[\u2014\u2013]+", "-", text)
    text = re.sub(r"[\u201c\u201d\u00ab\u00bb\u201e]", '"', text)
    text = re.sub(r"[\u2018\u2019\u02bc]", "'", text)
    return text.replace("\u2026", "...")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation -> space, drop articles, collapse whitespace (LongBench style)."""
    text = humanize(text).lower()
    text = " ".join(_PUNCT_SPLIT.split(text))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_words(text: str) -> list[str]:
    """Normalised words of an answer, split on spaces and hyphens."""
    return [w for w in _WORD_SPLIT.split(normalize_answer(text)) if w]


def _f1(pred: list[str], ref: list[str]) -> tuple[float, float, float]:
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    p, r = same / len(pred), same / len(ref)
    return 2 * p * r / (p + r), p, r


def qa_f1_prf(prediction: str, references: Sequence[str]) -> tuple[float, float, float]:
    """(F1, precision, recall) of the reference with the best F1 (first one on ties)."""
    if isinstance(references, str):
        references = [references]
    pred = answer_words(prediction)
    best = (0.0, 0.0, 0.0)
    for ref in references:
        score = _f1(pred, answer_words(ref))
        if score[0] > best[0]:
            best = score
    return best


def qa_f1(prediction: str, references: Sequence[str]) -> float:
    """Word-level F1 between a prediction and its best reference, order-free; in [0, 1]."""
    return qa_f1_prf(prediction, references)[0]


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference (SQuAD-style EM)."""
    if isinstance(references, str):
        references = [references]
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


# --- ROUGE-L F1 (rouge_score semantics: lowercase, [a-z0-9] tokens, Porter stem len > 3) ------

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@lru_cache(maxsize=1)
def _porter():
    from nltk.stem import porter  # the stemmer rouge_score uses

    return porter.PorterStemmer()


def rouge_tokens(text: str, use_stemmer: bool = True) -> list[str]:
    """Tokens exactly as rouge_score's default tokenizer makes them."""
    toks = _NON_ALNUM.sub(" ", text.lower()).split()
    if use_stemmer:
        stem = _porter().stem
        toks = [stem(t) if len(t) > 3 else t for t in toks]
    return [t for t in toks if t]


def _lcs_len(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(prediction: str, reference: str, use_stemmer: bool = True) -> float:
    """ROUGE-L F-measure (LCS based, beta = 1), as rouge_score's RougeScorer(['rougeL'])."""
    p, r = rouge_tokens(prediction, use_stemmer), rouge_tokens(reference, use_stemmer)
    lcs = _lcs_len(r, p)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


# --- T2L parsers ---------------------------------------------------------------------------------

_STRIP = ":`'\"(.) "
_CHOICES = tuple(string.ascii_lowercase) + tuple("0123456789") + ("10",)
_CHOICE_PREFIX = re.compile(
    r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice|ending)(?:\s+is)?\s*[:\-]?\s*", re.I
)
_CHOICE_TOKEN = re.compile(r"^(10|[0-9]|[a-z])(?![a-z0-9])")


def get_choice(text: str, parity: bool = False) -> str | None:
    """The choice label ('a'..'z', '0'..'10') an answer starts with, or None.

    parity=True is the official `get_choice`: strip ``:`'"(.) `` and take the first label the text
    *starts with*, so "Apple" -> "a", "Answer: B" -> "a" and "10" -> "1". The default instead
    skips an "Answer:"/"Option" prefix and needs the label to stand alone.
    """
    txt = str(text).strip().strip(_STRIP).lower()
    if parity:
        return next((c for c in _CHOICES if txt.startswith(c)), None)
    txt = _CHOICE_PREFIX.sub("", txt).strip().strip(_STRIP)
    m = _CHOICE_TOKEN.match(txt)
    return m.group(1) if m else None


def choice_accuracy(generated: str, target: str, parity: bool = False) -> int:
    """1 if generated and target name the same choice (official: both None also counts)."""
    g, t = get_choice(generated, parity), get_choice(target, parity)
    if not parity and g is None:
        return 0
    return int(g == t)


_BOOL_WORDS = (
    ("1", True),
    ("0", False),
    ("yes", True),
    ("no", False),
    ("true", True),
    ("false", False),
    ("positive", True),
    ("negative", False),
    ("valid", True),
    ("invalid", False),
)
_BOOL_RE = re.compile(r"\b(yes|no|true|false|positive|negative|valid|invalid|1|0)\b", re.I)


def get_bool(text: str, parity: bool = False) -> bool | None:
    """The yes/no value of an answer, or None.

    parity=True is the official `get_bool_value_from_text`: substring tests in a fixed order, so
    any "1" wins over everything, "know" reads as no and "invalid" reads as valid (True). The
    default takes the first whole word among yes/no/true/false/positive/negative/valid/invalid/1/0.
    """
    text = str(text)
    if parity:
        low = text.lower()
        return next((v for w, v in _BOOL_WORDS if w in low), None)
    m = _BOOL_RE.search(text)
    return None if m is None else dict(_BOOL_WORDS)[m.group(1).lower()]


def bool_accuracy(generated: str, target: str, parity: bool = False) -> int:
    """Official `get_binary_accuracy_flex`: equal in boolean space, 0 if either is unparsable."""
    g, t = get_bool(generated, parity), get_bool(target, parity)
    return int(g is not None and t is not None and g == t)


_NUM_PARITY = re.compile(r"\d*\.?\d+")
_NUM = re.compile(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?|-?\.\d+")


def last_number(text: str, parity: bool = False) -> float | None:
    """The last number in a text, or None.

    parity=True is fishfarm's `extract_answer_number` (regex ``\\d*\\.?\\d+``): signs are lost and
    commas split numbers, so "-3" -> 3.0 and "1,000" -> 0.0. The default keeps signs and
    thousands separators ("-1,234.5" -> -1234.5).
    """
    matches = (_NUM_PARITY if parity else _NUM).findall(str(text))
    if not matches:
        return None
    return float(matches[-1].replace(",", ""))


def gsm8k_target(answer: str, parity: bool = False) -> int | None:
    """The integer target of a GSM8K answer field ("... #### 72").

    parity=True parses the whole field with the official parser (so "#### 1,000" -> 0); the
    default reads the text after the last "####".
    """
    if not parity and "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    x = last_number(answer, parity)
    return None if x is None else int(x)


def number_accuracy(generated: str, target: int | float | None, parity: bool = False) -> int:
    """1 if the last number of the generation equals the target (float == int, as official)."""
    x = last_number(generated, parity)
    return int(x is not None and target is not None and x == target)


# --- length bins (D2L metrics.LENGTH_BINS) -----------------------------------------------------

LENGTH_BINS: tuple[tuple[int, float], ...] = (
    (0, 2**7 - 1),
    (2**7, 2**8 - 1),
    (2**8, 2**9 - 1),
    (0, 2**9 - 1),
    (2**9, 2**10 - 1),
    (2**10, 2**11 - 1),
    (2**11, 2**12 - 1),
    (2**12, 2**13 - 1),
    (0, 2**13 - 1),
    (2**13, 2**14 - 1),
    (2**14, 2**15 - 1),
    (2**15, float("inf")),
)


def bin_label(lo: float, hi: float) -> str:
    return f"{int(lo)}-{'inf' if hi == float('inf') else int(hi)}"


def per_length_bin(
    lengths: Sequence[int], scores: Sequence[float], bins=LENGTH_BINS
) -> dict[str, dict[str, float]]:
    """Mean score and count per (possibly overlapping) bin, lo <= length <= hi as the official
    generation eval does. Empty bins are omitted."""
    out = {}
    for lo, hi in bins:
        sel = [s for n, s in zip(lengths, scores) if lo <= n <= hi]
        if sel:
            out[bin_label(lo, hi)] = {"score": sum(sel) / len(sel), "count": len(sel)}
    return out
