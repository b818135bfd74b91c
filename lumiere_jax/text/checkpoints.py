"""Load published T5 v1.1 weights (Hugging Face or t5x layout) into `T5Encoder`, and the
project's own encoder checkpoint format.

Every imported tensor goes through an explicit name map: project state path <-> source key,
with the source shape it must have and the function that turns it into the project layout.
Linear weights in Hugging Face are (out, in) and get transposed; t5x stores attention kernels
with heads and kv joined ([embed, heads*kv]) and the relative bias as [heads, buckets].
Before anything is read, all shapes are checked and one error lists every missing, unexpected
and mis-shaped tensor. Decoder weights (and the LM head) are ignored.

Neither layout scales attention logits by 1/sqrt(d_kv) (T5 folds it into the query weights),
so query weights are copied as they are.

Own format (`save_encoder` / `load_encoder`): a directory with `t5_encoder_config.json` and
`params/`, an Orbax StandardCheckpointer directory of the encoder's parameters.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from lumiere_jax.parallel.sharding import DEFAULT_RULES, Rules, named_shardings
from lumiere_jax.text.t5 import PRESETS, T5Config, T5Encoder, get_preset

CONFIG_FILE = "t5_encoder_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1

Path = tuple[Any, ...]  # a path in the encoder's NNX state, e.g. ("layers", 0, "mlp", "wo")


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the encoder config: lists every difference."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 misshaped: list[tuple[str, tuple, tuple]], config: T5Config):
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
        lines = [f"Checkpoint {source} does not match the T5 encoder config "
                 f"{_config_summary(config)}."]
        if misshaped:
            lines.append(f"Mis-shaped tensors ({len(misshaped)}), checkpoint shape vs expected:")
            lines += [f"  {key}: {tuple(got)} vs expected {tuple(want)}"
                      for key, got, want in misshaped]
        if missing:
            lines.append(f"Missing tensors ({len(missing)}):")
            lines += [f"  {key}" for key in missing]
        if unexpected:
            lines.append(f"Unexpected tensors ({len(unexpected)}):")
            lines += [f"  {key}" for key in unexpected]
        lines.append("Pick the preset that matches the checkpoint (presets: "
                     f"{', '.join(sorted(PRESETS))}), or leave the preset out so that the config "
                     "is read from config.json or inferred from the tensor shapes.")
        super().__init__("\n".join(lines))


def _config_summary(config: T5Config) -> str:
    return (f"(vocab {config.vocab_size}, d_model {config.d_model}, d_kv {config.d_kv}, "
            f"d_ff {config.d_ff}, layers {config.num_layers}, heads {config.num_heads})")


# --------------------------------------------------------------------------------------------
# Name maps.


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One parameter: where it lives in the project and in the source checkpoint."""

    target: Path                      # path in the NNX state
    source: str                       # key in the checkpoint
    source_shape: tuple[int, ...]     # the shape the checkpoint must have
    convert: Callable[[np.ndarray], np.ndarray]  # source layout -> project layout


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _reshape_to(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: x.reshape(shape)


def _transpose_then_reshape(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.ascontiguousarray(x.T).reshape(shape)


def hf_name_map(config: T5Config, embedding_key: str = "shared.weight") -> list[TensorMapping]:
    """Project paths <-> Hugging Face `T5EncoderModel` / `T5ForConditionalGeneration` keys."""
    d, h, k, f = config.d_model, config.num_heads, config.d_kv, config.d_ff
    hk = h * k
    maps = [
        TensorMapping(("token_embedder",), embedding_key, (config.vocab_size, d), _same),
        # [buckets, heads] in both.
        TensorMapping(("relpos_bias",),
                      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      (config.relative_attention_num_buckets, h), _same),
        TensorMapping(("final_norm", "scale"), "encoder.final_layer_norm.weight", (d,), _same),
    ]
    for i in range(config.num_layers):
        block = f"encoder.block.{i}.layer"
        attn = f"{block}.0.SelfAttention"
        maps += [
            TensorMapping(("layers", i, "pre_attention_norm", "scale"),
                          f"{block}.0.layer_norm.weight", (d,), _same),
            # nn.Linear weights are (out, in): [heads*kv, embed] -> [embed, heads, kv].
            TensorMapping(("layers", i, "attention", "query"), f"{attn}.q.weight", (hk, d),
                          _transpose_then_reshape((d, h, k))),
            TensorMapping(("layers", i, "attention", "key"), f"{attn}.k.weight", (hk, d),
                          _transpose_then_reshape((d, h, k))),
            TensorMapping(("layers", i, "attention", "value"), f"{attn}.v.weight", (hk, d),
                          _transpose_then_reshape((d, h, k))),
            # [embed, heads*kv] -> [heads, kv, embed].
            TensorMapping(("layers", i, "attention", "out"), f"{attn}.o.weight", (d, hk),
                          _transpose_then_reshape((h, k, d))),
            TensorMapping(("layers", i, "pre_mlp_norm", "scale"),
                          f"{block}.1.layer_norm.weight", (d,), _same),
            TensorMapping(("layers", i, "mlp", "wi_0"), f"{block}.1.DenseReluDense.wi_0.weight",
                          (f, d), _transpose),
            TensorMapping(("layers", i, "mlp", "wi_1"), f"{block}.1.DenseReluDense.wi_1.weight",
                          (f, d), _transpose),
            TensorMapping(("layers", i, "mlp", "wo"), f"{block}.1.DenseReluDense.wo.weight",
                          (d, f), _transpose),
        ]
    return maps


def t5x_name_map(config: T5Config) -> list[TensorMapping]:
    """Project paths <-> t5x (T5.1.1 `Transformer`) parameter names under `target/`."""
    d, h, k, f = config.d_model, config.num_heads, config.d_kv, config.d_ff
    hk = h * k
    maps = [
        TensorMapping(("token_embedder",), "token_embedder/embedding", (config.vocab_size, d),
                      _same),
        # t5x keeps the table as [heads, buckets].
        TensorMapping(("relpos_bias",), "encoder/relpos_bias/rel_embedding",
                      (h, config.relative_attention_num_buckets), _transpose),
        TensorMapping(("final_norm", "scale"), "encoder/encoder_norm/scale", (d,), _same),
    ]
    for i in range(config.num_layers):
        layer = f"encoder/layers_{i}"
        maps += [
            TensorMapping(("layers", i, "pre_attention_norm", "scale"),
                          f"{layer}/pre_attention_layer_norm/scale", (d,), _same),
            # DenseGeneral stores kernels flattened: [embed, heads*kv] -> [embed, heads, kv].
            TensorMapping(("layers", i, "attention", "query"), f"{layer}/attention/query/kernel",
                          (d, hk), _reshape_to((d, h, k))),
            TensorMapping(("layers", i, "attention", "key"), f"{layer}/attention/key/kernel",
                          (d, hk), _reshape_to((d, h, k))),
            TensorMapping(("layers", i, "attention", "value"), f"{layer}/attention/value/kernel",
                          (d, hk), _reshape_to((d, h, k))),
            TensorMapping(("layers", i, "attention", "out"), f"{layer}/attention/out/kernel",
                          (hk, d), _reshape_to((h, k, d))),
            TensorMapping(("layers", i, "pre_mlp_norm", "scale"),
                          f"{layer}/pre_mlp_layer_norm/scale", (d,), _same),
            TensorMapping(("layers", i, "mlp", "wi_0"), f"{layer}/mlp/wi_0/kernel", (d, f), _same),
            TensorMapping(("layers", i, "mlp", "wi_1"), f"{layer}/mlp/wi_1/kernel", (d, f), _same),
            TensorMapping(("layers", i, "mlp", "wo"), f"{layer}/mlp/wo/kernel", (f, d), _same),
        ]
    return maps


# --------------------------------------------------------------------------------------------
# Tensor sources: list keys and shapes without reading, then read what the name map needs.


class SafetensorsSource:
    """Tensors of one or several (sharded) Hugging Face safetensors files."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open  # local: only this reader needs it

        self._safe_open = safe_open
        self.files = files
        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            with safe_open(path, framework="flax") as handle:
                for key in handle.keys():
                    self._file_of[key] = path
                    self._shapes[key] = tuple(handle.get_slice(key).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._file_of[key], []).append(key)
        out = {}
        # The "flax" reader understands bfloat16 (numpy's does not); keep its arrays on the host.
        with jax.default_device(jax.devices("cpu")[0]):
            for path, file_keys in by_file.items():
                with self._safe_open(path, framework="flax") as handle:
                    for key in file_keys:
                        out[key] = np.asarray(handle.get_tensor(key))
        return out


class T5xTensorStoreSource:
    """A classic t5x checkpoint: a msgpack `checkpoint` file whose large arrays are references
    to TensorStore (zarr) arrays stored next to it; small arrays are inline."""

    def __init__(self, ckpt_dir: str):
        from flax import serialization

        with open(os.path.join(ckpt_dir, "checkpoint"), "rb") as fh:
            contents = serialization.msgpack_restore(fh.read())
        self.ckpt_dir = ckpt_dir
        self.version = int(contents.get("version", 0)) if isinstance(contents, dict) else 0
        _, target = _find_target(contents, ckpt_dir)
        self._leaves = _flatten(target, is_leaf=_is_ts_spec)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for key, leaf in self._leaves.items():
            if _is_ts_spec(leaf):
                metadata = leaf.get("metadata", {})
                shape = metadata.get("shape")
                shapes[key] = tuple(shape) if shape is not None else tuple(
                    self._open(leaf).shape)
            else:
                shapes[key] = tuple(np.shape(leaf))
        return shapes

    def _open(self, spec: dict):
        import tensorstore as ts

        spec = json.loads(json.dumps(spec))  # a deep copy we can edit
        kvstore = spec.get("kvstore", {})
        relative = kvstore.get("path", spec.pop("path", None))
        if relative is None:
            raise ValueError(f"t5x checkpoint {self.ckpt_dir}: a TensorStore spec has no path: "
                             f"{spec}")
        # Paths are relative to the checkpoint directory; read them from the local copy even if
        # the checkpoint was written to GCS.
        spec["kvstore"] = {"driver": "file", "path": os.path.join(self.ckpt_dir, relative)}
        return ts.open(spec, open=True, read=True).result()

    def read(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        out = {}
        for key in keys:
            leaf = self._leaves[key]
            if _is_ts_spec(leaf):
                array = np.asarray(self._open(leaf).read().result())
                if self.version < 3 and array.dtype == np.uint16:
                    # t5x before version 3 wrote bfloat16 as its uint16 bit pattern.
                    array = array.view(jnp.bfloat16)
                out[key] = array
            else:
                out[key] = np.asarray(leaf)
        return out


class T5xOrbaxSource:
    """A t5x checkpoint written through Orbax (a PyTree checkpoint with the `target` tree)."""

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = os.path.abspath(ckpt_dir)
        metadata = ocp.PyTreeCheckpointer().metadata(self.ckpt_dir)
        metadata = getattr(metadata, "item_metadata", metadata)  # StepMetadata -> TreeMetadata
        tree = getattr(metadata, "tree", metadata)
        self._prefix, target = _find_target(tree, ckpt_dir)
        self._meta = _flatten(target, is_leaf=lambda x: hasattr(x, "shape"))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(meta.shape) for key, meta in self._meta.items()}

    def read(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        keys = list(keys)
        # Only the wanted leaves, as host numpy arrays (partial restore skips optimizer state).
        wanted: dict = {}
        for key in keys:
            node = wanted
            parts = [*self._prefix, *key.split("/")]
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
        restored = ocp.PyTreeCheckpointer().restore(
            self.ckpt_dir, args=ocp.args.PyTreeRestore(
                item=wanted, restore_args=wanted, partial_restore=True))
        for part in self._prefix:
            restored = restored[part]
        flat = _flatten(restored, is_leaf=lambda x: isinstance(x, np.ndarray))
        return {key: np.asarray(flat[key]) for key in keys}


def _is_ts_spec(x) -> bool:
    return isinstance(x, dict) and "driver" in x and ("kvstore" in x or "path" in x)


def _flatten(tree, is_leaf: Callable[[Any], bool], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a/b/c": leaf}."""
    if not isinstance(tree, Mapping) or is_leaf(tree):
        return {prefix: tree}
    flat = {}
    for name, value in tree.items():
        flat.update(_flatten(value, is_leaf, f"{prefix}/{name}" if prefix else str(name)))
    return flat


def _find_target(tree: Mapping, where: str) -> tuple[list[str], Mapping]:
    """The t5x model-parameter tree: under optimizer/target, target, or the tree itself."""
    for prefix in (["optimizer", "target"], ["target"], ["params"], []):
        node = tree
        for part in prefix:
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and "encoder" in node:
            return prefix, node
    top = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
    raise ValueError(f"{where} does not look like a t5x checkpoint: found no `target/encoder` "
                     f"tree (top-level entries: {top}).")


# --------------------------------------------------------------------------------------------
# Layout detection and config inference.


def detect_layout(src: str) -> str:
    """'hf' for safetensors files/dirs, 't5x' for t5x checkpoints, 'lumiere' for our format."""
    if not os.path.exists(src):
        raise FileNotFoundError(f"T5 checkpoint {src!r} does not exist.")
    if os.path.isfile(src):
        if src.endswith(".safetensors"):
            return "hf"
        if os.path.basename(src) == "checkpoint":
            return "t5x"
        raise ValueError(f"Cannot tell the layout of file {src!r}: expected a .safetensors "
                         "file, a Hugging Face model directory or a t5x checkpoint directory.")
    names = set(os.listdir(src))
    if CONFIG_FILE in names:
        return "lumiere"
    if "model.safetensors.index.json" in names or any(n.endswith(".safetensors") for n in names):
        return "hf"
    if "checkpoint" in names or "_METADATA" in names or "_CHECKPOINT_METADATA" in names:
        return "t5x"
    if any(re.fullmatch(r"checkpoint_\d+", n) for n in names):
        return "t5x"
    if "pytorch_model.bin" in names:
        raise ValueError(f"{src} holds a PyTorch .bin checkpoint; only safetensors is read. "
                         "Re-save it with `model.save_pretrained(dir, safe_serialization=True)`.")
    raise ValueError(f"Cannot tell the layout of directory {src!r} (entries: {sorted(names)}): "
                     "expected *.safetensors (Hugging Face), a t5x checkpoint (`checkpoint` "
                     f"file or Orbax metadata) or this project's format ({CONFIG_FILE}).")


def _hf_files(src: str) -> list[str]:
    if os.path.isfile(src):
        return [src]
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        return [os.path.join(src, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(src, "model.safetensors")
    if os.path.exists(single):
        return [single]
    return sorted(glob.glob(os.path.join(src, "*.safetensors")))


def _t5x_dir(src: str) -> str:
    """A t5x checkpoint directory; for a directory of `checkpoint_N` steps, the latest one."""
    if os.path.isfile(src):
        return os.path.dirname(src)
    steps = [n for n in os.listdir(src) if re.fullmatch(r"checkpoint_\d+", n)]
    if steps and not os.path.exists(os.path.join(src, "checkpoint")):
        latest = max(steps, key=lambda n: int(n.split("_")[1]))
        logging.info("t5x checkpoint directory %s: using the latest step, %s.", src, latest)
        return os.path.join(src, latest)
    return src


def _t5x_source(src: str):
    ckpt_dir = _t5x_dir(src)
    if os.path.exists(os.path.join(ckpt_dir, "checkpoint")):
        return T5xTensorStoreSource(ckpt_dir)
    return T5xOrbaxSource(ckpt_dir)


def config_from_hf_json(path: str) -> T5Config:
    """A T5Config from a Hugging Face `config.json` (T5 v1.1: gated-gelu feed-forward)."""
    with open(path) as fh:
        hf = json.load(fh)
    proj = hf.get("feed_forward_proj", "relu")
    if proj != "gated-gelu":
        raise ValueError(f"{path}: feed_forward_proj is {proj!r}; only T5 v1.1 checkpoints "
                         "(feed_forward_proj='gated-gelu') are supported.")
    return T5Config(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
        num_layers=hf["num_layers"], num_heads=hf["num_heads"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6))


def _infer_config(shapes: Mapping[str, tuple], layout: str, where: str) -> T5Config:
    """A T5Config from tensor shapes alone (the bias table gives heads and buckets)."""
    if layout == "hf":
        emb_key = next((k for k in ("encoder.embed_tokens.weight", "shared.weight")
                        if k in shapes), None)
        layer_re = r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.q\.weight"
        q_key = "encoder.block.0.layer.0.SelfAttention.q.weight"
        bias_key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        ff_key = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
        non_gated = "encoder.block.0.layer.1.DenseReluDense.wi.weight"
    else:
        emb_key = "token_embedder/embedding" if "token_embedder/embedding" in shapes else None
        layer_re = r"encoder/layers_(\d+)/attention/query/kernel"
        q_key = "encoder/layers_0/attention/query/kernel"
        bias_key = "encoder/relpos_bias/rel_embedding"
        ff_key = "encoder/layers_0/mlp/wi_0/kernel"
        non_gated = "encoder/layers_0/mlp/wi/kernel"
    if non_gated in shapes:
        raise ValueError(f"{where} has a non-gated feed-forward ({non_gated}): that is T5 v1.0; "
                         "only T5 v1.1 (gated-gelu) is supported.")
    needed = [emb_key, q_key, bias_key, ff_key]
    missing = [k for k in needed if k is None or k not in shapes]
    if missing:
        raise ValueError(f"Cannot infer the T5 config of {where}: tensors {missing} are missing. "
                         "Pass a preset.")
    vocab, d_model = shapes[emb_key]
    layers = [int(m.group(1)) for k in shapes if (m := re.fullmatch(layer_re, k))]
    if layout == "hf":
        buckets, heads = shapes[bias_key]
        joined, d_ff = shapes[q_key][0], shapes[ff_key][0]
    else:
        heads, buckets = shapes[bias_key]
        joined, d_ff = shapes[q_key][1], shapes[ff_key][1]
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=joined // heads, d_ff=d_ff,
                    num_layers=max(layers) + 1, num_heads=heads,
                    relative_attention_num_buckets=buckets)


# --------------------------------------------------------------------------------------------
# Import.


def _hf_ignored(key: str) -> bool:
    return key.startswith(("decoder.", "lm_head.")) or key in (
        "shared.weight", "encoder.embed_tokens.weight")


def _t5x_ignored(key: str) -> bool:
    return key.startswith("decoder/")


def _check_and_read(source, maps: list[TensorMapping], ignored: Callable[[str], bool],
                    config: T5Config, where: str, key_prefix: str = "") -> dict[Path, np.ndarray]:
    """Checks every shape first (one error lists all problems), then reads and converts."""
    shapes = source.shapes()
    missing = [key_prefix + m.source for m in maps if m.source not in shapes]
    misshaped = [(key_prefix + m.source, shapes[m.source], m.source_shape) for m in maps
                 if m.source in shapes and tuple(shapes[m.source]) != m.source_shape]
    used = {m.source for m in maps}
    unexpected = sorted(key_prefix + k for k in shapes if k not in used and not ignored(k))
    if missing or misshaped or unexpected:
        raise CheckpointMismatchError(where, missing, unexpected, misshaped, config)
    arrays = source.read([m.source for m in maps])
    dtype = np.dtype(config.param_dtype)
    return {m.target: m.convert(arrays[m.source]).astype(dtype) for m in maps}


def _nest(flat: Mapping[Path, np.ndarray]) -> dict:
    """{("layers", 0, "mlp", "wo"): x} -> {"layers": {0: {"mlp": {"wo": x}}}}."""
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return nested


def read_hf_params(src: str, config: T5Config | None = None) -> tuple[T5Config, dict]:
    """Reads a Hugging Face T5 v1.1 safetensors checkpoint (file, directory or sharded).

    Returns (config, params) where params is the encoder's pure state dict of numpy arrays.
    The config is, in order: `config` if given, the directory's config.json, or inferred.
    """
    files = _hf_files(src)
    if not files:
        raise FileNotFoundError(f"No .safetensors files in {src!r}.")
    source = SafetensorsSource(files)
    shapes = source.shapes()
    if config is None:
        config_json = os.path.join(src if os.path.isdir(src) else os.path.dirname(src),
                                   "config.json")
        config = (config_from_hf_json(config_json) if os.path.exists(config_json)
                  else _infer_config(shapes, "hf", src))
    embedding_key = ("encoder.embed_tokens.weight" if "encoder.embed_tokens.weight" in shapes
                     else "shared.weight")
    flat = _check_and_read(source, hf_name_map(config, embedding_key), _hf_ignored, config, src)
    return config, _nest(flat)


def read_t5x_params(src: str, config: T5Config | None = None) -> tuple[T5Config, dict]:
    """Reads a t5x T5.1.1 checkpoint (TensorStore/msgpack or Orbax). Config inferred if None."""
    source = _t5x_source(src)
    if config is None:
        config = _infer_config(source.shapes(), "t5x", src)
    flat = _check_and_read(source, t5x_name_map(config), _t5x_ignored, config, src,
                           key_prefix="target/")
    return config, _nest(flat)


def read_pretrained_params(src: str, preset: str | None = None,
                           layout: str = "auto") -> tuple[T5Config, dict, str]:
    """(config, params, layout) from a Hugging Face or t5x checkpoint."""
    if layout not in ("auto", "hf", "t5x"):
        raise ValueError(f"layout must be 'auto', 'hf' or 't5x', got {layout!r}.")
    if layout == "auto":
        layout = detect_layout(src)
        if layout == "lumiere":
            raise ValueError(f"{src} is already in this project's format; use load_encoder().")
    elif not os.path.exists(src):
        raise FileNotFoundError(f"T5 checkpoint {src!r} does not exist.")
    config = get_preset(preset) if preset else None
    reader = read_hf_params if layout == "hf" else read_t5x_params
    config, params = reader(src, config)
    return config, params, layout


def build_encoder(config: T5Config, params: Mapping, mesh: Mesh | None = None,
                  rules: Rules = DEFAULT_RULES) -> T5Encoder:
    """A T5Encoder holding `params` (a pure state dict), sharded over `mesh` if given.

    The model is built abstractly first, so no random weights are ever allocated; with a mesh,
    each array goes straight from the host to its shards.
    """
    abstract = nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shardings = nnx.to_pure_dict(named_shardings(state, mesh, rules))
        params = jax.tree.map(jax.device_put, dict(params), shardings)
    else:
        params = jax.tree.map(jnp.asarray, dict(params))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load_pretrained(src: str, preset: str | None = None, layout: str = "auto",
                    dtype: Any = None, mesh: Mesh | None = None,
                    rules: Rules = DEFAULT_RULES) -> tuple[T5Config, T5Encoder]:
    """(config, encoder) from a Hugging Face or t5x checkpoint; `dtype` sets compute dtype."""
    config, params, _ = read_pretrained_params(src, preset, layout)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    return config, build_encoder(config, params, mesh, rules)


# --------------------------------------------------------------------------------------------
# Own format.


def _pure_params(model_or_state) -> dict:
    if isinstance(model_or_state, nnx.Module):
        model_or_state = nnx.state(model_or_state, nnx.Param)
    if isinstance(model_or_state, nnx.State):
        return nnx.to_pure_dict(model_or_state)
    if isinstance(model_or_state, Mapping):
        return dict(model_or_state)
    raise TypeError("save_encoder expects a T5Encoder, its nnx.State or a pure state dict, got "
                    f"{type(model_or_state).__name__}.")


def save_encoder(model_or_state, out_dir: str, config: T5Config,
                 overwrite: bool = False) -> str:
    """Writes the encoder to `out_dir` (config JSON + Orbax params). Returns the directory."""
    out_dir = os.path.abspath(out_dir)
    params_dir = os.path.join(out_dir, PARAMS_DIR)
    if os.path.exists(params_dir) and not overwrite:
        raise FileExistsError(f"{params_dir} already exists; pass overwrite=True to replace it.")
    params = _pure_params(model_or_state)
    expected = nnx.to_pure_dict(nnx.state(
        nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0))), nnx.Param))
    got_shapes = jax.tree.map(np.shape, params)
    want_shapes = jax.tree.map(np.shape, expected)
    if got_shapes != want_shapes:
        raise ValueError(f"The parameters given to save_encoder do not match config "
                         f"{_config_summary(config)}.")
    os.makedirs(out_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, params, force=overwrite)
    checkpointer.wait_until_finished()
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as fh:
        json.dump({"format_version": FORMAT_VERSION, "config": config.to_dict()}, fh, indent=2)
    return out_dir


