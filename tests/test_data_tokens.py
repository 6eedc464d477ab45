"""Token-space D2L data: NIAH built from token pieces and fact documents tokenized in batches equal
the per-record tokenizer path exactly; token shards give the text path's packed rows; shards are
the same bytes for any number of workers; bad inputs fail with one clear error."""

import importlib.util
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from hyperlora_jax.cli import main
from hyperlora_jax.data import facts, feeds, niah, niah_tokens, packing, pipeline, selfgen, storage
from hyperlora_jax.data import token_shards as ts
from hyperlora_jax.data.prompts import QA_INSTRUCTION
from hyperlora_jax.errors import ConfigError, InputError
from hyperlora_jax.models import chat

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "official" / "d2l" / "tiny-gemma2"
BINS = [(32, 128), (128, 256)]


@pytest.fixture(scope="module")
def tiny():
    """A Gemma-template tokenizer (512 ids) under which NIAH also composes (per-number table)."""
    tok = AutoTokenizer.from_pretrained(TINY)
    return tok, niah_tokens.NiahPieces.from_tokenizer(tok, BINS)


@pytest.fixture(scope="module")
def smol():
    from hyperlora_jax.models.fetch import fetch_model
    from hyperlora_jax.models.tokenizer import load_tokenizer

    tok = load_tokenizer(fetch_model("smollm2-135m-instruct"))
    return tok, niah_tokens.NiahPieces.from_tokenizer(tok, BINS)


TOKENIZERS = ["tiny", pytest.param("smol", marks=pytest.mark.slow)]


def _random_draws(n: int, seed: int) -> list[tuple[int, int, str]]:
    """(blocks, needle index, number): random haystack sizes, depth bins and split pools."""
    rng = random.Random(seed)
    pools = niah.needle_pools(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 60)
        at = niah.choose_position(rng, k, rng.randrange(niah.NUM_DEPTH_BINS))
        out.append((k, at, f"{rng.choice(pools[rng.choice(niah.SPLITS)]):04d}"))
    return out


@pytest.mark.parametrize(
    "which,n", [("tiny", 600), pytest.param("smol", 2000, marks=pytest.mark.slow)]
)
def test_niah_pieces_equal_the_tokenizer_path(which, n, request):
    tok, pieces = request.getfixturevalue(which)
    length = niah.LengthFn(tok)
    for k, at, magic in _random_draws(n, seed=n):
        text = niah.build_context(k, at, magic)
        assert pieces.context_ids(k, at, magic).tolist() == selfgen.context_ids(tok, text)
        assert pieces.raw_length(k, at, magic) == length(text) == len(pieces.raw_ids(k, at, magic))
        ids, (start, end) = pieces.qa(magic)
        want_ids, want_labels = selfgen.qa_ids_and_labels(tok, niah.QUERY, magic)
        assert ids.tolist() == want_ids
        assert packing.labels_from_span(want_ids, start, end) == want_labels
    # block-count ranges of bins the pieces did not measure: composed == the tokenizer's
    more = [(256, 512), (1024, 2048)]
    assert pieces.ranges(more) == niah.block_ranges(length, more)


@pytest.mark.slow
def test_smollm2_pieces_are_a_small_per_digit_json(smol, tmp_path):
    tok, pieces = smol
    obj = pieces.to_json()
    assert obj["numbers"] == obj["answers"] == {"digits": [[32 + d] for d in range(10)]}
    path = pieces.save(tmp_path / "p.json")
    assert path.stat().st_size < 2000
    assert niah_tokens.NiahPieces.load(path) == pieces


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_token_niah_has_the_text_paths_examples_and_is_the_same_for_any_worker_count(
    tiny, tmp_path
):
    tok, pieces = tiny
    kw = dict(bins=BINS, n_train=90, n_val=12, n_test=12, seed=5)
    niah.generate_niah(tok, tmp_path / "text", **kw)
    niah_tokens.generate_niah_tokens(pieces, tmp_path / "w1", shard_size=40, **kw)
    loaded = niah_tokens.NiahPieces.load(tmp_path / "w1" / "niah_pieces.json")  # tokenizer-free
    assert loaded == pieces
    niah_tokens.generate_niah_tokens(loaded, tmp_path / "w2", shard_size=40, workers=2, **kw)
    for lo, hi in BINS:
        name = f"ctx_magic_number_{lo}_{hi}"
        for split in ("val", "test"):  # held-out splits stay text, the same records
            assert (tmp_path / "w1" / name / f"{split}.jsonl").read_text() == (
                tmp_path / "text" / name / f"{split}.jsonl"
            ).read_text()
        files = ts.find_shards(tmp_path / "w1" / name / "train")
        assert [f.name for f in files] == [ts.shard_name(i, 3) for i in range(3)]
        for f in files:  # the same bytes with 1 or 2 workers, from derived or loaded pieces
            assert f.read_bytes() == (tmp_path / "w2" / name / "train" / f.name).read_bytes()
        data = ts.TokenData(files)
        recs = _read_jsonl(tmp_path / "text" / name / "train.jsonl")
        assert len(data) == len(recs) == 90
        for i, rec in enumerate(recs):
            shard, r = data.locate(i)
            got = {c: int(v[r]) for c, v in shard.columns.items()}
            assert got == {
                "magic": int(rec["response"]),
                "num_blocks": rec["num_blocks"],
                "insert_at": rec["insert_at"],
                "depth_bin": rec["depth_bin"],
                "token_len": rec["token_len"],
            }
            assert lo <= got["token_len"] < hi
            assert shard.context(r).tolist() == selfgen.context_ids(tok, rec["context"])


