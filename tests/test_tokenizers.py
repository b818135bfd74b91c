"""Tokenizers: ByT5 byte ids, SentencePiece round trip, padding/EOS/mask, truncation, errors."""

import logging
import random

import numpy as np
import pytest

from lumiere_jax.text.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    make_tokenizer,
)


def test_byte_tokenizer_ids_eos_padding_and_mask():
    batch = ByteTokenizer().encode_batch(["ab", "", "é"], max_length=5)
    # 'a' = 97 -> 100, 'b' -> 101, then EOS 1, then padding 0; 'é' is two UTF-8 bytes.
    np.testing.assert_array_equal(batch.ids, [[100, 101, 1, 0, 0],
                                              [1, 0, 0, 0, 0],
                                              [0xC3 + 3, 0xA9 + 3, 1, 0, 0]])
    np.testing.assert_array_equal(batch.mask, batch.ids != 0)
    assert batch.ids.dtype == np.int32 and batch.mask.dtype == np.bool_
    assert batch.truncated == []


def test_byte_tokenizer_decodes_what_it_encodes():
    tokenizer = ByteTokenizer()
    prompts = ["a red circle moving right", "größer ✓", ""]
    batch = tokenizer.encode_batch(prompts, max_length=40)
    assert [tokenizer.decode(row) for row in batch.ids] == prompts


def test_exact_fit_is_not_truncated():
    batch = ByteTokenizer().encode_batch(["abc"], max_length=4)  # 3 bytes + EOS
    assert batch.truncated == [] and batch.mask.all()


def test_too_long_prompt_names_index_length_and_limit():
    with pytest.raises(ValueError) as err:
        ByteTokenizer().encode_batch(["ok", "a much longer prompt"], max_length=8)
    message = str(err.value)
    assert "Prompt 1" in message and "21 tokens" in message and "max_length=8" in message
    assert "truncate=True" in message


def test_truncate_keeps_eos_reports_indices_and_warns(caplog):
    with caplog.at_level(logging.WARNING):
        batch = ByteTokenizer().encode_batch(["ok", "abcdefghij", "xy"], max_length=5,
                                             truncate=True)
    assert batch.truncated == [1]
    np.testing.assert_array_equal(batch.ids[1], [100, 101, 102, 103, 1])
    assert any("Truncated 1 prompt" in r.getMessage() and "[1]" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("prompts, expected", [
    ([], "empty list"),
    (["fine", 3], "index 1 is a int"),
    ([None], "index 0 is a NoneType"),
    ("a single string", "single str"),
])
def test_bad_prompt_lists(prompts, expected):
    with pytest.raises(ValueError, match=expected):
        ByteTokenizer().encode_batch(prompts, max_length=16)


def test_bad_max_length():
    with pytest.raises(ValueError, match="max_length"):
        ByteTokenizer().encode_batch(["a"], max_length=0)


@pytest.fixture(scope="module")
def spiece_model(tmp_path_factory):
    """A tiny SentencePiece model trained on captions like the shapes dataset's."""
    import sentencepiece

    rng = random.Random(0)
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    shapes = ["circle", "square", "triangle", "star", "diamond", "hexagon"]
    motions = ["moving left", "moving right", "moving up", "moving down", "spinning",
               "bouncing", "growing", "shrinking", "standing still"]
    sizes = ["small", "large", "tiny", "big", "medium"]
    lines = [f"a {rng.choice(sizes)} {rng.choice(colors)} {rng.choice(shapes)} "
             f"{rng.choice(motions)} on a {rng.choice(colors)} background" for _ in range(80)]
    directory = tmp_path_factory.mktemp("spiece")
    corpus = directory / "captions.txt"
    corpus.write_text("\n".join(lines))
    prefix = str(directory / "spiece")
    # T5's id convention: pad 0, eos 1, unk 2, no bos.
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=prefix, vocab_size=100, pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    return prefix + ".model"


def test_sentencepiece_round_trip(spiece_model):
    tokenizer = SentencePieceTokenizer(spiece_model)
    assert 10 < tokenizer.vocab_size <= 100 and tokenizer.eos_id == 1
    prompts = ["a red circle moving left", "a tiny blue star spinning on a black background", ""]
    batch = tokenizer.encode_batch(prompts, max_length=48)
    lengths = batch.mask.sum(axis=1)
    for row, length, prompt in zip(batch.ids, lengths, prompts, strict=True):
        assert row[length - 1] == 1 and (row[length:] == 0).all()
        assert (row[:length - 1] >= 3).all()  # real pieces, no unk/pad inside
        assert tokenizer.decode(row) == prompt
    assert lengths[2] == 1  # the null caption is EOS only
    # Subword pieces: fewer tokens than bytes.
    assert lengths[0] < len(prompts[0])


def test_sentencepiece_too_long_and_truncate(spiece_model):
    tokenizer = SentencePieceTokenizer(spiece_model)
    prompt = "a tiny blue star spinning on a black background"
    full = len(tokenizer.tokenize(prompt)) + 1
    with pytest.raises(ValueError, match=f"Prompt 0 is {full} tokens"):
        tokenizer.encode_batch([prompt], max_length=full - 1)
    batch = tokenizer.encode_batch([prompt], max_length=full - 1, truncate=True)
    assert batch.truncated == [0] and batch.ids[0, -1] == 1


def test_missing_vocab_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        SentencePieceTokenizer(str(tmp_path / "spiece.model"))


def test_make_tokenizer(spiece_model):
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)
    assert isinstance(make_tokenizer("sentencepiece", spiece_model), SentencePieceTokenizer)
    with pytest.raises(ValueError, match="needs the path"):
        make_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="takes no vocabulary file"):
        make_tokenizer("byte", spiece_model)
    with pytest.raises(ValueError, match="Unknown tokenizer kind"):
        make_tokenizer("wordpiece")
