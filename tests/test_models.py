"""The multi-scale model contract, for every built-in model: output count, shapes, order, training.

Expected shapes come from the architecture (input size / stride per stage) or from timm's own
feature metadata, never from the model under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fusionsearch as fs
from fusionsearch.errors import ConfigError, FusionSearchError, UnknownNameError
from fusionsearch.models import parameter_counts, resize_logits

# (model, options, spatial_dims, input side, strides of the outputs, coarsest first)
CASES = [
    ("pvt_emcad", {"encoder": "pvt_v2_b0"}, 2, 64, [32, 16, 8, 4]),
    ("pvt_emcad", {"encoder": "pvt_v2_b0", "num_outputs": 2}, 2, 32, [8, 4]),
    ("timm_unet", {"encoder": "test_resnet"}, 2, 64, [16, 8, 4, 2]),
    (
        "timm_unet",
        {"encoder": "test_convnext", "decoder_channels": [32, 16, 16, 8], "num_outputs": 3},
        2,
        64,
        [16, 8, 4],
    ),
    ("small_unet", {"base_channels": 4}, 2, 64, [8, 4, 2, 1]),
    ("small_unet", {"base_channels": 4, "num_outputs": 5}, 2, 48, [16, 8, 4, 2, 1]),
    ("small_unet", {"base_channels": 4, "spatial_dims": 3, "depth": 3}, 3, 16, [8, 4, 2, 1]),
    ("dynunet", {"filters": [4, 8, 8, 16, 16]}, 2, 64, [8, 4, 2, 1]),
    ("dynunet", {"filters": [4, 8, 8, 16], "spatial_dims": 3, "num_outputs": 3}, 3, 16, [4, 2, 1]),
]
IDS = [f"{name}-{i}" for i, (name, *_rest) in enumerate(CASES)]
TRAIN = [0, 2, 3, 4, 6, 7, 8]  # one case per model family and dimension (the others differ only in shape)
NUM_CLASSES = 3


def _build(name: str, options: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return fs.build_model(name, num_classes=NUM_CLASSES, in_channels=1, **options)


@pytest.mark.parametrize(("name", "options", "dims", "side", "strides"), CASES, ids=IDS)
def test_outputs_have_contract_shapes_coarsest_first(name, options, dims, side, strides):
    model = _build(name, options).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 1, *[side] * dims))
    assert isinstance(outputs, list)
    assert model.num_outputs == len(strides) == len(outputs)
    assert model.num_classes == NUM_CLASSES and model.spatial_dims == dims
    expected = [(2, NUM_CLASSES, *[side // s] * dims) for s in strides]
    assert [tuple(o.shape) for o in outputs] == expected


@pytest.mark.parametrize(
    ("name", "options", "dims", "side", "strides"), [CASES[i] for i in TRAIN], ids=[IDS[i] for i in TRAIN]
)
def test_one_training_step_reaches_every_parameter(name, options, dims, side, strides):
    """Every parameter gets a finite gradient; the decoder's are all non-zero; the step moves them.

    (timm ResNets zero-initialise the last BN of each residual branch, which zeroes the gradients of
    that branch's other layers at the first step: encoder gradients may be exactly zero.)
    """
    model = _build(name, options).train()
    x = torch.randn(2, 1, *[side] * dims)
    target = torch.randint(0, NUM_CLASSES, (2, *[side] * dims))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    encoder_ids = {id(p) for p in model.encoder.parameters()}

    logits = resize_logits(model(x), target.shape[1:])
    loss = sum(F.cross_entropy(p, target) for p in logits)
    loss.backward()
    named = list(model.named_parameters())
    assert not [n for n, p in named if p.grad is None], "parameters outside the graph"
    assert all(torch.isfinite(p.grad).all() for _, p in named)
    assert not [n for n, p in named if id(p) not in encoder_ids and not p.grad.any()], "dead decoder parameters"
    optimizer.step()
    moved = [not torch.equal(before[n], p) for n, p in named if p.grad.any()]
    assert moved and all(moved)


def test_small_unet_fits_a_batch():
    """The demo model learns: 15 Adam steps on one batch of blob phantoms halve the multi-scale loss."""
    model = _build("small_unet", {"base_channels": 4, "depth": 3}).train()
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    targets = []
    for cx, cy, radius in [(10, 12, 6), (20, 18, 8), (16, 16, 5), (8, 22, 7)]:
        target = torch.zeros(32, 32, dtype=torch.long)
        target[(cols - cx) ** 2 + (rows - cy) ** 2 < radius**2] = 1
        target[((cols - (32 - cx)).abs() < 3) & ((rows - (32 - cy)).abs() < 5)] = 2
        targets.append(target)
    target = torch.stack(targets)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    x = (0.8 * target.float() + 0.3 * noise).unsqueeze(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = sum(F.cross_entropy(p, target) for p in resize_logits(model(x), (32, 32)))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    ("encoder", "side"),
    [("resnet34", 224), ("convnext_tiny", 224), ("pvt_v2_b0", 96)],
)
def test_timm_unet_follows_the_encoders_feature_strides(encoder, side):
    """Full-size encoders, built on the meta device (no weights, no compute): shapes only."""
    import timm

    with torch.device("meta"):
        reductions = timm.create_model(encoder, features_only=True).feature_info.reduction()
        model = fs.build_model("timm_unet", num_classes=5, encoder=encoder, num_outputs=4)
        outputs = model(torch.empty(1, 1, side, side))
    expected = [(1, 5, side // r, side // r) for r in reductions[::-1][-4:]]
    assert [tuple(o.shape) for o in outputs] == expected


def _naive_linear_weights(out_size: int, in_size: int) -> list[tuple[int, int, float]]:
    """Half-pixel-centre linear interpolation (align_corners=False), edges clamped, as a loop."""
    taps = []
    for i in range(out_size):
        source = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
        low = min(int(math.floor(source)), in_size - 1)
        high = min(low + 1, in_size - 1)
        taps.append((low, high, source - low))
    return taps


def _naive_resize(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    result = array.astype(np.float64)
    for axis, out_size in enumerate(size):
        taps = _naive_linear_weights(out_size, result.shape[axis])
        moved = np.moveaxis(result, axis, 0)
        resized = np.stack([(1 - w) * moved[lo] + w * moved[hi] for lo, hi, w in taps])
        result = np.moveaxis(resized, 0, axis)
    return result


@pytest.mark.parametrize(
    ("shape", "size"),
    [((3, 4), (5, 7)), ((6, 5), (4, 9)), ((2, 3, 2), (3, 4, 5)), ((4, 2, 3), (2, 5, 3))],
)
def test_resize_logits_is_half_pixel_linear_interpolation(shape, size):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, *shape, generator=generator, dtype=torch.float64)
    resized = resize_logits([logits], size)[0]
    assert resized.shape == (2, 3, *size)
    for b in range(2):
        for c in range(3):
            expected = _naive_resize(logits[b, c].numpy(), size)
            np.testing.assert_allclose(resized[b, c].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_resize_logits_keeps_maps_already_at_size_and_rejects_wrong_dims():
    same = torch.randn(1, 2, 8, 8)
    assert resize_logits([same], torch.Size([8, 8]))[0] is same
    with pytest.raises(FusionSearchError, match="spatial_dims must match"):
        resize_logits([same], (8, 8, 8))


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UnknownNameError) as info:
        fs.build_model("pvt_emcd", num_classes=2)
    message = str(info.value)
    assert "Did you mean 'pvt_emcad'" in message
    for name in ("adapter", "dynunet", "pvt_emcad", "small_unet", "timm_unet"):
        assert name in message


@pytest.mark.parametrize(
    ("name", "options", "field", "text"),
    [
        ("small_unet", {"base_chanels": 8}, "base_chanels", "Did you mean 'base_channels'"),
        ("dynunet", {"deep_supr_num": 3}, "deep_supr_num", "Valid options of 'dynunet'"),
        ("small_unet", {"depth": 2, "num_outputs": 4}, "num_outputs", "1 to 3 outputs"),
        ("small_unet", {"spatial_dims": 4}, "spatial_dims", "must be 2 or 3"),
        ("timm_unet", {"encoder": "resnet_34"}, "encoder", "resnet34"),
        ("timm_unet", {"encoder": "test_resnet", "decoder_channels": [8, 8]}, "decoder_channels", "needs 5"),
        ("dynunet", {"num_outputs": 5, "levels": 5}, "levels", "levels >= 6"),
        ("adapter", {}, "module", "needs the option"),
    ],
)
def test_bad_options_are_config_errors_naming_the_field(name, options, field, text):
    with pytest.raises(ConfigError) as info:
        fs.build_model(name, num_classes=2, **options)
    assert info.value.field == field
    assert text in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"num_classes": 0}, "num_classes"), ({"num_classes": 2, "in_channels": 0}, "in_channels")],
)
def test_bad_common_arguments(kwargs, field):
    with pytest.raises(ConfigError) as info:
        fs.build_model("small_unet", **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize("name", ["small_unet", "dynunet"])
def test_models_without_weights_refuse_pretrained(name):
    with pytest.raises(ConfigError, match="no pretrained weights"):
        fs.build_model(name, num_classes=2, pretrained=True)


def test_a_plugin_returning_a_bare_module_is_told_about_the_adapter():
    from fusionsearch.registry import MODELS, register_model

    register_model("test_bare_module", lambda num_classes, in_channels=1, pretrained=False: torch.nn.Identity())
    try:
        with pytest.raises(FusionSearchError, match="MultiScaleAdapter"):
            fs.build_model("test_bare_module", num_classes=2)
    finally:
        MODELS.unregister("test_bare_module")


@pytest.mark.parametrize(("name", "side", "text"), [("small_unet", 8, "at least 16"), ("dynunet", 40, "divisible")])
def test_too_small_or_indivisible_inputs_are_explained(name, side, text):
    model = _build(name, {"filters": [4, 8, 8, 16, 16]} if name == "dynunet" else {"base_channels": 4})
    with pytest.raises(FusionSearchError, match=text):
        model(torch.randn(1, 1, side, side))


def _double_conv_parameters(c_in: int, c_out: int) -> int:
    """Two bias-free 3x3 convolutions, each followed by a BatchNorm (scale and shift)."""
    return c_in * c_out * 9 + 2 * c_out + c_out * c_out * 9 + 2 * c_out


def test_parameter_counts_match_the_closed_form_small_unet():
    model = _build("small_unet", {"base_channels": 4, "depth": 2, "num_outputs": 3})
    widths = [4, 8, 16]
    encoder = _double_conv_parameters(1, 4) + _double_conv_parameters(4, 8) + _double_conv_parameters(8, 16)
    decoder = _double_conv_parameters(16 + 8, 8) + _double_conv_parameters(8 + 4, 4)
    decoder += sum(c * NUM_CLASSES + NUM_CLASSES for c in widths)  # a 1x1 head with bias per stage
    assert parameter_counts(model) == {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}
