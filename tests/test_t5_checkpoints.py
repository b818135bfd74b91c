"""T5 checkpoint import: parity with transformers' PyTorch T5EncoderModel, t5x layouts,
shape-mismatch errors, and the project's own Orbax format (also restored onto 8 devices)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, serialization
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from transformers import T5Config as HFConfig
from transformers import T5EncoderModel, T5ForConditionalGeneration

from lumiere_jax.parallel.sharding import named_shardings
from lumiere_jax.text import checkpoints
from lumiere_jax.text.checkpoints import (
    CheckpointMismatchError,
    convert_checkpoint,
    load_encoder,
    load_pretrained,
)
from lumiere_jax.text.t5 import T5Config
from lumiere_jax.text.tokenizers import ByteTokenizer

# tests/conftest.py gives every test 8 forced host CPU devices.

# Small but non-default: few buckets and a short max distance, so that the logarithmic buckets
# and the "beyond max_distance" bucket both occur at length 32.
HF_SIZES = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20)
PROMPTS = ["a red circle moving up on blue", "", "a star", "xyz 123"]
MAX_LENGTH = 32


def fsdp_mesh() -> Mesh:
    """(data, fsdp, tensor) = (1, 8, 1) over the first 8 devices."""
    assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    return Mesh(np.array(jax.devices()[:8]).reshape(1, 8, 1), ("data", "fsdp", "tensor"))


def hf_config(**changes) -> HFConfig:
    values = {**HF_SIZES, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False,
              **changes}
    return HFConfig(**values)


def randomize_norms(model: torch.nn.Module) -> None:
    # HF initialises norm weights to 1; random ones catch a norm mapped to the wrong place.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.add_(0.3 * torch.randn_like(param))


@pytest.fixture(scope="module")
def batch():
    return ByteTokenizer().encode_batch(PROMPTS, MAX_LENGTH)


@pytest.fixture(scope="module")
def hf_encoder(tmp_path_factory, batch):
    """(directory, torch model, reference output [b, L, d]) for a random T5EncoderModel."""
    torch.manual_seed(0)
    model = T5EncoderModel(hf_config()).eval()
    randomize_norms(model)
    directory = tmp_path_factory.mktemp("hf_encoder")
    model.save_pretrained(directory, safe_serialization=True)
    with torch.no_grad():
        reference = model(input_ids=torch.tensor(batch.ids, dtype=torch.long),
                          attention_mask=torch.tensor(batch.mask.astype(np.int64)))
    return str(directory), model, reference.last_hidden_state.numpy()


def run(encoder, batch) -> np.ndarray:
    return np.asarray(encoder(jnp.asarray(batch.ids), jnp.asarray(batch.mask)))


def test_parity_with_transformers_t5_encoder(hf_encoder, batch):
    directory, _, reference = hf_encoder
    config, encoder = load_pretrained(directory)
    assert config == T5Config(**HF_SIZES)  # read from config.json
    out = run(encoder, batch)
    assert out.shape == (len(PROMPTS), MAX_LENGTH, HF_SIZES["d_model"])
    # Every position matches, padding included: both mask keys only.
    assert np.abs(out - reference).max() <= 1e-4
    assert np.abs(reference).max() > 0.5  # the comparison is not between near-zero outputs


def test_config_inferred_from_shapes_without_config_json(tmp_path, hf_encoder, batch):
    directory, _, reference = hf_encoder
    lone_file = tmp_path / "encoder.safetensors"
    shutil.copy(os.path.join(directory, "model.safetensors"), lone_file)
    config, params, layout = checkpoints.read_pretrained_params(str(lone_file))
    # max_distance is not stored in any tensor: without config.json it is the default (128).
    assert layout == "hf"
    assert config == T5Config(**{**HF_SIZES, "relative_attention_max_distance": 128})
    fixed = checkpoints.build_encoder(config.replace(relative_attention_max_distance=20), params)
    assert np.abs(run(fixed, batch) - reference).max() <= 1e-4


def test_t5_for_conditional_generation_loads_without_decoder(tmp_path, batch):
    torch.manual_seed(1)
    full = T5ForConditionalGeneration(hf_config(is_encoder_decoder=True, num_decoder_layers=1))
    full.eval()
    randomize_norms(full)
    full.save_pretrained(tmp_path, safe_serialization=True)
    with torch.no_grad():
        reference = full.get_encoder()(
            input_ids=torch.tensor(batch.ids, dtype=torch.long),
            attention_mask=torch.tensor(batch.mask.astype(np.int64))).last_hidden_state.numpy()
    _, encoder = load_pretrained(str(tmp_path))
    assert np.abs(run(encoder, batch) - reference).max() <= 1e-4


def test_sharded_safetensors(tmp_path, hf_encoder, batch):
    _, model, reference = hf_encoder
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 1
    _, encoder = load_pretrained(str(tmp_path))
    assert np.abs(run(encoder, batch) - reference).max() <= 1e-4


def hf_to_t5x_tree(model: T5EncoderModel) -> dict:
    """The same weights under t5x's names and shapes, written out independently of the
    project's name map: kernels (in, out) with heads*kv joined, bias table [heads, buckets]."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    encoder = {"relpos_bias": {"rel_embedding": sd[
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].T},
        "encoder_norm": {"scale": sd["encoder.final_layer_norm.weight"]}}
    for i in range(HF_SIZES["num_layers"]):
        b = f"encoder.block.{i}.layer"
        encoder[f"layers_{i}"] = {
            "pre_attention_layer_norm": {"scale": sd[f"{b}.0.layer_norm.weight"]},
            "attention": {name: {"kernel": sd[f"{b}.0.SelfAttention.{short}.weight"].T}
                          for name, short in [("query", "q"), ("key", "k"), ("value", "v"),
                                              ("out", "o")]},
            "pre_mlp_layer_norm": {"scale": sd[f"{b}.1.layer_norm.weight"]},
            "mlp": {name: {"kernel": sd[f"{b}.1.DenseReluDense.{name}.weight"].T}
                    for name in ("wi_0", "wi_1", "wo")},
        }
    # A decoder, which the importer must ignore.
    decoder = {"decoder_norm": {"scale": np.ones(HF_SIZES["d_model"], np.float32)}}
    return {"token_embedder": {"embedding": sd["shared.weight"]}, "encoder": encoder,
            "decoder": decoder}


