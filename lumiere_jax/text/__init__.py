"""Text conditioning: the T5 v1.1 encoder, tokenizers, checkpoint import, embedding cache."""

from lumiere_jax.text.checkpoints import (
    CheckpointMismatchError,
    convert_checkpoint,
    load_encoder,
    load_pretrained,
    save_encoder,
)
from lumiere_jax.text.encoder import (
    NULL_PROMPT,
    CachedEmbeddings,
    TextEncoder,
    build_text_encoder,
    cache_embeddings,
    load_cached_embeddings,
)
from lumiere_jax.text.t5 import PRESETS, T5Config, T5Encoder, get_preset
from lumiere_jax.text.tokenizers import (
    ByteTokenizer,
    EncodedBatch,
    SentencePieceTokenizer,
    make_tokenizer,
)

__all__ = [
    "NULL_PROMPT", "PRESETS", "ByteTokenizer", "CachedEmbeddings", "CheckpointMismatchError",
    "EncodedBatch", "SentencePieceTokenizer", "T5Config", "T5Encoder", "TextEncoder",
    "build_text_encoder", "cache_embeddings", "convert_checkpoint", "get_preset",
    "load_cached_embeddings", "load_encoder", "load_pretrained", "make_tokenizer",
    "save_encoder",
]
