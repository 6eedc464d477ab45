"""Needle-in-a-haystack (NIAH) data, faithful to the official `data/generate_ctx_magic_number.py`.

A haystack of repeated filler blocks joined by newlines hides one needle sentence "The special
magic number is NNNN." at a chosen depth; the query asks for the number and the answer is its 4
digits. Block counts are chosen so that the context's length under the *base model's* tokenizer
(`len(tokenizer(ctx).input_ids)`, special tokens included, as the official code measures it) falls
in a token bin [lo, hi). Differences from the official script, on purpose: every example's length
is checked (and its block count nudged) so no example leaves its bin; depth bins are spread evenly
over each whole split; train/val/test draw needles from disjoint number pools.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    cache: dict[int, int] = {}

    def length(k: int) -> int:
        if k not in cache:
            cache[k] = length_fn(build_context(k, k - 1, "0000"))
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


def make_example(
    rng: random.Random,
    num_blocks: int,
    depth_bin: int,
    pool: Sequence[int],
    length_fn: Callable[[str], int] | None,
    token_bin: tuple[int, int] | None,
    k_range: tuple[int, int] | None = None,
) -> NiahExample:
    """One example; with a length function and bin, nudges the block count until it fits."""
    magic = f"{rng.choice(pool):04d}"
    k = num_blocks
    for _ in range(64):
        insert_at = choose_position(rng, k, depth_bin)
        ctx = build_context(k, insert_at, magic)
        n_tok = length_fn(ctx) if length_fn is not None else -1
        if token_bin is None or token_bin[0] <= n_tok < token_bin[1]:
            return NiahExample(ctx, QUERY, magic, depth_bin, insert_at, k, n_tok)
        k = k + 1 if n_tok < token_bin[0] else k - 1
        if k < 1 or (k_range and not (k_range[0] - 1 <= k <= k_range[1])):
            break
    raise InputError(
        f"could not fit a NIAH context into token bin {token_bin} (started at {num_blocks} blocks)"
    )


def generate_split(
    n: int,
    k_values: Sequence[int],
    pool: Sequence[int],
    rng: random.Random,
    length_fn: Callable[[str], int] | None = None,
    token_bin: tuple[int, int] | None = None,
) -> list[dict]:
    """n examples spread evenly over the block counts and, independently, over the depth bins."""
    if n <= 0:
        return []
    if not k_values:
        raise InputError("no block counts to generate from")
    base, rem = divmod(n, len(k_values))
    ks = [k for i, k in enumerate(k_values) for _ in range(base + (1 if i < rem else 0))]
    k_range = (min(k_values), max(k_values) + 1)
    out = []
    for i, k in enumerate(ks):
        ex = make_example(rng, k, i % NUM_DEPTH_BINS, pool, length_fn, token_bin, k_range)
        out.append(ex.to_record())
    rng.shuffle(out)
    return out


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
    for lo, hi in bins:
        k_lo, k_hi = ranges[(lo, hi)]
        if k_hi <= k_lo:
            log.warning("skipping token bin %s: no block count fits it", (lo, hi))
            continue
        k_values = list(range(max(1, k_lo), k_hi))
        counts = {"train": n_train if hi <= train_max_hi else 0, "val": n_val, "test": n_test}
        name = f"{prefix}_{lo}_{hi}"
        summary[name] = {}
        for split in SPLITS:
            if not counts[split]:
                continue
            rng = random.Random(f"{seed}-{lo}-{hi}-{split}")
            recs = generate_split(counts[split], k_values, pools[split], rng, length_fn, (lo, hi))
            for r in recs:
                r["token_bin"] = [lo, hi]
            storage.write_records(Path(out_dir) / name / f"{split}.{fmt}", recs)
            summary[name][split] = len(recs)
        log.info("NIAH %s: %s (block counts %d..%d)", name, summary[name], k_values[0], k_hi - 1)
    return summary
