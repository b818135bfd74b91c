"""`lumiere plan`: abstract parameter counts, FLOPs and per-device memory, and its refusals."""

import jax
import pytest
from flax import nnx

from lumiere_jax import plan as plan_lib
from lumiere_jax.config import load_config
from lumiere_jax.models.denoiser import build_denoiser
from lumiere_jax.text import t5

GIB = 1024**3
V5P_128 = dict(data=8, fsdp=8, tensor=1)  # 64 chips (v5p names count TensorCores)


@pytest.fixture(scope="module")
def paper_report():
    """The paper config on a v5p-128-like mesh with 95 GiB chips; it is refused (no remat)."""
    config = load_config("configs/lumiere_base.py")
    with pytest.raises(plan_lib.PlanDoesNotFitError) as refused:
        plan_lib.plan(config, V5P_128, device_memory_gib=95)
    return refused.value


def test_paper_config_builds_abstractly_with_sane_numbers(paper_report):
    report = paper_report.report
    groups = report["params"]["groups"]
    assert set(groups) == {"text_encoder", "net/unet", "net/temporal"}
    assert groups["text_encoder"]["total"] == t5.count_params(t5.get_preset("t5-v1_1-xxl"))
    # Stage 1: exactly the temporal layers train.
    assert report["params"]["trainable"] == groups["net/temporal"]["total"] > 10_000_000
    assert groups["net/unet"]["trainable"] == groups["text_encoder"]["trainable"] == 0
    assert report["num_devices"] == 64 and report["per_device_batch"] == 1
    # An STUNet step on 64 clips of 80x128x128 costs petaFLOPs.
    assert 1e15 < report["flops_per_step"] < 1e17
    rows = {r["name"]: r["bytes"] for r in report["per_device"]}
    # float32 weights split over fsdp=8; only small vectors (norms, biases) stay replicated.
    frozen_total = report["params"]["frozen"] * 4
    assert frozen_total / 8 <= rows["frozen params"] < 1.01 * frozen_total / 8
    trainable_total = report["params"]["trainable"] * 4
    assert trainable_total / 8 <= rows["trainable params"] < 1.05 * trainable_total / 8
    assert rows["optimizer state"] == pytest.approx(2 * rows["trainable params"], rel=1e-3)
    assert rows["EMA"] == rows["gradients"] == rows["trainable params"]
    assert report["activations_source"] == "estimate"
    assert rows["activations (saved residuals)"] > 95 * GIB


def test_paper_config_refused_with_what_to_change(paper_report):
    message = str(paper_report)
    assert "does not fit" in message and "95.0 GiB" in message
    assert "activations (saved residuals)" in message  # the largest part is named
    for remedy in ("fsdp", "batch", "rematerialisation"):
        assert remedy in message
    table = plan_lib.format_plan(paper_report.report)
    assert "DOES NOT FIT" in table and "net/temporal" in table and "estimate" in table


def _small_stunet_config():
    return load_config("configs/lumiere_base.py:channels=8,frames=4,batch=2", [
        "model.unet.channel_mult=(1, 2)", "model.unet.num_res_blocks=1",
        "model.unet.attention_levels=(1,)", "text.preset=tiny", "text.max_length=8",
        "world.height=16", "world.width=16"])


def test_small_stunet_counts_equal_hand_count():
    config = _small_stunet_config()
    report = plan_lib.plan(config, dict(data=1), device_memory_gib=80, compile=False)
    groups = report["params"]["groups"]
    c0, c1, emb = 8, 16, 32  # level widths; the embedding is 4 x channels
    # Temporal conv after the 3 level-0 blocks (down_0_0, up_0_0, up_0_1): two GroupNorms,
    # two 3-tap Dense layers and the FiLM Dense (emb -> 2C); attention after the 5 coarsest
    # blocks (down_1_0, mid_0, mid_1, up_1_0, up_1_1): LayerNorm, FiLM, qkv, out; one temporal
    # down- (level 0) and up-sample.
    film = lambda c: emb * 2 * c + 2 * c  # noqa: E731
    conv = 2 * 2 * c0 + 2 * (3 * c0 * c0 + c0) + film(c0)
    attention = 2 * c1 + film(c1) + (c1 * 3 * c1 + 3 * c1) + (c1 * c1 + c1)
    sampling = 2 * c0 * c0 + 2 * c1 * c1
    assert groups["net/temporal"]["total"] == 3 * conv + 5 * attention + sampling == 14400
    assert groups["text_encoder"]["total"] == t5.count_params(t5.get_preset("tiny"))
    # The abstract counts equal those of the materialised model.
    concrete = build_denoiser(config, nnx.Rngs(0))
    spatial = nnx.state(concrete.net.unet, nnx.Param)
    assert groups["net/unet"]["total"] == sum(x.size for x in jax.tree.leaves(spatial))
    assert report["params"]["trainable"] == groups["net/temporal"]["total"]
    assert report["flops_per_step"] > 0 and report["fits"] is True


def test_tiny_config_compiled_memory_matches_abstract_bytes():
    config = load_config("configs/shapes_t2i.py:smoke,channels=8", [
        "model.unet.channel_mult=(1,)", "model.unet.attention_levels=()", "world.height=16",
        "world.width=16", "train.batch_size=4"])
    mesh = dict(data=2, fsdp=2, tensor=2)
    report = plan_lib.plan(config, mesh, device_memory_gib=1.0)
    assert report["activations_source"] == "compiled" and report["fits"] is True
    assert report["flops_per_step"] > 1e8
    memory = report["compiled_memory"]
    assert memory["temp"] > 0
    # XLA's per-device argument bytes are the state, frozen weights and batch counted from
    # the abstract shapes and sharding rules (plus the step counter and RNG key).
    abstract = sum(r["bytes"] for r in report["per_device"] if r["source"] == "abstract shapes")
    assert abs(memory["argument"] - abstract) <= 64
    assert "compiled memory analysis" in plan_lib.format_plan(report)


@pytest.mark.parametrize("mesh, num_devices, expected", [
    (dict(data=2, pipeline=2), None, "unknown"),
    (dict(data=-1, fsdp=-1), 8, "at most one axis"),
    (dict(data=3, fsdp=-1), 8, "do not divide the 8 devices"),
    (dict(data=4, fsdp=4), 8, "has 16 devices, but 8"),
    (dict(data=0), None, "positive ints"),
])
def test_bad_mesh_is_refused(mesh, num_devices, expected):
    with pytest.raises(plan_lib.PlanError, match=expected):
        plan_lib.resolve_mesh_shape(mesh, num_devices)


def test_resolve_mesh_fills_the_rest():
    assert plan_lib.resolve_mesh_shape(dict(data=-1, fsdp=8), 64) == dict(data=8, fsdp=8,
                                                                          tensor=1)
    assert plan_lib.resolve_mesh_shape(dict(fsdp=4, tensor=2)) == dict(data=1, fsdp=4, tensor=2)


def test_mesh_flag_text_is_parsed():
    assert plan_lib.parse_mesh_text("data=8, fsdp=8,tensor=1") == V5P_128
    assert plan_lib.parse_mesh_text("data=-1") == {"data": -1}
    with pytest.raises(plan_lib.PlanError, match="is not axis=int"):
        plan_lib.parse_mesh_text("data=8,fsdp")


def test_batch_not_divisible_by_data_times_fsdp_is_refused():
    config = load_config("configs/lumiere_base.py:batch=60")
    with pytest.raises(plan_lib.PlanError, match="batch_size=60 is not divisible by data\\*fsdp"):
        plan_lib.plan(config, V5P_128)
