"""T5Encoder: relative buckets vs transformers, masking, bf16, XXL sharding (abstract, 8
devices), TextEncoder and the embedding cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from transformers.models.t5.modeling_t5 import T5Attention

from lumiere_jax.parallel.sharding import MESH_AXES, named_shardings, unannotated_params
from lumiere_jax.text.encoder import (
    TextEncoder,
    build_text_encoder,
    cache_embeddings,
    load_cached_embeddings,
)
from lumiere_jax.text.t5 import (
    PRESETS,
    T5Config,
    T5Encoder,
    count_params,
    get_preset,
    relative_position_buckets,
)
from lumiere_jax.text.tokenizers import ByteTokenizer, SentencePieceTokenizer

# tests/conftest.py gives every test 8 forced host CPU devices.

PROMPTS = ["a red circle moving left", "a blue star", "", "a green square bouncing up"]


def fsdp_mesh() -> Mesh:
    """(data, fsdp, tensor) = (1, 8, 1) over the first 8 devices."""
    assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    return Mesh(np.array(jax.devices()[:8]).reshape(1, 8, 1), MESH_AXES)


def random_encoder(config: T5Config, seed: int = 0) -> T5Encoder:
    """An encoder with numpy-random weights: built abstractly, so no XLA compile of the random
    initialisers (slow on a shared CPU). `build_text_encoder` covers the real initialisation."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(x):  # roughly T5's scales: unit embeddings, 1/sqrt(fan_in) kernels, norms near 1
        if len(x.shape) == 1:
            return jnp.asarray(1 + 0.2 * rng.standard_normal(x.shape), x.dtype)
        fan_in = 1 if x.shape[0] == config.vocab_size else x.shape[0]
        return jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(fan_in), x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree.map(fill, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def tiny_model():
    return random_encoder(get_preset("tiny"))


@nnx.jit
def forward(model, ids, mask):
    return model(ids, mask)


@pytest.mark.parametrize("num_buckets, max_distance, length", [(32, 128, 300), (8, 20, 64)])
def test_relative_buckets_match_transformers(num_buckets, max_distance, length):
    ours = relative_position_buckets(length, length, num_buckets, max_distance)
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    theirs = T5Attention._relative_position_bucket(relative, bidirectional=True,
                                                   num_buckets=num_buckets,
                                                   max_distance=max_distance).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert ours.min() == 0 and ours.max() == num_buckets - 1


def test_forward_shape_and_padding_is_ignored(tiny_model):
    batch = ByteTokenizer().encode_batch(PROMPTS, max_length=32)
    ids, mask = jnp.asarray(batch.ids), jnp.asarray(batch.mask)
    out = forward(tiny_model, ids, mask)
    assert out.shape == (4, 32, 64) and out.dtype == jnp.float32
    assert bool(jnp.isfinite(out).all())
    # Whatever sits at masked positions must not change the valid outputs.
    noisy_ids = jnp.where(mask, ids, 77)
    noisy = forward(tiny_model, noisy_ids, mask)
    np.testing.assert_allclose(np.asarray(noisy)[batch.mask], np.asarray(out)[batch.mask],
                               atol=1e-5)
    # ...while a real token change does change them.
    changed = forward(tiny_model, ids.at[0, 2].set(200), mask)
    assert float(jnp.abs(changed[0, :10] - out[0, :10]).max()) > 1e-3


def test_each_row_is_independent_of_the_batch(tiny_model):
    batch = ByteTokenizer().encode_batch(PROMPTS, max_length=32)
    together = forward(tiny_model, jnp.asarray(batch.ids), jnp.asarray(batch.mask))
    alone = forward(tiny_model, jnp.asarray(batch.ids[1:2]), jnp.asarray(batch.mask[1:2]))
    np.testing.assert_allclose(together[1:2], alone, atol=1e-5)


def test_all_padding_row_stays_finite(tiny_model):
    ids = jnp.zeros((1, 8), jnp.int32)
    assert bool(jnp.isfinite(forward(tiny_model, ids, ids > 0)).all())


def test_bf16_compute_close_to_fp32(tiny_model):
    config = get_preset("tiny", dtype="bfloat16")
    bf16 = random_encoder(config, seed=1)
    nnx.update(bf16, nnx.state(tiny_model))  # same float32 parameters
    assert bf16.layers[0].mlp.wo[...].dtype == jnp.float32
    batch = ByteTokenizer().encode_batch(PROMPTS, max_length=32)
    ids, mask = jnp.asarray(batch.ids), jnp.asarray(batch.mask)
    out16 = forward(bf16, ids, mask)
    assert out16.dtype == jnp.bfloat16
    reference = np.asarray(forward(tiny_model, ids, mask))
    diff = np.abs(np.asarray(out16, np.float32) - reference)
    # bfloat16 keeps 8 bits of mantissa (relative step 2**-8 ~ 0.4%).
    assert np.linalg.norm(diff) / np.linalg.norm(reference) < 0.03
    assert diff.max() < 0.05 * np.abs(reference).max()


def test_config_validation_and_round_trip():
    config = get_preset("t5-v1_1-base", dtype="bfloat16")
    assert T5Config.from_dict(config.to_dict()) == config
    assert config.to_dict()["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        T5Config(384, 64, 16, 128, 2, num_heads=0)
    with pytest.raises(ValueError, match="Unknown T5 preset"):
        get_preset("t5-huge")
    with pytest.raises(ValueError, match="Unknown T5Config keys"):
        T5Config.from_dict({**config.to_dict(), "dropout_rate": 0.1})


def test_xxl_builds_abstractly_and_shards_over_8_fsdp_devices():
    config = PRESETS["t5-v1_1-xxl"]
    abstract = nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract)
    assert unannotated_params(state) == []
    values = nnx.to_pure_dict(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(values))
    mesh = fsdp_mesh()
    shardings = nnx.to_pure_dict(named_shardings(state, mesh))
    flat_values = jax.tree_util.tree_flatten_with_path(values)[0]
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    total = per_device = replicated = 0
    replicated_paths = []
    for (path, value), sharding in zip(flat_values, flat_shardings, strict=True):
        nbytes = math.prod(value.shape) * value.dtype.itemsize
        shard_bytes = math.prod(sharding.shard_shape(value.shape)) * value.dtype.itemsize
        total += nbytes
        per_device += shard_bytes
        if shard_bytes == nbytes:
            replicated += nbytes
            replicated_paths.append(jax.tree_util.keystr(path))
    assert total == count_params(config) * 4 == 4_762_310_656 * 4  # 4.76B float32 params
    # Only norm scales and the relative-bias table stay whole on every device...
    assert all("norm" in p or "relpos_bias" in p for p in replicated_paths)
    assert replicated < 1e-4 * total
    # ...and everything else is split 8 ways.
    assert per_device <= total / 8 + replicated


def test_tiny_encoder_runs_sharded_on_8_devices(tiny_model):
    mesh = fsdp_mesh()
    graphdef, state = nnx.split(tiny_model)
    sharded_state = jax.device_put(state, named_shardings(state, mesh))
    batch = ByteTokenizer().encode_batch(PROMPTS, max_length=32)
    run = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    out = run(sharded_state, jnp.asarray(batch.ids), jnp.asarray(batch.mask))
    expected = forward(tiny_model, jnp.asarray(batch.ids), jnp.asarray(batch.mask))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_text_encoder_zeroes_padding_and_gives_null_embedding(tiny_model):
    encoder = TextEncoder(ByteTokenizer(), tiny_model, max_length=32)
    emb, mask = encoder.encode(PROMPTS)
    assert emb.shape == (4, 32, 64) and emb.dtype == jnp.float32 and mask.dtype == jnp.bool_
    assert bool((emb[~mask] == 0).all()) and bool((jnp.abs(emb[mask]) > 0).any())
    null_emb, null_mask = encoder.null_embedding()
    assert int(null_mask.sum()) == 1  # EOS only
    np.testing.assert_allclose(null_emb[0], emb[2], atol=1e-6)  # PROMPTS[2] is ""
    with pytest.raises(ValueError, match="Prompt 0 is 33 tokens"):
        encoder.encode(["a" * 32])
    truncated, _ = encoder.encode(["a" * 32], truncate=True)
    assert truncated.shape == (1, 32, 64)


def test_text_encoder_rejects_a_tokenizer_larger_than_the_vocab(tiny_model, tmp_path):
    class BigVocab(ByteTokenizer):
        vocab_size = 32100

    with pytest.raises(ValueError, match="do not belong together"):
        TextEncoder(BigVocab(), tiny_model)


def test_embedding_cache_round_trip(tiny_model, tmp_path):
    encoder = TextEncoder(ByteTokenizer(), tiny_model, max_length=32)
    captions = PROMPTS + PROMPTS[:2]  # duplicates are stored once
    written = cache_embeddings(encoder, captions, str(tmp_path / "captions"), batch_size=3)
    cache = load_cached_embeddings(str(tmp_path / "captions.npz"))
    assert cache.prompts == PROMPTS and written.prompts == PROMPTS
    assert cache.embeddings.shape == (4, 32, 64) and cache.mask.shape == (4, 32)
    emb, mask = cache.lookup(["a blue star", "a red circle moving left", "a blue star"])
    direct, direct_mask = encoder.encode(["a blue star", "a red circle moving left",
                                          "a blue star"])
    np.testing.assert_allclose(emb, direct, atol=1e-6)
    np.testing.assert_array_equal(mask, direct_mask)
    np.testing.assert_allclose(cache.null_embedding, encoder.null_embedding()[0][0], atol=1e-6)
    with pytest.raises(KeyError, match="not in the embedding cache"):
        cache.lookup(["a purple hexagon"])
    with pytest.raises(FileNotFoundError, match="cache_embeddings"):
        load_cached_embeddings(str(tmp_path / "missing.npz"))


def test_build_text_encoder_defaults_and_missing_vocab(tmp_path):
    encoder = build_text_encoder(ByteTokenizer(), preset="tiny", max_length=16)
    emb, _ = encoder.encode(["hello"])
    assert emb.shape == (1, 16, 64)
    with pytest.raises(FileNotFoundError, match="not found"):
        SentencePieceTokenizer(str(tmp_path / "nope.model"))