def _fact_rows(n: int) -> list[dict]:
    return facts.training_records(facts.generate_fact_documents(n, "train", 1), 1, QA_INSTRUCTION)


@pytest.mark.parametrize("which", TOKENIZERS)
def test_fact_records_batched_equal_per_record(which, request):
    tok, _ = request.getfixturevalue(which)
    rows = _fact_rows(150)
    batched = pipeline.text_qa_tokens(rows, tok)
    assert len(batched) == len(rows)
    for rec, (ctx, qas) in zip(rows, batched):
        assert ctx == selfgen.context_ids(tok, rec["context"])
        assert qas == [
            selfgen.qa_ids_and_labels(tok, p, r) for p, r in zip(rec["prompts"], rec["responses"])
        ]
        assert len(qas) == 3
    texts = [r["context"] for r in rows[:20]]
    assert chat.encode_batch(tok, texts) == [chat._encode(tok, t) for t in texts]


def _d2l_config():
    spec = importlib.util.spec_from_file_location("_d2l_presets", ROOT / "configs" / "d2l.py")
    presets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(presets)
    return presets.smollm2_embedded()  # chunking on: the official num_chunk_probs


@pytest.mark.parametrize("which", TOKENIZERS)
def test_rows_from_token_shards_equal_rows_from_text(which, request, tmp_path):
    from hyperlora_jax.train import build

    tok, pieces = request.getfixturevalue(which)
    config = _d2l_config()
    assert config.train.num_chunk_probs and config.train.max_qas_per_sample == 1
    parts = build.experiment(config)
    kw = dict(bins=BINS, n_train=150, n_val=1, n_test=1, seed=2)
    niah.generate_niah(tok, tmp_path / "text", **kw)
    niah_tokens.generate_niah_tokens(pieces, tmp_path / "tok", shard_size=64, **kw)
    rows = _fact_rows(60)
    storage.write_records(tmp_path / "text_facts.jsonl", rows)
    ts.write_text_qa_shards(rows, tok, tmp_path / "tok_facts", meta={}, shard_size=25)
    bins = [f"ctx_magic_number_{lo}_{hi}" for lo, hi in BINS]
    text = [str(tmp_path / "text" / b / "train.jsonl") for b in bins]
    text.append(str(tmp_path / "text_facts.jsonl"))
    shards = [str(tmp_path / "tok" / b / "train") for b in bins] + [str(tmp_path / "tok_facts")]
    want = feeds.d2l_data(config, parts, text, 42, tok)
    got = feeds.d2l_data(config, parts, shards, 42, None)  # no tokenizer needed
    n_chunks = set()
    for a, b in itertools.islice(zip(want, got), 40):  # 160 rows: more than one epoch
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        n_chunks |= set(a["n_ctx_chunks"][a["n_ctx_chunks"] > 0].tolist())
    assert len(n_chunks) > 3  # contexts really were cut into different chunk counts
    # with the tokenizer given, its chat format is checked against the shards'
    next(feeds.d2l_data(config, parts, shards, 42, tok))


def test_rows_over_the_label_budget_are_refused(tiny, tmp_path):
    """train.max_label_len: the LM head runs at that many positions per row; a row with more
    label tokens stops the data with a clear error instead of losing them silently."""
    from hyperlora_jax.errors import InputError
    from hyperlora_jax.train import build

    _, pieces = tiny
    config = _d2l_config()
    niah_tokens.generate_niah_tokens(pieces, tmp_path, bins=BINS, n_train=40, n_val=1, n_test=1)
    shards = [str(tmp_path / f"ctx_magic_number_{lo}_{hi}" / "train") for lo, hi in BINS]
    config.train.max_label_len = 400
    next(feeds.d2l_data(config, build.experiment(config), shards, 0, None))
    config.train.max_label_len = 3  # fewer than a row of NIAH answers
    with pytest.raises(InputError, match="label tokens > train.max_label_len=3"):
        next(feeds.d2l_data(config, build.experiment(config), shards, 0, None))


