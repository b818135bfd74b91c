"""The U-Net and the STUNet: shapes, annotations, and the exact properties at initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lumiere_jax.models import layers
from lumiere_jax.models.stunet import STUNet, STUNetConfig
from lumiere_jax.models.unet import UNet, UNetConfig, block_names
from lumiere_jax.parallel.sharding import unannotated_params

UNET = UNetConfig(channels=16, channel_mult=(1, 2, 4), attention_levels=(1, 2), text_dim=8)
B, T, HW = 2, 8, 16


def _randomise(module: nnx.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Perturb every parameter: zero-initialised layers would hide mistakes."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(module, jax.tree.unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


def _inputs(t: int = T, still: bool = False):
    x = jax.random.normal(jax.random.key(2), (B, t, HW, HW, 3))
    if still:
        x = jnp.repeat(x[:, :1], t, axis=1)
    text = jax.random.normal(jax.random.key(3), (B, 5, 8))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    return x, jnp.array([-3.0, 2.0]), text, mask


def _per_frame(unet: UNet, x, logsnr, text, mask):
    return jnp.stack([unet(x[:, i], logsnr, text, mask) for i in range(x.shape[1])], axis=1)


def _stunet(**kwargs) -> STUNet:
    model = STUNet(STUNetConfig(unet=UNET, **kwargs), rngs=nnx.Rngs(0))
    _randomise(model.unet)
    return model


def test_group_norm_matches_a_numpy_reference():
    """Per example and per group of channels: zero mean, unit variance, then scale and bias."""
    x = np.random.default_rng(0).normal(3.0, 2.0, (3, 4, 5, 12)).astype(np.float32)
    norm = layers.GroupNorm(12, groups=4, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.linspace(0.5, 2.0, 12)
    norm.bias[...] = jnp.linspace(-1.0, 1.0, 12)
    groups = x.reshape(3, 4, 5, 4, 3).astype(np.float64)
    mean = groups.mean(axis=(1, 2, 4), keepdims=True)
    var = groups.var(axis=(1, 2, 4), keepdims=True)
    want = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    want = want * np.linspace(0.5, 2.0, 12) + np.linspace(-1.0, 1.0, 12)
    np.testing.assert_allclose(norm(jnp.asarray(x)), want, atol=2e-5)


def test_unet_shapes_and_annotations():
    model = UNet(UNET, rngs=nnx.Rngs(0))
    _randomise(model)
    x, logsnr, text, mask = _inputs()
    out = model(x[:, 0], logsnr, text, mask)
    assert out.shape == (B, HW, HW, 3) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all() and float(jnp.abs(out).max()) > 0
    assert unannotated_params(nnx.state(model)) == []


def test_unet_padding_tokens_are_ignored():
    model = UNet(UNET, rngs=nnx.Rngs(0))
    _randomise(model)
    x, logsnr, text, mask = _inputs()
    garbage = text.at[0, 3:].set(100.0)  # example 0 has mask False from position 3 on
    a = model(x[:, 0], logsnr, text, mask)
    b = model(x[:, 0], logsnr, garbage, mask)
    # Pooling and cross-attention use the mask, so padded positions change nothing.
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_unet_bf16_close_to_fp32():
    import dataclasses
    model = UNet(UNET, rngs=nnx.Rngs(0))
    _randomise(model)
    bf16 = UNet(dataclasses.replace(UNET, dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(bf16, nnx.state(model))
    x, logsnr, text, mask = _inputs()
    a, b = model(x[:, 0], logsnr, text, mask), bf16(x[:, 0], logsnr, text, mask)
    assert b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(a).max())


def test_stunet_without_temporal_sampling_equals_image_model_per_frame():
    model = _stunet(temporal_sampling_levels=())
    x, logsnr, text, mask = _inputs()
    out = model(x, logsnr, text, mask)
    ref = _per_frame(model.unet, x, logsnr, text, mask)
    assert out.shape == (B, T, HW, HW, 3)
    assert float(jnp.abs(ref).max()) > 0.1
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_stunet_with_temporal_sampling_equals_image_model_on_still_video():
    model = _stunet()  # nearest-neighbour init on every level
    x, logsnr, text, mask = _inputs(still=True)
    out = model(x, logsnr, text, mask)
    ref = _per_frame(model.unet, x, logsnr, text, mask)
    np.testing.assert_allclose(out, ref, atol=1e-5)


class _AverageAndRepeat:
    """An independent reference for the initialised temporal sampling: frames averaged in pairs
    going down, repeated going up, nothing else."""

    def __init__(self, down, up):
        self.down, self.up = down, up

    def embed(self, emb, text, text_mask):
        return emb

    def after_block(self, name, h, emb):
        return h

    def downsample(self, name, h, b):
        if name not in self.down:
            return h
        v = h.reshape(b, -1, 2, *h.shape[1:])
        return v.mean(axis=2).reshape(-1, *h.shape[1:])

    def upsample(self, name, h, b):
        if name not in self.up:
            return h
        v = h.reshape(b, -1, *h.shape[1:])
        return jnp.repeat(v, 2, axis=1).reshape(-1, *h.shape[1:])


def test_stunet_temporal_sampling_on_moving_video_averages_coarse_levels():
    model = _stunet()
    x, logsnr, text, mask = _inputs()  # independent random frames: maximal motion
    out = model(x, logsnr, text, mask)
    hooks = _AverageAndRepeat({"down_0", "down_1"}, {"up_1", "up_2"})
    ref = model.unet(x.reshape(B * T, HW, HW, 3), logsnr, text, mask, hooks=hooks)
    np.testing.assert_allclose(out, ref.reshape(out.shape), atol=1e-5)
    # ... which is NOT the per-frame image model: the coarse levels saw frame averages.
    per_frame = _per_frame(model.unet, x, logsnr, text, mask)
    assert float(jnp.abs(out - per_frame).mean()) > 1e-2


def test_temporal_attention_only_at_the_coarsest_level():
    model = STUNet(STUNetConfig(unet=UNET), rngs=nnx.Rngs(0))
    kinds = {name: type(block).__name__ for name, block in model.temporal.blocks.items()}
    coarsest = UNET.num_levels - 1
    for name, kind in kinds.items():
        level = coarsest if name.startswith("mid") else int(name.split("_")[1])
        assert kind == ("TemporalAttention" if level == coarsest else "TemporalConv"), name
    assert any(k == "TemporalAttention" for k in kinds.values())
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))]
    attn = {p.split("/")[2] for p in paths if p.startswith("temporal/blocks/")
            and "/qkv/" in p}
    assert attn == {n for n, k in kinds.items() if k == "TemporalAttention"}
    assert unannotated_params(nnx.state(model)) == []


def test_temporal_layers_are_conditioned_on_the_embedding():
    # The frozen image model never saw motion, so "moving left" vs "moving right" reaches the
    # temporal layers through their FiLM from the per-video embedding (noise level + text):
    # the same activation with another embedding gives another output.
    model = STUNet(STUNetConfig(unet=UNET), rngs=nnx.Rngs(0))
    _randomise(model)
    emb = jax.random.normal(jax.random.key(4), (B, UNET.emb_dim))
    for name, level, ch in block_names(UNET):
        if name not in model.temporal.blocks:
            continue
        h = jax.random.normal(jax.random.key(5), (B * T, HW >> level, HW >> level, ch))
        same = model.temporal.after_block(name, h, emb)
        other = model.temporal.after_block(name, h, emb.at[0].add(1.0))
        assert np.abs(same - other)[:T].max() > 1e-3, name  # video 0's frames change
        np.testing.assert_array_equal(same[T:], other[T:], err_msg=name)  # video 1's do not
    assert len(model.temporal.blocks) == len(block_names(UNET))


def test_ablation_switches_change_the_parameter_tree():
    plain = STUNet(STUNetConfig(unet=UNET, temporal_sampling_levels=(), temporal_attention=False),
                   rngs=nnx.Rngs(0))
    assert len(plain.temporal.down) == 0 and len(plain.temporal.up) == 0
    assert all(type(b).__name__ == "TemporalConv" for b in plain.temporal.blocks.values())
    rand = STUNet(STUNetConfig(unet=UNET, temporal_sampling_init="random"), rngs=nnx.Rngs(0))
    kernel = np.asarray(rand.temporal.down["down_0"].kernel[...])
    assert not np.allclose(kernel, 0.5 * np.stack([np.eye(kernel.shape[1])] * 2))


def test_frame_count_error_names_valid_counts():
    model = STUNet(STUNetConfig(unet=UNET), rngs=nnx.Rngs(0))
    x, logsnr, text, mask = _inputs(t=6)
    with pytest.raises(ValueError, match=r"multiple of 4 \(4, 8, 12"):
        model(x, logsnr, text, mask)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(3,))
    with pytest.raises(ValueError, match="temporal_sampling_levels"):
        STUNetConfig(unet=UNET, temporal_sampling_levels=(2,))
    with pytest.raises(ValueError, match="unknown U-Net config keys"):
        UNetConfig.from_dict({"chanels": 3})


@pytest.mark.parametrize("still", [False, True])
@pytest.mark.parametrize("reader,position", [(True, False), ("sum", True), ("sum", "scale")])
def test_text_pool_and_spatial_temporal_conv_keep_the_exact_init(still, reader, position):
    """The world's configs add a caption reader, (2+1)D temporal convs and a space-time
    position embedding; at initialisation the STUNet still equals the image model per frame
    (without temporal sampling), and on a still video with it."""
    options = dict(temporal_text=reader, temporal_conv_spatial=3, temporal_position=position)
    model = _stunet(**options) if still else _stunet(temporal_sampling_levels=(), **options)
    x, logsnr, text, mask = _inputs(still=still)
    ref = _per_frame(model.unet, x, logsnr, text, mask)
    assert float(jnp.abs(ref).max()) > 0.1
    np.testing.assert_allclose(model(x, logsnr, text, mask), ref, atol=1e-5)
    assert "spatial" in nnx.to_pure_dict(nnx.state(model.temporal.blocks["down_0_0"]))


@pytest.mark.parametrize("reader", [True, "true", "attention", "sum"])
def test_temporal_text_pool_reads_single_words(reader):
    """One changed token (e.g. 'left' -> 'right') moves the temporal layers' embedding by as
    much as a changed noise level does; padding tokens change nothing."""
    model = STUNet(STUNetConfig(unet=UNET, temporal_text=reader), rngs=nnx.Rngs(0))
    emb = jax.random.normal(jax.random.key(4), (B, UNET.emb_dim))
    _, _, text, mask = _inputs()
    base = model.temporal.embed(emb, text, mask)
    one_word = model.temporal.embed(emb, text.at[:, 1].set(-text[:, 1]), mask)
    padding = model.temporal.embed(emb, text.at[0, 4].set(100.0), mask)
    assert float(jnp.linalg.norm(one_word - base, axis=-1).min()) > 0.1
    np.testing.assert_array_equal(padding, base)
    plain = STUNet(STUNetConfig(unet=UNET), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(plain.temporal.embed(emb, text, mask), emb)
    with pytest.raises(ValueError, match="temporal_conv_spatial must be an odd"):
        STUNetConfig(unet=UNET, temporal_conv_spatial=2)
    with pytest.raises(ValueError,
                       match="temporal_text must be 'none', 'attention', 'sum' or 'tokens'"):
        STUNetConfig(unet=UNET, temporal_text="mean")


def test_the_token_reader_reads_word_ids_and_keeps_the_exact_init():
    """temporal_text='tokens': a learned vector per token id, summed; one changed id moves the
    embedding by exactly the two words' difference, padding adds nothing, and the STUNet
    still starts as the image model on every frame. Without the ids it says what it needs."""
    x, logsnr, text, mask = _inputs()
    ids = jnp.array([[5, 9, 2, 0, 0], [7, 3, 3, 11, 4]], jnp.int32)
    model = _stunet(temporal_text="tokens", text_vocab=16, temporal_sampling_levels=())
    emb = jax.random.normal(jax.random.key(4), (B, UNET.emb_dim))
    table = model.temporal.text_pool.embedding[...]
    base = model.temporal.embed(emb, text, mask, ids)
    np.testing.assert_allclose(base[0], emb[0] + table[5] + table[9] + table[2], rtol=1e-6)
    moved = model.temporal.embed(emb, text, mask, ids.at[0, 1].set(12)) - base
    np.testing.assert_allclose(moved[0], table[12] - table[9], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(moved[1], 0.0)
    np.testing.assert_array_equal(model.temporal.embed(emb, text, mask, ids.at[0, 4].set(8)),
                                  base)  # a padding position
    ref = _per_frame(model.unet, x, logsnr, text, mask)
    np.testing.assert_allclose(model(x, logsnr, text, mask, text_ids=ids), ref, atol=1e-5)
    with pytest.raises(ValueError, match="temporal_text='tokens' reads the caption's token ids"):
        model(x, logsnr, text, mask)
    with pytest.raises(ValueError, match="temporal_text='tokens' needs text_vocab"):
        STUNetConfig(unet=UNET, temporal_text="tokens")


def test_the_token_reader_gives_the_motion_word_the_weight_the_summed_t5_reader_lacks():
    """From the shipped stage-0 model, inflated as configs/shapes_stunet.py does: through the
    summed T5 outputs ('sum') "left" -> "right" moves the temporal layers' embedding less than
    a fifth as far as "red" -> "blue" (the frozen T5 never saw a motion word); read by token
    ids, both moves are of one size (random vectors of the same scale)."""
    from lumiere_jax.config import load_config
    from lumiere_jax.models.denoiser import build_denoiser
    from lumiere_jax.text.tokenizers import make_tokenizer
    from lumiere_jax.train.export import inflate_from_export

    caption = "a large red circle moving left on a black background"
    captions = [caption, caption.replace("left", "right"), caption.replace("red", "blue")]
    ratios = {}
    for reader in ("sum", "tokens"):
        config = load_config(f"configs/shapes_stunet.py:text={reader},position")
        model = build_denoiser(config, nnx.Rngs(0))
        inflate_from_export(model, config.init_from, r"$^")
        t = make_tokenizer(config.text.tokenizer).encode_batch(captions, config.text.max_length)
        cond = model.encode_text(jnp.asarray(t.ids), jnp.asarray(t.mask))
        emb = model.net.unet.embed(jnp.full((3,), -8.0), cond["text"], cond["text_mask"])
        hook = model.net.temporal.embed(emb, cond["text"], cond["text_mask"], cond.get("ids"))
        ratios[reader] = float(jnp.linalg.norm(hook[1] - hook[0])
                               / jnp.linalg.norm(hook[2] - hook[0]))
    assert ratios["sum"] < 0.2, ratios
    assert 0.5 < ratios["tokens"] < 2.0, ratios


def test_the_summing_reader_does_not_dilute_a_word_by_the_caption_length():
    """With the sum reader a changed word moves the embedding by the same vector in a caption
    of 3 tokens and one of 5; the attention reader divides it among the tokens."""
    emb = jnp.zeros((B, UNET.emb_dim))
    _, _, text, _ = _inputs()
    short = jnp.array([[1, 1, 1, 0, 0]] * B, bool)
    long = jnp.ones((B, 5), bool)
    changed = text.at[:, 1].set(-text[:, 1])
    moves = {}
    for reader in ("sum", "attention"):
        model = STUNet(STUNetConfig(unet=UNET, temporal_text=reader), rngs=nnx.Rngs(0))
        moves[reader] = [model.temporal.embed(emb, changed, m) - model.temporal.embed(emb, text, m)
                         for m in (short, long)]
    np.testing.assert_allclose(moves["sum"][0], moves["sum"][1], atol=1e-5)
    assert float(jnp.abs(moves["sum"][0]).max()) > 0.1
    ratio = jnp.linalg.norm(moves["attention"][1]) / jnp.linalg.norm(moves["attention"][0])
    assert float(ratio) < 0.9  # attention: the same word moves a longer caption's pool less


def test_position_scale_mode_scales_and_shifts_each_place():
    """temporal_position='scale': the embedding's first half scales the block's input per
    frame and pixel, the second half shifts it, so a feature's effect depends on its place."""
    from lumiere_jax.models.stunet import SpaceTimePosition, _with_position

    position = SpaceTimePosition(8, jnp.float32, nnx.Rngs(0), "scale")
    h = jax.random.normal(jax.random.key(1), (2 * 4, 3, 5, 8))
    p = position(4, 3, 5)
    assert p.shape == (4, 3, 5, 16)
    expected = h.reshape(2, 4, 3, 5, 8) * (1 + p[..., :8]) + p[..., 8:]
    np.testing.assert_allclose(_with_position(position, h, 2), expected.reshape(h.shape),
                               rtol=1e-6)
    assert STUNetConfig(unet=UNET, temporal_position=True).temporal_position == "add"
    assert STUNetConfig(unet=UNET, temporal_position="false").temporal_position == "none"
    with pytest.raises(ValueError, match="temporal_position must be 'none', 'add' or 'scale'"):
        STUNetConfig(unet=UNET, temporal_position="gate")