def test_t5x_orbax_checkpoint_matches_hf_import(tmp_path, hf_encoder, batch):
    import orbax.checkpoint as ocp

    directory, model, reference = hf_encoder
    ckpt = tmp_path / "checkpoint_1000"
    ocp.PyTreeCheckpointer().save(ckpt, {"target": hf_to_t5x_tree(model),
                                         "state": {"step": np.int32(1000)}})
    assert checkpoints.detect_layout(str(ckpt)) == "t5x"
    # The parent directory of checkpoint_N steps works too (latest step).
    config, encoder = load_pretrained(str(tmp_path), layout="t5x")
    assert config == T5Config(**{**HF_SIZES, "relative_attention_max_distance": 128})
    _, hf_model = load_pretrained(directory)
    t5x_model = checkpoints.build_encoder(config.replace(relative_attention_max_distance=20),
                                          checkpoints.read_t5x_params(str(ckpt), config)[1])
    np.testing.assert_array_equal(run(t5x_model, batch), run(hf_model, batch))
    assert np.abs(run(t5x_model, batch) - reference).max() <= 1e-4


def write_t5x_tensorstore_checkpoint(ckpt_dir, target: dict) -> None:
    """The classic t5x layout: a msgpack `checkpoint` whose large arrays are references to zarr
    arrays named like `target.encoder.layers_0.attention.query.kernel`; small arrays inline."""
    import tensorstore as ts

    os.makedirs(ckpt_dir)

    def convert(tree, prefix):
        out = {}
        for name, value in tree.items():
            key = f"{prefix}.{name}"
            if isinstance(value, dict):
                out[name] = convert(value, key)
            elif value.ndim == 1:
                out[name] = value  # t5x keeps unpartitioned small arrays in the msgpack
            else:
                spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": key},
                        "metadata": {"shape": list(value.shape), "chunks": list(value.shape),
                                     "dtype": "<f4", "compressor": {"id": "gzip"}}}
                absolute = json.loads(json.dumps(spec))
                absolute["kvstore"]["path"] = os.path.join(ckpt_dir, key)
                ts.open(absolute, create=True).result().write(value).result()
                out[name] = spec
        return out

    contents = {"version": 3, "optimizer": {"target": convert(target, "target"),
                                            "state": {"step": np.int32(7)}}}
    with open(os.path.join(ckpt_dir, "checkpoint"), "wb") as fh:
        fh.write(serialization.msgpack_serialize(contents))


