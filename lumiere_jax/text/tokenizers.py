"""Tokenizers for the T5 encoder: prompts -> padded ids [b, L] + mask [b, L].

Three implementations behind one interface (`encode_batch`):

- `ByteTokenizer`: ByT5's scheme, no vocabulary file. pad=0, eos=1, unk=2, byte b -> b + 3.
  Used by the built-in tiny configs (vocab 384 = 3 + 256 bytes, padded).
- `SentencePieceTokenizer`: a T5 `spiece.model` the user provides (pad 0, EOS appended).
- `WordTokenizer`: a closed word vocabulary (the built-in world's), unknown words rejected.

Every sequence ends with EOS, as T5 was trained. The empty string is a valid prompt (EOS only):
it is the null caption of classifier-free guidance. Prompts longer than `max_length` are an
error unless `truncate=True`, which keeps the first tokens, puts EOS last, logs a warning and
reports which prompts were cut.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from etils import epath

from lumiere_jax.data.remote import is_remote

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    """ids: [b, L] int32 (PAD_ID after the end); mask: [b, L] bool; truncated: prompt indices."""

    ids: np.ndarray
    mask: np.ndarray
    truncated: list[int]


def _check_prompts(prompts, max_length: int) -> None:
    if isinstance(prompts, (str, bytes)):
        raise ValueError("encode_batch expects a list of prompts, got a single "
                         f"{type(prompts).__name__}: wrap it in a list, e.g. [{prompts!r}].")
    if not isinstance(prompts, Sequence):
        raise ValueError(f"encode_batch expects a list of strings, got {type(prompts).__name__}.")
    if len(prompts) == 0:
        raise ValueError("encode_batch got an empty list of prompts; pass at least one prompt "
                         "(use \"\" for the null caption).")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"Prompt at index {index} is a {type(prompt).__name__} "
                             f"({prompt!r}), not a str; every prompt must be a string.")
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}.")


class Tokenizer:
    """Shared batching, padding and length checks; subclasses turn one prompt into ids."""

    eos_id: int = 1
    vocab_size: int

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of one prompt, without EOS."""
        raise NotImplementedError

    def encode_batch(self, prompts: list[str], max_length: int,
                     truncate: bool = False) -> EncodedBatch:
        """Tokenizes, appends EOS, pads to `max_length`. Raises on too-long prompts unless
        `truncate`, in which case those prompts keep their first max_length - 1 tokens + EOS."""
        _check_prompts(prompts, max_length)
        ids = np.full((len(prompts), max_length), PAD_ID, np.int32)
        mask = np.zeros((len(prompts), max_length), np.bool_)
        truncated = []
        for index, prompt in enumerate(prompts):
            tokens = [*self.tokenize(prompt), self.eos_id]
            if len(tokens) > max_length:
                if not truncate:
                    raise ValueError(
                        f"Prompt {index} is {len(tokens)} tokens long (with EOS), more than "
                        f"max_length={max_length}: {_preview(prompt)}. Shorten it, raise "
                        "max_length, or pass truncate=True to cut it.")
                tokens = [*tokens[:max_length - 1], self.eos_id]
                truncated.append(index)
            ids[index, :len(tokens)] = tokens
            mask[index, :len(tokens)] = True
        if truncated:
            logging.warning("Truncated %d prompt(s) to max_length=%d tokens: indices %s.",
                            len(truncated), max_length, truncated)
        return EncodedBatch(ids=ids, mask=mask, truncated=truncated)

    def decode(self, ids) -> str:
        """Text of one id sequence; stops at EOS, skips padding."""
        raise NotImplementedError


def _preview(prompt: str, limit: int = 60) -> str:
    return repr(prompt if len(prompt) <= limit else prompt[:limit] + "...")