def _synthetic_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n):
        ctx = [500 + c] + rng.integers(3, 90, int(rng.integers(5, 80))).tolist()
        ids, spans = [], []
        for _ in range(int(rng.integers(1, 4))):
            length = int(rng.integers(4, 40))  # some longer than max_qas_len: dropped
            ids.append(rng.integers(3, 90, length).tolist())
            spans.append([int(rng.integers(1, length - 1)), length])
        out.append({"ctx_ids": ctx, "input_ids": ids, "response_start_end": spans})
    return out


def _write_synthetic(recs: list[dict], folder: Path, shard_size: int) -> list[Path]:
    n = -(-len(recs) // shard_size)
    for s in range(n):
        b = ts.ShardBuilder(vocab_size=1000)
        for r in recs[s * shard_size : (s + 1) * shard_size]:
            b.add(r["ctx_ids"], list(zip(r["input_ids"], r["response_start_end"])))
        ts.write_shard(folder / ts.shard_name(s, n), b.arrays(), {"vocab_size": 1000})
    return ts.find_shards(folder)


def test_shard_items_are_the_text_paths_items_and_rows_in_every_process(tmp_path):
    recs = _synthetic_records(45)
    chunk = pipeline.ChunkConfig(
        max_chunk_len=24,
        min_chunk_len=8,
        num_chunk_probs=packing.OFFICIAL_NUM_CHUNK_PROBS,
        prefix=(7, 7),
        suffix=(8,),
    )
    limits = dict(max_qas_len=30, max_qas_per_sample=2)
    want = pipeline.build_items(
        recs, lambda r, rng: pipeline.selfgen_item(r, chunk, rng), seed=9, **limits
    )
    lazy = ts.ShardItems(
        ts.TokenData(_write_synthetic(recs, tmp_path, 16)), chunk, seed=9, **limits
    )
    assert len(lazy) == len(want) > len(recs)  # QAs were split into several items
    assert [lazy[j] for j in range(len(lazy))] == want
    np.testing.assert_array_equal(lazy.sizes, [packing.item_sizes(it) for it in want])
    assert lazy.longest_chunk == max(len(c) for it in want for c in it["ctx_chunks"])
    # only numpy arrays per item / record are kept, no Python object per sample
    assert not [k for k, v in vars(lazy).items() if isinstance(v, (list, dict)) and len(v) > 8]
    pack = packing.PackConfig(max_inp_len=64, max_ctx_len=160, max_contexts=4, max_chunks=12)
    for p in (0, 1):
        cfg = pipeline.LoaderConfig(
            batch_size=2, seed=3, drop_remainder=False, process_index=p, process_count=2
        )
        a = list(pipeline.make_packed_dataset(want, pack, cfg))
        b = list(pipeline.make_packed_dataset(lazy, pack, cfg))
        assert len(a) == len(b) > 2
        for x, y in zip(a, b):
            assert all((x[k] == y[k]).all() for k in x)
    # the grain iterator over lazy rows resumes from its checkpointed state
    cfg = pipeline.LoaderConfig(batch_size=2, seed=3, num_epochs=2)
    it = iter(pipeline.make_packed_dataset(lazy, pack, cfg))
    next(it), next(it)
    state = it.get_state()
    rest = [x["input_ids"] for x in it]
    resumed = iter(pipeline.make_packed_dataset(lazy, pack, cfg))
    resumed.set_state(state)
    again = [x["input_ids"] for x in resumed]
    assert len(rest) == len(again) > 0 and all((x == y).all() for x, y in zip(rest, again))


def test_bad_shards_and_data_paths(tmp_path):
    files = _write_synthetic(_synthetic_records(10), tmp_path / "ok", 4)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="junk.npz: not a readable token shard"):
        ts.read_shard(tmp_path / "junk.npz")
    np.savez(tmp_path / "plain.npz", a=np.arange(3))
    with pytest.raises(InputError, match="no token-shard metadata"):
        ts.read_shard(tmp_path / "plain.npz")
    with np.load(files[0]) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
    arrays["ctx_offsets"] = arrays["ctx_offsets"][::-1].copy()
    ts.write_shard(tmp_path / "bad" / "x.npz", arrays, {"vocab_size": 1000})
    with pytest.raises(InputError, match="x.npz: ctx_offsets .*corrupt"):
        ts.read_shard(tmp_path / "bad" / "x.npz")
    files[1].unlink()
    with pytest.raises(InputError, match=r"shard\(s\) \[1\] of 3 are missing"):
        ts.find_shards(tmp_path / "ok")
    (tmp_path / "recs.jsonl").write_text('{"context": "a", "prompt": "b", "response": "c"}\n')
    with pytest.raises(InputError, match="cannot be mixed"):
        ts.find_shards([tmp_path / "bad", tmp_path / "recs.jsonl"])
    assert ts.find_shards([tmp_path / "recs.jsonl"]) == []
    with pytest.raises(InputError, match="not one contiguous span"):
        ts.label_span([5, 6, 7], [5, -100, 7])
    with pytest.raises(InputError, match="outside the vocabulary"):
        b = ts.ShardBuilder(vocab_size=10)
        b.add([3, 12], [([1, 2], (0, 2))])
        b.arrays()