@pytest.mark.parametrize("kind", ["TemporalConv", "TemporalAttention"])
def test_position_embedding_lets_temporal_blocks_tell_places_and_frames_apart(kind):
    """On an activation that is the same at every pixel of every frame, a temporal block
    without the position embedding can vary only at the borders (zero padding) and, for
    attention, over frames (its frame encoding); with it, every pixel and frame differs."""
    name = next(n for n, level, _ in block_names(UNET)
                if (level == UNET.num_levels - 1) == (kind == "TemporalAttention"))
    level, ch = next((lvl, c) for n, lvl, c in block_names(UNET) if n == name)
    emb = jax.random.normal(jax.random.key(4), (B, UNET.emb_dim))
    h = jnp.ones((B * T, HW >> level, HW >> level, ch))
    outs = {}
    for position in (False, True, "scale"):
        model = STUNet(STUNetConfig(unet=UNET, temporal_position=position), rngs=nnx.Rngs(0))
        _randomise(model.temporal)
        block = model.temporal.blocks[name]
        assert type(block).__name__ == kind
        outs[position] = model.temporal.after_block(name, h, emb).reshape(B, T, *h.shape[1:])
    interior = lambda v: v[:, 2:-2, 1:-1, 1:-1]  # noqa: E731 (two temporal taps off the ends)
    plain = interior(outs[False])
    spread = lambda v, axis: float(jnp.abs(v - v.mean(axis, keepdims=True)).max())  # noqa: E731
    assert spread(plain, (2, 3)) < 1e-5  # no pixel differs from another away from the borders
    for placed in (interior(outs[True]), interior(outs["scale"])):
        assert spread(placed, (2, 3)) > 1e-2
        assert spread(placed, 1) > 1e-2
    if kind == "TemporalConv":
        assert spread(plain, 1) < 1e-5
