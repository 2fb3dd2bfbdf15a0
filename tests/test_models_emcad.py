"""pvt_emcad against the EMCAD paper: size of the reference model, output strides, and the structure
of its blocks (checked through closed-form parameter counts, attention-map shapes and receptive fields)."""

from __future__ import annotations

import math

import pytest
import torch

import fusionsearch as fs
from fusionsearch.models import parameter_counts
from fusionsearch.models.emcad import LGAG, MSCB, ChannelAttention, SpatialAttention, channel_shuffle

EMCAD_B2_PARAMETERS = 26.76e6  # EMCAD paper, PVTv2-B2 + EMCAD
PVT_V2_B2_PARAMETERS = 24_849_856  # timm pvt_v2_b2, features only


def _mscam(c: int, expansion: int = 2, kernels: tuple[int, ...] = (1, 3, 5)) -> int:
    hidden = expansion * c
    channel_attention = 2 * c * max(1, c // 16)  # two bias-free 1x1 convs through the bottleneck
    spatial_attention = 2 * 7 * 7  # one bias-free 7x7 conv, 2 -> 1 maps
    expand = c * hidden + 2 * hidden  # 1x1 conv + BN
    depthwise = sum(hidden * k * k + 2 * hidden for k in kernels)  # depthwise conv + BN per kernel
    project = hidden * c + 2 * c  # 1x1 conv + BN
    return channel_attention + spatial_attention + expand + depthwise + project


def _eucb(c_in: int, c_out: int) -> int:
    return c_in * 9 + 2 * c_in + c_in * c_out + c_out  # depthwise 3x3 + BN, 1x1 conv with bias


def _lgag(c: int) -> int:
    inner = c // 2
    grouped = inner * (c // inner) * 9 + 2 * inner  # bias-free grouped 3x3 conv (groups = inner) + BN
    return 2 * grouped + inner + 2  # gate and skip branches, bias-free 1x1 conv to one map + BN


def _closed_form_decoder(channels: list[int], classes: int, in_channels: int) -> int:
    """Decoder (plus grey stem and heads) from the paper's block description, coarsest channels first."""
    total = sum(_mscam(c) for c in channels)
    total += sum(_eucb(a, b) + _lgag(b) for a, b in zip(channels, channels[1:], strict=False))
    total += sum(c * classes + classes for c in channels)  # one 1x1 head with bias per stage
    if in_channels != 3:
        total += in_channels * 3 + 2 * 3  # bias-free 1x1 conv to 3 channels + BN
    return total


@pytest.fixture(scope="module")
def reference_model():
    with torch.device("meta"):  # shapes and counts only: no weight initialisation, no compute
        return fs.build_model("pvt_emcad", num_classes=9, in_channels=1)


def test_reference_model_size_matches_emcad_b2(reference_model):
    counts = parameter_counts(reference_model)
    print(f"pvt_emcad parameters: {counts}")
    assert counts["encoder"] == PVT_V2_B2_PARAMETERS
    assert abs(counts["total"] - EMCAD_B2_PARAMETERS) / EMCAD_B2_PARAMETERS < 0.02
    assert counts["decoder"] == _closed_form_decoder([512, 320, 128, 64], classes=9, in_channels=1)


def test_reference_model_outputs_at_224(reference_model):
    outputs = reference_model(torch.empty(2, 1, 224, 224, device="meta"))
    assert [tuple(o.shape) for o in outputs] == [(2, 9, 7, 7), (2, 9, 14, 14), (2, 9, 28, 28), (2, 9, 56, 56)]


@pytest.mark.parametrize(("classes", "in_channels"), [(4, 1), (14, 3), (2, 2)])
def test_small_encoder_decoder_size_matches_closed_form(classes, in_channels):
    with torch.device("meta"):
        model = fs.build_model("pvt_emcad", num_classes=classes, in_channels=in_channels, encoder="pvt_v2_b0")
    assert parameter_counts(model)["decoder"] == _closed_form_decoder([256, 160, 64, 32], classes, in_channels)


@pytest.mark.parametrize(("height", "width"), [(72, 88), (100, 64)])
def test_any_input_size_decodes_at_the_encoders_feature_sizes(height, width):
    """PVTv2 embeds patches with a stride-4 7x7 conv and downsamples with stride-2 3x3 convs (padding
    keeps ceil sizes), so the feature sides are ceil(H/4), then halved with ceiling."""

    def sides(n: int) -> list[int]:
        out = [math.ceil(n / 4)]
        for _ in range(3):
            out.append(math.ceil(out[-1] / 2))
        return out[::-1]

    with torch.device("meta"):
        model = fs.build_model("pvt_emcad", num_classes=3, encoder="pvt_v2_b0")
        outputs = model(torch.empty(1, 1, height, width))
    expected = [(1, 3, h, w) for h, w in zip(sides(height), sides(width), strict=True)]
    assert [tuple(o.shape) for o in outputs] == expected


@pytest.mark.parametrize(("channels", "groups"), [(6, 2), (6, 3), (8, 4), (12, 6)])
def test_channel_shuffle_interleaves_groups(channels, groups):
    x = torch.arange(channels, dtype=torch.float32).view(1, channels, 1, 1).expand(2, channels, 3, 3)
    per_group = channels // groups
    expected_order = [g * per_group + i for i in range(per_group) for g in range(groups)]
    assert channel_shuffle(x, groups)[0, :, 0, 0].tolist() == expected_order


def _ratio(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return out / x


def test_channel_attention_scales_whole_channels():
    torch.manual_seed(0)
    x = torch.rand(2, 32, 5, 6) + 0.5
    ratio = _ratio(ChannelAttention(32)(x), x)
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), atol=1e-6)  # one factor per channel
    assert ((ratio > 0) & (ratio < 1)).all()


def test_spatial_attention_scales_whole_pixels():
    torch.manual_seed(0)
    x = torch.rand(2, 16, 5, 6) + 0.5
    ratio = _ratio(SpatialAttention()(x), x)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-6)  # one factor per pixel
    assert ((ratio > 0) & (ratio < 1)).all()


