"""Inflation: load a trained text-to-image denoiser's weights into a STUNet denoiser.

The spatial weights are copied by name, unchanged: the image model's `net/...` becomes the
STUNet's `net/unet/...` and `text_encoder/...` stays where it is (t5x-style assignment rules,
first match wins). Everything under `net/temporal` is new and keeps its initialisation. Any
other spatial parameter that finds no source, a source of another shape, or a source left
unused is an error that lists them all: that is a checkpoint of another architecture. The
caller may declare which targets may be new (`new_params`) and which sources may go unused
(`unused_params`), e.g. to start an ablation from a model that has a layer it drops.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from lumiere_jax.models.denoiser import Denoiser

# (regex over the target path, replacement giving the source path)
IMAGE_TO_VIDEO_RULES: tuple[tuple[str, str], ...] = (
    (r"^net/unet/(.*)$", r"net/\1"),
    (r"^text_encoder/(.*)$", r"text_encoder/\1"),
)
NEW_PARAMS = r"^net/temporal/"
SAME_NAME_RULES: tuple[tuple[str, str], ...] = ((r"^(.*)$", r"\1"),)  # same architecture


class InflationError(ValueError):
    """The source weights do not fit the target model's spatial part."""


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, path + "/"))
        else:
            out[path] = value
    return out


def _source_path(path: str, rules: Sequence[tuple[str, str]]) -> str | None:
    for pattern, replacement in rules:
        if re.match(pattern, path):
            return re.sub(pattern, replacement, path)
    return None


def inflate(model: Denoiser, source: Mapping[str, Any], *,
            rules: Sequence[tuple[str, str]] = IMAGE_TO_VIDEO_RULES,
            new_params: str = NEW_PARAMS, unused_params: str = r"$^",
            where: str = "the source checkpoint") -> dict:
    """Copies `source` (a pure dict of the image denoiser's params) into `model` in place;
    parameters matching the regex `new_params` that the source lacks keep their initialisation,
    and source parameters matching `unused_params` that the model lacks are left out.

    Returns {'copied': n, 'new': n, 'unused': n}. Raises InflationError listing every mismatch.
    """
    state = nnx.state(model, nnx.Param)
    target = _flat(nnx.to_pure_dict(state))
    src = _flat(source)
    values, missing, misshaped, new, matched = {}, [], [], [], set()
    for path, leaf in target.items():
        src_path = _source_path(path, rules)
        if re.match(new_params, path) and (src_path is None or src_path not in src):
            new.append(path)  # the source may lack it: it keeps its initialisation
            continue
        if src_path is None or src_path not in src:
            missing.append(f"{path} (looked for {src_path})")
            continue
        matched.add(src_path)
        if tuple(np.shape(src[src_path])) != tuple(leaf.shape):
            misshaped.append(f"{path}: model {tuple(leaf.shape)}, source "
                             f"{tuple(np.shape(src[src_path]))}")
        else:
            values[path] = src[src_path]
    unused = sorted(set(src) - matched)
    unexpected = [path for path in unused if not re.match(unused_params, path)]
    if missing or misshaped or unexpected:
        lines = [f"cannot initialise from {where}: its parameters do not fit this config's "
                 "model"]
        for title, items in (("missing", missing), ("mis-shaped", misshaped),
                             ("unexpected (unused)", unexpected)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {item}" for item in items[:20]]
                if len(items) > 20:
                    lines.append(f"  ... and {len(items) - 20} more")
        if missing:
            lines.append(f"(the parameters the source may lack, which keep their "
                         f"initialisation, are those matching {new_params!r})")
        if unexpected:
            lines.append(f"(the source parameters this model may leave out are those "
                         f"matching {unused_params!r})")
        raise InflationError("\n".join(lines))

    def nest(flat: Mapping[str, Any]) -> dict:
        tree: dict = {}
        for path, value in flat.items():
            node = tree
            *parents, leaf = path.split("/")
            for p in parents:
                node = node.setdefault(int(p) if p.isdigit() else p, {})
            node[int(leaf) if leaf.isdigit() else leaf] = value
        return tree

    full = {**{p: v for p, v in target.items()}, **values}
    nnx.replace_by_pure_dict(state, nest(full))
    nnx.update(model, state)
    return {"copied": len(values), "new": len(new), "unused": len(unused)}
