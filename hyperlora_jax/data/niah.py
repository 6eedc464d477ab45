"""Needle-in-a-haystack (NIAH) data, faithful to the official `data/generate_ctx_magic_number.py`.

A haystack of repeated filler blocks joined by newlines hides one needle sentence "The special
magic number is NNNN." at a chosen depth; the query asks for the number and the answer is its 4
digits. Block counts are chosen so that the context's length under the *base model's* tokenizer
(`len(tokenizer(ctx).input_ids)`, special tokens included, as the official code measures it) falls
in a token bin [lo, hi). Differences from the official script, on purpose: every example's length
is checked (and its block count nudged) so no example leaves its bin; depth bins are spread evenly
over each whole split; train/val/test draw needles from disjoint number pools.

The draws (`draw_split`: number, block count, needle index, depth bin) take the context's length
as a function, so the same seeded draws serve this text path (the tokenizer on the built text)
and the token path (`niah_tokens`: the length composed from token pieces, proven equal).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from hyperlora_jax.data import storage
from hyperlora_jax.errors import ConfigError, InputError

log = logging.getLogger(__name__)

NOISE_BLOCK = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE_TEMPLATE = "The special magic number is {magic_number}."
SEP = "\n"
QUERY = "What is the special magic number? Reply with only the number."
NUM_DEPTH_BINS = 10
SPLITS = ("train", "val", "test")
# Fractions of the 10,000 four-digit numbers reserved for each split (disjoint pools).
NEEDLE_POOL_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def official_token_bins() -> list[tuple[int, int]]:
    """The official bins: 32-128 ... 1K-16K by 1K, 16K-32K by 4K, 32K-128K by 8K."""
    bins = [(32, 128), (128, 256), (256, 512), (512, 1024), (32, 1024)]
    bins += [(1024 * i, 1024 * (i + 1)) for i in range(1, 16)]
    bins += [(2**14 + 2**12 * i, 2**14 + 2**12 * (i + 1)) for i in range(4)]
    bins += [(2**15 + 2**13 * i, 2**15 + 2**13 * (i + 1)) for i in range(12)]
    return bins


def parse_bins(text: str) -> list[tuple[int, int]]:
    """'32-128,128-256' -> [(32, 128), (128, 256)]; 'official' -> official_token_bins()."""
    if text.strip() == "official":
        return official_token_bins()
    out = []
    for part in text.split(","):
        try:
            lo, hi = (int(x) for x in part.strip().split("-"))
        except ValueError as e:
            raise ConfigError(f"bad token bin {part!r}; write LO-HI, e.g. 32-128") from e
        if not 0 < lo < hi:
            raise ConfigError(f"bad token bin {part!r}; need 0 < LO < HI")
        out.append((lo, hi))
    return out


def build_context(num_blocks: int, insert_at: int, magic: str) -> str:
    """num_blocks blocks in total: num_blocks-1 filler blocks and the needle at index insert_at."""
    blocks = [NOISE_BLOCK] * (num_blocks - 1)
    blocks.insert(insert_at, NEEDLE_TEMPLATE.format(magic_number=magic))
    return SEP.join(blocks)


def choose_position(rng: random.Random, num_blocks: int, depth_bin: int) -> int:
    """Block index whose relative depth lies in [depth_bin/10, (depth_bin+1)/10) (official rule)."""
    start = math.floor(num_blocks * (depth_bin / NUM_DEPTH_BINS))
    end = math.ceil(num_blocks * ((depth_bin + 1) / NUM_DEPTH_BINS)) - 1
    start = max(0, min(start, num_blocks - 1))
    end = max(start, min(end, num_blocks - 1))
    return rng.randint(start, end)


def needle_pools(seed: int) -> dict[str, list[int]]:
    """Disjoint pools of 4-digit numbers per split, from a seeded permutation of 0..9999."""
    perm = list(range(10_000))
    random.Random(seed).shuffle(perm)
    n_train = int(NEEDLE_POOL_FRACTIONS["train"] * 10_000)
    n_val = int(NEEDLE_POOL_FRACTIONS["val"] * 10_000)
    return {
        "train": sorted(perm[:n_train]),
        "val": sorted(perm[n_train : n_train + n_val]),
        "test": sorted(perm[n_train + n_val :]),
    }


class LengthFn:
    """Token length of a context under a HF tokenizer, as the official code measures it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])