def test_t5x_tensorstore_checkpoint_matches_hf_import(tmp_path, hf_encoder, batch):
    directory, model, reference = hf_encoder
    ckpt = str(tmp_path / "checkpoint_7")
    write_t5x_tensorstore_checkpoint(ckpt, hf_to_t5x_tree(model))
    config = T5Config(**HF_SIZES)
    _, from_t5x = checkpoints.load_pretrained(ckpt)  # auto-detected, config inferred
    t5x_model = checkpoints.build_encoder(config, checkpoints.read_t5x_params(ckpt, config)[1])
    _, hf_model = load_pretrained(directory)
    np.testing.assert_array_equal(run(t5x_model, batch), run(hf_model, batch))
    assert from_t5x.config.num_heads == HF_SIZES["num_heads"]


def test_wrong_size_checkpoint_lists_misshaped_tensors(hf_encoder):
    directory, _, _ = hf_encoder
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(directory, preset="tiny")  # d_model 64 vs the file's 32
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "encoder.final_layer_norm.weight: (32,) vs expected (64,)" in message
    assert "encoder.block.1.layer.1.DenseReluDense.wo.weight: (32, 64) vs expected (64, 128)" \
        in message
    assert len(err.value.misshaped) == 21 and not err.value.missing
    assert "preset" in message


def test_layer_count_mismatch_lists_missing_and_unexpected(tmp_path):
    torch.manual_seed(2)
    T5EncoderModel(hf_config(num_layers=3)).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(CheckpointMismatchError) as err:
        checkpoints.read_hf_params(str(tmp_path), T5Config(**{**HF_SIZES, "num_layers": 4}))
    assert len(err.value.missing) == 9 and "encoder.block.3.layer.0.SelfAttention.q.weight" \
        in str(err.value)
    with pytest.raises(CheckpointMismatchError) as err:
        checkpoints.read_hf_params(str(tmp_path), T5Config(**HF_SIZES))
    assert len(err.value.unexpected) == 9 and "Unexpected tensors (9)" in str(err.value)


def test_layout_detection_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(str(tmp_path / "nope"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="Cannot tell the layout"):
        convert_checkpoint(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="not a T5 encoder written by save_encoder"):
        load_encoder(str(tmp_path))


def test_convert_save_and_load_own_format(tmp_path, hf_encoder, batch):
    directory, _, reference = hf_encoder
    out_dir = str(tmp_path / "converted")
    summary = convert_checkpoint(directory, out_dir)
    assert summary["layout"] == "hf" and summary["config"]["d_model"] == 32
    assert summary["num_params"] == sum(
        p.numel() for p in T5EncoderModel(hf_config()).parameters())
    config, encoder = load_encoder(out_dir)
    assert config == T5Config(**HF_SIZES)
    assert np.abs(run(encoder, batch) - reference).max() <= 1e-4
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_checkpoint(directory, out_dir)
    # Restored straight into shards on an fsdp mesh over 8 devices: same numbers.
    mesh = fsdp_mesh()
    _, sharded = load_encoder(out_dir, mesh=mesh)
    kernel = sharded.layers[0].mlp.wi_0[...]
    assert kernel.sharding == NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
    assert kernel.addressable_shards[0].data.shape == (4, 64)
    np.testing.assert_allclose(run(sharded, batch), run(encoder, batch), atol=1e-5)


def test_save_encoder_checks_shapes(tmp_path, hf_encoder):
    directory, _, _ = hf_encoder
    config, encoder = load_pretrained(directory)
    with pytest.raises(ValueError, match="do not match config"):
        checkpoints.save_encoder(encoder, str(tmp_path / "x"), config.replace(d_ff=8))
    # Saving the live model (not just numpy params) round-trips exactly.
    checkpoints.save_encoder(encoder, str(tmp_path / "y"), config)
    _, again = load_encoder(str(tmp_path / "y"))
    for a, b in zip(jax.tree.leaves(param_values(encoder)), jax.tree.leaves(param_values(again)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def param_values(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_named_shardings_of_loaded_encoder_cover_every_param(hf_encoder):
    directory, _, _ = hf_encoder
    _, encoder = load_pretrained(directory)
    mesh = fsdp_mesh()
    shardings = nnx.to_flat_state(named_shardings(nnx.state(encoder), mesh))
    assert len(list(shardings)) == 3 + 9 * HF_SIZES["num_layers"]