def test_training_refuses_mismatched_shards(tiny, tmp_path):
    from hyperlora_jax.train import build

    tok, _ = tiny
    files = _write_synthetic(_synthetic_records(6), tmp_path, 8)  # no chat affixes in the meta
    config = _d2l_config()
    parts = build.experiment(config)
    with pytest.raises(ConfigError, match="another chat format than --base_model"):
        feeds.d2l_data(config, parts, [str(tmp_path)], 0, tok)
    config.train.loss = "kl_top16"
    with pytest.raises(ConfigError, match="no teacher log-probs"):
        feeds.d2l_data(config, build.experiment(config), [str(files[0])], 0, None)


def _boundary_merging_tokenizer():
    """A byte-level BPE without word splitting: its merges cross the newline between blocks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [niah.build_context(5, i, f"{m:04d}") for i in range(5) for m in range(0, 10000, 97)]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return tok


def test_bad_pieces_are_refused(tiny, tmp_path):
    with pytest.raises(niah_tokens.CompositionError, match="does not tokenize as the concat"):
        niah_tokens.NiahPieces.from_tokenizer(_boundary_merging_tokenizer(), BINS)
    _, pieces = tiny
    good = pieces.to_json()
    cases = {
        "not a NIAH pieces file": {**good, "format": "other"},
        "other NIAH texts": {**good, "texts": {**good["texts"], "query": "What number?"}},
        "block ranges do not match": {**good, "block_ranges": [[32, 128, 1, 99]]},
        "malformed NIAH pieces": {k: v for k, v in good.items() if k != "filler"},
    }
    for message, obj in cases.items():
        path = tmp_path / "p.json"
        path.write_text(json.dumps(obj))
        with pytest.raises(ConfigError, match=message):
            niah_tokens.NiahPieces.load(path)
    with pytest.raises(ConfigError, match="cannot read NIAH pieces"):
        niah_tokens.NiahPieces.load(tmp_path / "missing.json")


def test_cli_token_formats(tmp_path, capsys):
    out = tmp_path / "niah"
    base = ["data", "niah", "--bins", "32-128", "--n-train", "30", "--n-val", "2", "--n-test", "2"]
    assert main([*base, "--tokenizer", str(TINY), "--format", "tokens", "--out", str(out)]) == 0
    pieces = out / "niah_pieces.json"
    again = tmp_path / "again"
    argv = [*base, "--pieces", str(pieces), "--format", "tokens", "--out", str(again)]
    assert main([*argv, "--workers", "2", "--shard-size", "7"]) == 0
    assert len(ts.find_shards(again)) == 5 and len(ts.TokenData(ts.find_shards(again))) == 30
    assert main(["data", "niah-pieces", "--tokenizer", str(TINY), "--out", str(tmp_path / "p.json"),
                 "--bins", "32-128"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(pieces.read_text())
    f = tmp_path / "facts"
    assert main(["data", "facts", "--out", str(f), "--n-train", "20", "--n-test", "4",
                 "--format", "tokens", "--tokenizer", str(TINY)]) == 0  # fmt: skip
    assert len(ts.TokenData(ts.find_shards(f / "train_docs"))) == 20 and (f / "test.jsonl").exists()
    capsys.readouterr()
    assert main(["data", "inspect", str(f)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info[str(f / "train_docs" / ts.shard_name(0, 1))]["records"] == 20
    bad = {
        "needs --tokenizer": [*base, "--out", str(tmp_path / "x")],
        "not both": [*base, "--tokenizer", str(TINY), "--pieces", str(pieces), "--out", "x"],
        "only with --format tokens": [*base, "--tokenizer", str(TINY), "--workers", "2",
                                          "--out", "x"],
        "cannot read NIAH pieces": [*base, "--pieces", "nope.json", "--format", "tokens",
                                    "--out", "x"],
        "--format tokens needs --tokenizer": ["data", "facts", "--out", "x", "--format", "tokens"],
    }  # fmt: skip
    for message, argv in bad.items():
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_help_names_the_token_format(capsys):
    for cmd in ("niah", "facts"):
        with pytest.raises(SystemExit):
            main(["data", cmd, "--help"])
        assert "--format tokens" in " ".join(capsys.readouterr().out.split())