def _min_blocks_reaching(length: Callable[[int], int], target: int, k_max: int) -> int:
    """Smallest k in [1, k_max] with length(k) >= target (length is non-decreasing in k)."""
    lo, hi = 1, k_max
    while lo < hi:
        mid = (lo + hi) // 2
        if length(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def block_ranges(
    length_fn: Callable[[str], int], bins: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], tuple[int, int]]:
    """For each token bin, the block counts [k_lo, k_hi) whose reference context fits the bin.

    The reference context has the needle "0000" last, as in the official `measure_len`. Found by
    binary search on the (monotone) length instead of the official linear scan, which is
    quadratic at 128K tokens. Bins no block count can hit map to (0, 0).
    """
    return block_ranges_of(lambda k: length_fn(build_context(k, k - 1, "0000")), bins)


def block_ranges_of(
    reference_length: Callable[[int], int], bins: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], tuple[int, int]]:
    """`block_ranges` given the reference context's token length as a function of its block count
    (the text path measures it with the tokenizer, the token path composes it from pieces)."""
    cache: dict[int, int] = {}

    def length(k: int) -> int:
        if k not in cache:
            cache[k] = reference_length(k)
        return cache[k]

    max_hi = max(hi for _, hi in bins)
    k_max = 1
    while length(k_max) < max_hi:
        k_max *= 2
    out = {}
    for lo, hi in bins:
        k_lo = _min_blocks_reaching(length, lo, k_max)
        k_hi = _min_blocks_reaching(length, hi, k_max)
        out[(lo, hi)] = (k_lo, k_hi) if length(k_lo) >= lo and k_hi > k_lo else (0, 0)
    return out


@dataclass(frozen=True)
class NiahExample:
    context: str
    prompt: str
    response: str
    depth_bin: int
    insert_at: int
    num_blocks: int
    token_len: int

    def to_record(self) -> dict:
        return dict(self.__dict__)


class NiahSpec(NamedTuple):
    """A drawn example without its text (what both the text and the token path build from)."""

    magic: str
    num_blocks: int
    insert_at: int
    depth_bin: int
    token_len: int


def draw_example(
    rng: random.Random,
    num_blocks: int,
    depth_bin: int,
    pool: Sequence[int],
    length_of: Callable[[int, int, str], int] | None,
    token_bin: tuple[int, int] | None,
    k_range: tuple[int, int] | None = None,
) -> NiahSpec:
    """One example's draw; `length_of(num_blocks, insert_at, magic)` is the context's token length
    (text path: the tokenizer on the built text; token path: composed from token pieces). With a
    length and a bin, nudges the block count until the context fits the bin."""
    magic = f"{rng.choice(pool):04d}"
    k = num_blocks
    for _ in range(64):
        insert_at = choose_position(rng, k, depth_bin)
        n_tok = length_of(k, insert_at, magic) if length_of is not None else -1
        if token_bin is None or token_bin[0] <= n_tok < token_bin[1]:
            return NiahSpec(magic, k, insert_at, depth_bin, n_tok)
        k = k + 1 if n_tok < token_bin[0] else k - 1
        if k < 1 or (k_range and not (k_range[0] - 1 <= k <= k_range[1])):
            break
    raise InputError(
        f"could not fit a NIAH context into token bin {token_bin} (started at {num_blocks} blocks)"
    )


def text_length_of(length_fn: Callable[[str], int]) -> Callable[[int, int, str], int]:
    """`draw_example`'s length from a text length function (the official measurement)."""
    return lambda k, insert_at, magic: length_fn(build_context(k, insert_at, magic))


def spec_example(spec: NiahSpec) -> NiahExample:
    ctx = build_context(spec.num_blocks, spec.insert_at, spec.magic)
    return NiahExample(
        ctx, QUERY, spec.magic, spec.depth_bin, spec.insert_at, spec.num_blocks, spec.token_len
    )