def load_encoder(path: str, dtype: Any = None, mesh: Mesh | None = None,
                 rules: Rules = DEFAULT_RULES) -> tuple[T5Config, T5Encoder]:
    """(config, encoder) from a directory written by `save_encoder` / `convert_checkpoint`.

    `dtype` overrides the compute dtype (e.g. "bfloat16"); with `mesh`, parameters are restored
    directly into their shards.
    """
    path = os.path.abspath(path)
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
        hint = ""
        if os.path.isdir(path):
            try:
                layout = detect_layout(path)
            except ValueError:
                layout = None
            if layout in ("hf", "t5x"):
                hint = (f" It looks like a {layout} checkpoint: convert it first with "
                        f"`lumiere t5 convert {path} OUT_DIR` (convert_checkpoint).")
        raise FileNotFoundError(f"{config_path} not found: {path} is not a T5 encoder written by "
                                f"save_encoder.{hint}")
    with open(config_path) as fh:
        saved = json.load(fh)
    config = T5Config.from_dict(saved["config"])
    if dtype is not None:
        config = config.replace(dtype=dtype)
    abstract = nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shardings = nnx.to_pure_dict(named_shardings(state, mesh, rules))
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(state))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(state), shardings)
    params = ocp.StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR), target)
    nnx.replace_by_pure_dict(state, params)
    return config, nnx.merge(graphdef, state)


def convert_checkpoint(src: str, out_dir: str, preset: str | None = None,
                       layout: str = "auto", overwrite: bool = False) -> dict:
    """Converts a Hugging Face or t5x T5 v1.1 checkpoint to this project's format.

    Returns a summary dict (source, layout, out_dir, config, num_params) for the CLI to print.
    """
    config, params, layout = read_pretrained_params(src, preset, layout)
    save_encoder(params, out_dir, config, overwrite=overwrite)
    num_params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    logging.info("Converted %s checkpoint %s -> %s (%d parameters).", layout, src, out_dir,
                 num_params)
    return {"source": src, "layout": layout, "out_dir": os.path.abspath(out_dir),
            "config": config.to_dict(), "num_params": num_params}