def test_attention_gate_scales_the_skip_per_pixel():
    torch.manual_seed(0)
    gate, skip = torch.randn(2, 16, 6, 6), torch.rand(2, 16, 6, 6) + 0.5
    module = LGAG(16).eval()
    ratio = _ratio(module(gate, skip), skip)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-6)
    assert ((ratio > 0) & (ratio < 1)).all()


@pytest.mark.parametrize(("kernels", "radius"), [((1, 3, 5), 2), ((1, 3), 1), ((3, 7), 3)])
def test_multi_scale_block_sees_its_largest_kernel(kernels, radius):
    """An output pixel of the MSCB depends exactly on the input window of its largest depthwise kernel.

    (Gradients are pooled over a batch of random inputs, so that a ReLU6 that happens to be inactive
    at some pixel for one input cannot hide that pixel.)"""
    torch.manual_seed(0)
    block = MSCB(4, 6, kernels).eval()
    x = torch.randn(16, 4, 11, 11, requires_grad=True)
    block(x)[:, :, 5, 5].sum().backward()
    reached = x.grad.abs().sum(dim=(0, 1)) > 0
    expected = torch.zeros(11, 11, dtype=torch.bool)
    expected[5 - radius : 6 + radius, 5 - radius : 6 + radius] = True
    assert torch.equal(reached, expected)


def test_grey_stem_only_for_non_rgb_inputs():
    with torch.device("meta"):
        grey = fs.build_model("pvt_emcad", num_classes=2, in_channels=1, encoder="pvt_v2_b0")
        rgb = fs.build_model("pvt_emcad", num_classes=2, in_channels=3, encoder="pvt_v2_b0")
    assert grey.stem[0].in_channels == 1 and grey.stem[0].out_channels == 3
    assert isinstance(rgb.stem, torch.nn.Identity)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"num_outputs": 5}, "num_outputs"),
        ({"kernel_sizes": [1, 4]}, "kernel_sizes"),
        ({"lgag_kernel": 2}, "lgag_kernel"),
    ],
)
def test_bad_emcad_options(options, field):
    with pytest.raises(fs.ConfigError) as info, torch.device("meta"):
        fs.build_model("pvt_emcad", num_classes=2, encoder="pvt_v2_b0", **options)
    assert info.value.field == field
