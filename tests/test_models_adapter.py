"""MultiScaleAdapter: user networks returning lists, tuples or dicts of logits, in either order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusionsearch as fs
from fusionsearch.errors import ConfigError, FusionSearchError
from fusionsearch.models import MultiScaleAdapter


class ThreeScaleNet(nn.Module):
    """A toy user network: logits at 1/4, 1/2 and full size, returned in a configurable form."""

    def __init__(self, form: str = "list", finest_first: bool = False, classes: int = 3, in_channels: int = 1):
        super().__init__()
        self.form = form
        self.finest_first = finest_first
        self.body = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.heads = nn.ModuleList(nn.Conv2d(8, classes, 1) for _ in range(3))

    def raw(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The logits coarsest first, computed without any adapter involvement."""
        features = torch.relu(self.body(x))
        return [head(F.avg_pool2d(features, 2**k)) for head, k in zip(self.heads, (2, 1, 0), strict=True)]

    def forward(self, x: torch.Tensor):
        logits = self.raw(x)
        if self.finest_first:
            logits = logits[::-1]
        if self.form == "tuple":
            return tuple(logits)
        if self.form == "dict":  # insertion order deliberately unrelated to scale
            return {"mid": logits[1], "aux_loss": logits[0].mean(), "fine": logits[2], "coarse": logits[0]}
        if self.form == "single":
            return logits[-1]
        return logits


@pytest.mark.parametrize(
    ("form", "finest_first", "order", "keys"),
    [
        ("list", False, "coarsest_first", None),
        ("list", True, "finest_first", None),
        ("tuple", False, "coarsest_first", None),
        ("tuple", True, "finest_first", None),
        ("dict", False, "coarsest_first", ["coarse", "mid", "fine"]),
        ("dict", False, "finest_first", ["fine", "mid", "coarse"]),
    ],
)
def test_adapter_returns_the_networks_logits_coarsest_first(form, finest_first, order, keys):
    torch.manual_seed(0)
    net = ThreeScaleNet(form, finest_first)
    model = MultiScaleAdapter(net, order=order, keys=keys)
    x = torch.randn(2, 1, 16, 16)
    outputs = model(x)
    expected = net.raw(x)
    assert isinstance(outputs, list) and len(outputs) == 3
    for got, want in zip(outputs, expected, strict=True):
        assert torch.equal(got, want)
    assert (model.num_outputs, model.num_classes, model.spatial_dims) == (3, 3, 2)


def test_registered_adapter_builds_from_a_factory_and_trains():
    model = fs.build_model(
        "adapter",
        num_classes=4,
        in_channels=2,
        module=lambda num_classes, in_channels: ThreeScaleNet(classes=num_classes, in_channels=in_channels),
        num_outputs=3,
        spatial_dims=2,
    )
    assert (model.num_outputs, model.num_classes, model.spatial_dims) == (3, 4, 2)
    target = torch.randint(0, 4, (2, 16, 16))
    logits = fs.models.resize_logits(model(torch.randn(2, 2, 16, 16)), (16, 16))
    sum(F.cross_entropy(p, target) for p in logits).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("net", "kwargs", "text"),
    [
        (ThreeScaleNet("single"), {}, "single tensor"),
        (ThreeScaleNet("dict"), {}, "pass keys="),
        (ThreeScaleNet("dict"), {"keys": ["coarse", "middle", "fine"]}, "without the key"),
        (ThreeScaleNet("list"), {"keys": ["a", "b", "c"]}, "not a dict"),
        (ThreeScaleNet("list", finest_first=True), {}, "order='finest_first'"),
        (ThreeScaleNet("list"), {"order": "finest_first"}, "order='coarsest_first'"),
        (ThreeScaleNet("list"), {"num_outputs": 4}, "expected 4"),
        (ThreeScaleNet("list"), {"num_classes": 5}, "num_classes=5"),
        (ThreeScaleNet("list"), {"spatial_dims": 3}, "spatial_dims=3"),
    ],
)
def test_adapter_refuses_outputs_it_cannot_order_safely(net, kwargs, text):
    model = MultiScaleAdapter(net, **kwargs)
    with pytest.raises(FusionSearchError, match=text):
        model(torch.randn(1, 1, 16, 16))


def test_adapter_refuses_non_tensor_entries():
    class Bad(nn.Module):
        def forward(self, x):
            return [x, "not a tensor"]

    with pytest.raises(FusionSearchError, match="output 1 is str"):
        MultiScaleAdapter(Bad())(torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        ((nn.Identity(),), {"order": "random"}, "order"),
        ((nn.Identity(),), {"keys": ["a", "a"]}, "keys"),
        ((nn.Identity(),), {"keys": ["a", "b"], "num_outputs": 3}, "num_outputs"),
        (("my_pkg.Net",), {}, "module"),
    ],
)
def test_adapter_construction_errors(args, kwargs, field):
    with pytest.raises(ConfigError) as info:
        MultiScaleAdapter(*args, **kwargs)
    assert info.value.field == field


def test_registered_adapter_explains_yaml_usage():
    with pytest.raises(ConfigError, match="plugins"):
        fs.build_model("adapter", num_classes=2, module="my_pkg.Net")
