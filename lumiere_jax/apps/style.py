"""Stylised generation (Lumiere, section 5): a STUNet with its spatial weights blended towards
an image model fine-tuned on a few style images.

The text-to-image model is fine-tuned on the style images (configs/shapes_style.py: the U-Net
only, the T5 encoder frozen). The STUNet keeps its temporal layers and text encoder; only its
spatial U-Net `net/unet/...` becomes

    (1 - alpha) * original + alpha * fine-tuned        (the image model's `net/...`)

alpha 0 is the original STUNet and alpha 1 the fine-tuned spatial weights, each bit for bit
(the ends select the weights instead of computing the blend). Since the temporal layers were
trained with the original spatial weights, alpha trades style against the motion prior.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from flax import nnx

from lumiere_jax.models.denoiser import Denoiser
from lumiere_jax.models.inflate import _flat
from lumiere_jax.models.stunet import STUNet
from lumiere_jax.models.unet import UNet

SPATIAL = "net/unet/"  # the STUNet's spatial U-Net; the image model's `net/`


def check_alpha(alpha: Any) -> float:
    """alpha as a float in [0, 1], or a ValueError saying what alpha is."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"the style strength alpha is a number in [0, 1], got {alpha!r}")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"the style strength alpha must lie in [0, 1] (0: the original model, "
                         f"1: the fine-tuned spatial weights), got {alpha}")
    return alpha


def _params(model: Denoiser) -> dict[str, Any]:
    return _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def spatial_pairs(video_model: Denoiser, style_model: Denoiser
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{STUNet path under net/unet/: (its weight, the style image model's)}, after checking
    the style model is an image U-Net of exactly the STUNet's spatial architecture and has the
    same text encoder (else ValueError listing the mismatches)."""
    if not isinstance(video_model.net, STUNet):
        raise ValueError(f"stylisation blends a STUNet's spatial weights; the video model is a "
                         f"{type(video_model.net).__name__}")
    if type(style_model.net) is not UNet:
        raise ValueError(f"the style model must be a text-to-image U-Net (model.kind 'unet', "
                         f"fine-tuned from the STUNet's image model, configs/shapes_style.py); "
                         f"got a {type(style_model.net).__name__}")
    video, style = _params(video_model), _params(style_model)
    spatial = {p: v for p, v in video.items() if p.startswith(SPATIAL)}
    image = {p: v for p, v in style.items() if p.startswith("net/")}
    wanted = {"net/" + p[len(SPATIAL):]: p for p in spatial}
    problems = [f"missing in the style model: {p}" for p in sorted(set(wanted) - set(image))]
    problems += [f"not in the STUNet's U-Net: {p}" for p in sorted(set(image) - set(wanted))]
    problems += [f"{p}: STUNet {np.shape(spatial[q])}, style model {np.shape(image[p])}"
                 for p, q in wanted.items()
                 if p in image and np.shape(image[p]) != np.shape(spatial[q])]
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ValueError("the style model's U-Net is another architecture than the STUNet's "
                         "spatial U-Net (fine-tune the STUNet's own image model):\n  "
                         + "\n  ".join(problems[:12]) + more)
    text = {p: v for p, v in video.items() if p.startswith("text_encoder/")}
    style_text = {p: v for p, v in style.items() if p.startswith("text_encoder/")}
    if set(text) != set(style_text) or any(
            np.shape(text[p]) != np.shape(style_text[p])
            or not np.array_equal(np.asarray(text[p]), np.asarray(style_text[p])) for p in text):
        raise ValueError("the style model's text encoder differs from the STUNet's: its U-Net "
                         "learned to read other text embeddings. Fine-tune the image model "
                         "with the encoder frozen (train.trainable='^net/').")
    return {q: (spatial[q], image[p]) for p, q in wanted.items()}


def blend(original: Any, fine_tuned: Any, alpha: float) -> np.ndarray:
    """(1 - alpha) * original + alpha * fine_tuned, in the weights' dtype; exactly `original`
    at alpha 0 and exactly `fine_tuned` at alpha 1."""
    alpha = check_alpha(alpha)
    a, b = np.asarray(original), np.asarray(fine_tuned)
    if alpha == 0.0:
        return a
    if alpha == 1.0:
        return b
    return ((1.0 - alpha) * a.astype(np.float64) + alpha * b.astype(np.float64)).astype(a.dtype)


def stylise(video_model: Denoiser, style_model: Denoiser, alpha: float) -> Denoiser:
    """A copy of the STUNet denoiser `video_model` whose spatial weights `net/unet/...` are
    (1 - alpha) * its own + alpha * the style image model's `net/...`; temporal layers and
    text encoder unchanged. Neither input model is modified.

    alpha in [0, 1]: 0 gives the original weights, 1 the fine-tuned ones, bit for bit.
    Raises ValueError for alpha outside [0, 1], a style model that is not an image U-Net of
    the STUNet's spatial architecture, or one with another text encoder.
    """
    alpha = check_alpha(alpha)
    pairs = spatial_pairs(video_model, style_model)
    model = nnx.clone(video_model)
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    for path, (original, fine_tuned) in pairs.items():
        node = pure
        *parents, leaf = path.split("/")
        for part in parents:
            node = node[_key(node, part)]
        node[_key(node, leaf)] = (original if alpha == 0.0
                                  else _like(blend(original, fine_tuned, alpha), original))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def stylised_params(video_model: Denoiser, style_model: Denoiser, alpha: float) -> nnx.State:
    """The parameters of `stylise(...)`, e.g. for `Generator.with_params` (one compiled
    sampler for every alpha)."""
    return nnx.state(stylise(video_model, style_model, alpha), nnx.Param)


def _key(node: dict, part: str):
    """The key of a pure-dict node named `part` in a path (list indices are ints there)."""
    return int(part) if part not in node and part.isdigit() else part


def _like(value: np.ndarray, reference: Any):
    """`value` as an array of the kind `reference` is (a jax.Array on its sharding, or numpy)."""
    sharding = getattr(reference, "sharding", None)
    if sharding is None:
        return value
    import jax
    return jax.device_put(value, sharding)


def load_model(path: str) -> Denoiser:
    """The denoiser of an export or of a training run's latest EMA checkpoint."""
    from lumiere_jax import config as config_lib
    from lumiere_jax.train.export import is_export, load_export
    from lumiere_jax.train.trainer import restore_model
    if is_export(path):
        return load_export(path)[1]
    if not config_lib.resolved_config_path(path).exists():
        raise FileNotFoundError(f"{path} is neither an export (`lumiere export`) nor a training "
                                "run (no resolved config)")
    return restore_model(config_lib.read_resolved_config(path), path)[0]