def draw_split(
    n: int,
    k_values: Sequence[int],
    pool: Sequence[int],
    rng: random.Random,
    length_of: Callable[[int, int, str], int] | None = None,
    token_bin: tuple[int, int] | None = None,
) -> list[NiahSpec]:
    """n draws spread evenly over the block counts and, independently, over the depth bins, in
    a shuffled order (what `generate_split` writes, without the texts)."""
    if n <= 0:
        return []
    if not k_values:
        raise InputError("no block counts to generate from")
    base, rem = divmod(n, len(k_values))
    ks = [k for i, k in enumerate(k_values) for _ in range(base + (1 if i < rem else 0))]
    k_range = (min(k_values), max(k_values) + 1)
    out = [
        draw_example(rng, k, i % NUM_DEPTH_BINS, pool, length_of, token_bin, k_range)
        for i, k in enumerate(ks)
    ]
    rng.shuffle(out)
    return out


def generate_split(
    n: int,
    k_values: Sequence[int],
    pool: Sequence[int],
    rng: random.Random,
    length_fn: Callable[[str], int] | None = None,
    token_bin: tuple[int, int] | None = None,
) -> list[dict]:
    """n examples spread evenly over the block counts and, independently, over the depth bins."""
    length_of = text_length_of(length_fn) if length_fn is not None else None
    specs = draw_split(n, k_values, pool, rng, length_of, token_bin)
    return [spec_example(s).to_record() for s in specs]


@dataclass(frozen=True)
class SplitJob:
    """One (token bin, split) of a NIAH dataset: how many examples, from which block counts."""

    name: str  # folder name, e.g. ctx_magic_number_32_128
    token_bin: tuple[int, int]
    split: str
    count: int
    k_values: list[int]

    def rng(self, seed: int) -> random.Random:
        lo, hi = self.token_bin
        return random.Random(f"{seed}-{lo}-{hi}-{self.split}")


def split_jobs(
    ranges: dict[tuple[int, int], tuple[int, int]],
    bins: Sequence[tuple[int, int]],
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    train_max_hi: int,
    prefix: str,
) -> list[SplitJob]:
    """The (bin, split) jobs of `generate_niah`: training only for bins with hi <= train_max_hi
    (official policy); bins no block count can hit are skipped with a warning."""
    jobs = []
    for lo, hi in bins:
        k_lo, k_hi = ranges[(lo, hi)]
        if k_hi <= k_lo:
            log.warning("skipping token bin %s: no block count fits it", (lo, hi))
            continue
        k_values = list(range(max(1, k_lo), k_hi))
        counts = {"train": n_train if hi <= train_max_hi else 0, "val": n_val, "test": n_test}
        for split in SPLITS:
            if counts[split]:
                jobs.append(
                    SplitJob(f"{prefix}_{lo}_{hi}", (lo, hi), split, counts[split], k_values)
                )
    return jobs


def generate_niah(
    tokenizer,
    out_dir: str | Path,
    *,
    bins: Sequence[tuple[int, int]] = ((32, 128), (128, 256)),
    n_train: int = 320_000,
    n_val: int = 1000,
    n_test: int = 1000,
    train_max_hi: int = 1024,
    seed: int = 42,
    fmt: str = "jsonl",
    prefix: str = "ctx_magic_number",
) -> dict[str, dict[str, int]]:
    """Write `{out_dir}/{prefix}_{lo}_{hi}/{train,val,test}.{fmt}`; returns counts per bin/split.

    Training data is only written for bins with hi <= train_max_hi (official policy); `n_train`
    is per bin (the official 320,000). Deterministic for a seed.
    """
    if fmt not in ("jsonl", "parquet", "array_record"):
        raise ConfigError(f"unknown format {fmt!r}; use jsonl, parquet or array_record")
    length_fn = LengthFn(tokenizer)
    ranges = block_ranges(length_fn, bins)
    pools = needle_pools(seed)
    summary: dict[str, dict[str, int]] = {}
    for job in split_jobs(
        ranges,
        bins,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        train_max_hi=train_max_hi,
        prefix=prefix,
    ):
        recs = generate_split(
            job.count, job.k_values, pools[job.split], job.rng(seed), length_fn, job.token_bin
        )
        for r in recs:
            r["token_bin"] = list(job.token_bin)
        storage.write_records(Path(out_dir) / job.name / f"{job.split}.{fmt}", recs)
        summary.setdefault(job.name, {})[job.split] = len(recs)
        k_lo, k_hi = job.k_values[0], job.k_values[-1]
        log.info("NIAH %s %s: %d (block counts %d..%d)", job.name, job.split, len(recs), k_lo, k_hi)
    return summary
