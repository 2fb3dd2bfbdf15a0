"""dynunet against MONAI's own DynUNet forward: the list must hold exactly what DynUNet computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusionsearch as fs

CASES = [(2, 32, [4, 8, 8, 16, 16], 4), (2, 64, [4, 4, 8, 8, 16, 16], 5), (3, 16, [4, 8, 8, 16], 3)]
IDS = ["2d-L4", "2d-L5", "3d-L3"]


def _build(dims: int, filters: list[int], outputs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return fs.build_model("dynunet", num_classes=3, spatial_dims=dims, filters=filters, num_outputs=outputs)


def _input(dims: int, side: int) -> torch.Tensor:
    return torch.randn(2, 1, *[side] * dims, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("dims", "side", "filters", "outputs"), CASES, ids=IDS)
def test_train_mode_matches_monais_stacked_deep_supervision(dims, side, filters, outputs):
    model = _build(dims, filters, outputs).train()
    x = _input(dims, side)
    ours = model(x)
    stacked = model.net(x)  # MONAI: [B, 1 + k, C, *S], full resolution first, heads upsampled (nearest)
    assert stacked.shape == (2, outputs, 3, *[side] * dims)
    assert len(ours) == outputs
    assert [o.shape[-1] for o in ours] == [side // 2**k for k in reversed(range(outputs))]
    for index, logits in enumerate(reversed(ours)):  # finest first, as MONAI stacks them
        upsampled = F.interpolate(logits, size=[side] * dims)  # MONAI's default mode: nearest
        torch.testing.assert_close(upsampled, stacked[:, index], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("dims", "side", "filters", "outputs"), CASES, ids=IDS)
def test_eval_mode_gives_all_outputs_deterministically(dims, side, filters, outputs):
    model = _build(dims, filters, outputs).eval()
    x = _input(dims, side)
    with torch.no_grad():
        first, second = model(x), model(x)
        plain = model.net(x)  # eval mode: DynUNet returns the final map only
    assert not model.training and not any(m.training for m in model.modules())
    assert len(first) == outputs
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert plain.shape == (2, 3, *[side] * dims)
    torch.testing.assert_close(first[-1], plain, rtol=0, atol=0)


@pytest.mark.parametrize("side", [24, 16])
def test_inputs_the_network_cannot_take_are_explained(side):
    model = _build(2, [4, 8, 8, 16, 16], 4)
    with pytest.raises(fs.FusionSearchError, match="divisible by 16, one of them at least 32"):
        model(torch.randn(1, 1, side, side))


def test_model_stays_deep_copyable_after_a_training_forward():
    import copy

    model = _build(2, [4, 8, 8, 16, 16], 4).train()
    outputs = model(_input(2, 32))
    clone = copy.deepcopy(model)  # e.g. to keep the best weights; fails if graph tensors stay attached
    assert len(outputs) == 4 and len(clone.net.heads) == 3


def test_dynunet_needs_deep_supervision():
    with pytest.raises(fs.ConfigError, match="num_outputs >= 2"):
        fs.build_model("dynunet", num_classes=2, num_outputs=1)
