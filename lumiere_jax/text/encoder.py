"""`TextEncoder`: tokenizer + frozen T5 encoder + one jitted forward, and an embedding cache.

`encode(prompts, max_length)` returns float32 embeddings [b, L, d] and a bool mask [b, L];
embeddings at padding positions are zeroed so that they are identical for equal prompts
whatever else is in the batch. The null caption (the empty string, EOS only) is what
classifier-free guidance uses as the unconditional input.

`cache_embeddings` precomputes the embeddings of a caption set into one .npz file (unique
captions only), so training never runs T5; `load_cached_embeddings` reads it back and looks
captions up.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lumiere_jax.text.t5 import T5Config, T5Encoder
from lumiere_jax.text.tokenizers import Tokenizer

NULL_PROMPT = ""


def _encode_fn(graphdef: nnx.GraphDef):
    """A jitted (params, ids, mask) -> float32 embeddings with padding zeroed."""

    def encode(params: nnx.State, ids: jax.Array, mask: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        emb = model(ids, mask).astype(jnp.float32)
        return jnp.where(mask[..., None], emb, 0.0)

    return jax.jit(encode)


class TextEncoder:
    """Prompts -> (embeddings [b, L, d] float32, mask [b, L] bool) with a frozen T5 encoder."""

    def __init__(self, tokenizer: Tokenizer, model: T5Encoder, max_length: int = 64):
        config: T5Config = model.config
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"The tokenizer has {tokenizer.vocab_size} ids but the T5 encoder "
                             f"embeds only {config.vocab_size}: they do not belong together.")
        self.tokenizer = tokenizer
        self.model = model
        self.config = config
        self.max_length = max_length
        graphdef, self.params = nnx.split(model)
        self._encode = _encode_fn(graphdef)

    @property
    def embed_dim(self) -> int:
        return self.config.d_model

    def encode(self, prompts: list[str], max_length: int | None = None,
               truncate: bool = False) -> tuple[jax.Array, jax.Array]:
        """emb [b, L, d] float32 (zeros at padding), mask [b, L] bool; L = max_length."""
        batch = self.tokenizer.encode_batch(prompts, max_length or self.max_length, truncate)
        ids, mask = jnp.asarray(batch.ids), jnp.asarray(batch.mask)
        return self._encode(self.params, ids, mask), mask

    def null_embedding(self, max_length: int | None = None) -> tuple[jax.Array, jax.Array]:
        """The empty caption's embedding [1, L, d] and mask [1, L], for classifier-free guidance."""
        return self.encode([NULL_PROMPT], max_length)


@dataclasses.dataclass(frozen=True)
class CachedEmbeddings:
    """Embeddings of unique prompts: embeddings [n, L, d] float32, mask [n, L] bool."""

    prompts: list[str]
    embeddings: np.ndarray
    mask: np.ndarray
    null_embedding: np.ndarray  # [L, d]
    null_mask: np.ndarray       # [L]

    def __post_init__(self):
        object.__setattr__(self, "_index", {p: i for i, p in enumerate(self.prompts)})

    def lookup(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [b, L, d], mask [b, L]) for prompts that are in the cache."""
        missing = [p for p in prompts if p not in self._index]
        if missing:
            raise KeyError(f"{len(missing)} prompt(s) are not in the embedding cache, e.g. "
                           f"{missing[0]!r}; rebuild it with cache_embeddings over all captions.")
        rows = np.array([self._index[p] for p in prompts], np.int64)
        return self.embeddings[rows], self.mask[rows]


def cache_embeddings(encoder: TextEncoder, prompts: Sequence[str], path: str,
                     max_length: int | None = None, batch_size: int = 64,
                     truncate: bool = False) -> CachedEmbeddings:
    """Encodes the unique `prompts` (plus the null caption) and writes them to `path` (.npz)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    unique = list(dict.fromkeys(prompts))  # order-preserving de-duplication
    if not unique:
        raise ValueError("cache_embeddings got no prompts.")
    length = max_length or encoder.max_length
    embeddings, masks = [], []
    for start in range(0, len(unique), batch_size):
        emb, mask = encoder.encode(unique[start:start + batch_size], length, truncate)
        embeddings.append(np.asarray(emb))
        masks.append(np.asarray(mask))
    null_emb, null_mask = encoder.null_embedding(length)
    cache = CachedEmbeddings(prompts=unique, embeddings=np.concatenate(embeddings),
                             mask=np.concatenate(masks), null_embedding=np.asarray(null_emb[0]),
                             null_mask=np.asarray(null_mask[0]))
    if not path.endswith(".npz"):
        path += ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, prompts=np.array(cache.prompts, dtype=str), embeddings=cache.embeddings,
             mask=cache.mask, null_embedding=cache.null_embedding, null_mask=cache.null_mask)
    return cache


def load_cached_embeddings(path: str) -> CachedEmbeddings:
    """Reads a cache written by `cache_embeddings`."""
    if not os.path.exists(path) and os.path.exists(path + ".npz"):
        path += ".npz"
    if not os.path.exists(path):
        raise FileNotFoundError(f"Embedding cache {path!r} not found; write it with "
                                "cache_embeddings(encoder, captions, path).")
    with np.load(path, allow_pickle=False) as data:
        needed = {"prompts", "embeddings", "mask", "null_embedding", "null_mask"}
        if not needed <= set(data.files):
            raise ValueError(f"{path} is not an embedding cache: it lacks "
                             f"{sorted(needed - set(data.files))}.")
        return CachedEmbeddings(prompts=[str(p) for p in data["prompts"]],
                                embeddings=data["embeddings"], mask=data["mask"],
                                null_embedding=data["null_embedding"],
                                null_mask=data["null_mask"])


def build_text_encoder(tokenizer: Tokenizer, checkpoint: str | None = None,
                       preset: str = "tiny", seed: int = 0, dtype=None,
                       max_length: int = 64, mesh=None) -> TextEncoder:
    """A TextEncoder from a converted checkpoint directory, or (checkpoint=None) a randomly
    initialised frozen encoder of `preset`, as the built-in tiny configs use."""
    from lumiere_jax.text.checkpoints import load_encoder
    from lumiere_jax.text.t5 import get_preset

    if checkpoint is not None:
        _, model = load_encoder(checkpoint, dtype=dtype, mesh=mesh)
    else:
        config = get_preset(preset) if dtype is None else get_preset(preset, dtype=dtype)
        model = T5Encoder(config, rngs=nnx.Rngs(seed))
    return TextEncoder(tokenizer, model, max_length)