class ByteTokenizer(Tokenizer):
    """ByT5 byte-level ids: pad 0, eos 1, unk 2, UTF-8 byte b -> b + 3. No file needed."""

    num_special = 3
    unk_id = 2
    vocab_size = 3 + 256

    def tokenize(self, prompt: str) -> list[int]:
        return [b + self.num_special for b in prompt.encode("utf-8")]

    def decode(self, ids) -> str:
        out = bytearray()
        for token in np.asarray(ids).tolist():
            if token == self.eos_id:
                break
            if token >= self.num_special:
                out.append(token - self.num_special)
        return out.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (e.g. T5's `spiece.model`), EOS appended, padding id 0."""

    def __init__(self, path: str):
        import sentencepiece

        remote = is_remote(path)  # gs://: read through epath; SentencePiece opens local files only
        if not (epath.Path(path).is_file() if remote else os.path.isfile(path)):
            raise FileNotFoundError(
                f"SentencePiece model {path!r} not found. Pass the path of the tokenizer file "
                "that came with the T5 checkpoint (usually `spiece.model`), or use the byte "
                "tokenizer (kind='byte'), which needs no file.")
        self.path = path
        self.processor = (
            sentencepiece.SentencePieceProcessor(model_proto=epath.Path(path).read_bytes())
            if remote else sentencepiece.SentencePieceProcessor(model_file=path))
        self.eos_id = self.processor.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"SentencePiece model {path!r} has no end-of-sequence piece; T5 "
                             "needs one (train with eos_id >= 0, e.g. eos_id=1).")
        self.vocab_size = self.processor.get_piece_size()

    def tokenize(self, prompt: str) -> list[int]:
        return list(self.processor.encode(prompt))

    def decode(self, ids) -> str:
        ids = np.asarray(ids).tolist()
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.processor.decode([i for i in ids if i != PAD_ID])


class WordTokenizer(Tokenizer):
    """A closed word vocabulary: pad 0, eos 1, unk 2, word i -> i + 3. Unknown words are errors.

    For the built-in world (`make_tokenizer('shapes')`): every caption word is one token, so a
    tiny T5 trained from scratch sees 'red' as one symbol rather than three bytes whose
    meaning depends on their position; and a typo fails loudly with a suggestion instead of
    being encoded into something the model never saw.
    """

    num_special = 3

    def __init__(self, words: Sequence[str]):
        self.words = tuple(words)
        self.index = {w: i + self.num_special for i, w in enumerate(self.words)}
        self.vocab_size = self.num_special + len(self.words)

    def tokenize(self, prompt: str) -> list[int]:
        ids = []
        for word in prompt.lower().replace(",", " ").split():
            if word not in self.index:
                import difflib
                close = difflib.get_close_matches(word, self.words, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown word {word!r} in prompt {_preview(prompt)}{hint} "
                                 f"Known words: {', '.join(self.words)}")
            ids.append(self.index[word])
        return ids

    def decode(self, ids) -> str:
        out = []
        for token in np.asarray(ids).tolist():
            if token == self.eos_id:
                break
            if token >= self.num_special:
                out.append(self.words[token - self.num_special])
        return " ".join(out)


TOKENIZER_KINDS = ("byte", "sentencepiece", "shapes")


def make_tokenizer(kind: str, path: str | None = None) -> Tokenizer:
    """'byte' (no path), 'sentencepiece' (path to the .model file), or 'shapes' (the built-in
    world's caption vocabulary, no path)."""
    if kind == "shapes":
        from lumiere_jax.data.synthetic import VOCABULARY
        return WordTokenizer(VOCABULARY)
    if kind == "byte":
        if path:
            raise ValueError(f"The byte tokenizer takes no vocabulary file, got path={path!r}; "
                             "use kind='sentencepiece' for a SentencePiece model.")
        return ByteTokenizer()
    if kind == "sentencepiece":
        if not path:
            raise ValueError("kind='sentencepiece' needs the path of a SentencePiece model "
                             "(e.g. T5's spiece.model).")
        return SentencePieceTokenizer(path)
    raise ValueError(f"Unknown tokenizer kind {kind!r}; choose one of {TOKENIZER_KINDS}.")
