"""Operator implementations (analytic backwards, parameters, initialisation), the operator
interface (stateless functions, parametric modules and factories, options) and the registry."""

from __future__ import annotations

import pytest
import torch
from fusionsearch.operators.awf import AttentionWeightedSum
from fusionsearch.operators.concat import ConcatConv
from fusionsearch.operators.mul import MemberProduct

import fusionsearch as fs
from fusionsearch.compile import compile_space
from fusionsearch.errors import FusionSearchError, UnknownNameError
from fusionsearch.mixer import Mixer
from fusionsearch.operator_api import (
    FusionOperator,
    describe_operator,
    has_stack_path,
    parametric,
    pixel_blocks,
    validate_options,
)
from fusionsearch.spec import SearchSpace

CLASSES = 3


@pytest.mark.parametrize("copies", ["shared", "per_subset"])
@pytest.mark.parametrize("function", ["mul", "awf", "concat"])
def test_analytic_backward_passes_gradcheck(function, copies):
    torch.manual_seed(11)
    n, k, b, c, s = 3, 3, 2, 2, 5
    g = 1 if copies == "shared" else n
    x = torch.randn(n, k, b, c, s, dtype=torch.float64, requires_grad=True)
    if function == "mul":
        inputs, apply = (x,), MemberProduct.apply
    elif function == "awf":
        inputs, apply = (
            (x, torch.randn(g, k, c, dtype=torch.float64), torch.randn(g, k, dtype=torch.float64)),
            (AttentionWeightedSum.apply),
        )
    else:
        inputs, apply = (
            (x, torch.randn(g, c, k, c, dtype=torch.float64), torch.randn(g, c, dtype=torch.float64)),
            (ConcatConv.apply),
        )
    inputs = tuple(t.requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(apply, inputs)


@pytest.mark.parametrize("block_elements", [1 << 20, 100], ids=["one_block", "several_blocks"])
@pytest.mark.parametrize(
    "operator",
    ["add", "mean", "mul", "concat", {"name": "concat", "share": "size"}, "awf", {"name": "awf", "share": "subset"}],
    ids=str,
)
def test_stack_path_backward_passes_gradcheck(operator, block_elements, monkeypatch):
    """The stack paths' analytic backwards (stack gradient through the shared accumulator, parameters)."""
    monkeypatch.setattr("fusionsearch.operator_api.CPU_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr("fusionsearch.operator_api.CPU_BLOCK_ELEMENTS_KEPT_MEMORY", block_elements)
    torch.manual_seed(12)
    space = SearchSpace.from_dict({"operators": [operator], "include_originals": False})
    mixer = Mixer(compile_space(space, 3, 2, 2)).double()
    assert all(has_stack_path(module) for module in mixer.operators.values())
    names = [name for name, _ in mixer.named_parameters()]
    logits = [torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    params = [p.detach().clone().requires_grad_() for p in mixer.parameters()]

    def mix(*tensors):
        return torch.func.functional_call(mixer, dict(zip(names, tensors[3:], strict=True)), (list(tensors[:3]),))

    assert torch.autograd.gradcheck(mix, (*logits, *params))


def test_parametric_operators_own_the_documented_parameters():
    space = SearchSpace.from_dict({"operators": ["concat", {"name": "awf"}, {"name": "max"}]})
    mixer = Mixer(compile_space(space, 4, 9, 2))
    shapes = {k: [tuple(p.shape) for p in m.parameters()] for k, m in mixer.operators.items()}
    # concat: one 1x1 conv k*C -> C with bias per subset; awf: one C -> 1 conv per member position per size
    assert shapes["concat_k2"] == [(6, 9, 2, 9), (6, 9)]
    assert shapes["concat_k4"] == [(1, 9, 4, 9), (1, 9)]
    assert shapes["awf_k3"] == [(1, 3, 9), (1, 3)]
    assert shapes["max_k2"] == []


def test_parameter_initialisation_follows_torch_rng():
    space = SearchSpace.from_dict({"operators": ["concat", "awf"]})
    graph = compile_space(space, 3, 4, 2)
    torch.manual_seed(7)
    first = [p.clone() for p in Mixer(graph).parameters()]
    torch.manual_seed(7)
    second = list(Mixer(graph).parameters())
    torch.manual_seed(8)
    third = list(Mixer(graph).parameters())
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, third, strict=True))
    # torch's Conv default bound 1/sqrt(fan_in): concat fan_in = k*C, awf fan_in = C
    concat_k2 = first[0]
    assert concat_k2.abs().max() <= 1 / (2 * 4) ** 0.5


# -- operator interface and registry ---------------------------------------------------------------


@pytest.fixture
def temporary_operators():
    """Names registered by a test are removed afterwards (the registry is process-wide)."""
    names: list[str] = []
    yield names
    for name in names:
        fs.OPERATORS.unregister(name)


def test_stateless_operator_with_an_option(temporary_operators):
    @fs.register_operator("test_power_mean")
    def power_mean(x, p: float = 2.0):
        """Power mean of the members."""
        return x.abs().pow(p).mean(1).pow(1 / p)

    temporary_operators.append("test_power_mean")
    space = SearchSpace.from_dict({"operators": [{"name": "test_power_mean", "p": 3}], "include_originals": False})
    mixer = Mixer(compile_space(space, 2, CLASSES, 2)).double()
    logits = [torch.randn(2, CLASSES, 5, 4, dtype=torch.float64) for _ in range(2)]
    want = ((logits[0].abs() ** 3 + logits[1].abs() ** 3) / 2) ** (1 / 3)
    torch.testing.assert_close(mixer(logits)[0], want)
    info = describe_operator("test_power_mean")
    assert not info.parametric and list(info.options) == ["p"] and info.summary == "Power mean of the members."


def test_parametric_factory_function(temporary_operators):
    built = []

    @fs.register_operator("test_scaled_max")
    @parametric
    def scaled_max(k, num_classes, spatial_dims, n_subsets, factor: float = 2.0):
        """Max of the members times a learnable factor."""
        built.append((k, num_classes, spatial_dims, n_subsets))
        module = torch.nn.Module()
        module.factor = torch.nn.Parameter(torch.tensor(factor))
        module.forward = lambda x: module.factor * x.amax(1)
        return module

    temporary_operators.append("test_scaled_max")
    space = SearchSpace.from_dict({"operators": [{"name": "test_scaled_max", "factor": 3.0}]})
    Mixer(compile_space(space, 3, CLASSES, 3))
    assert built == [(2, CLASSES, 3, 3), (3, CLASSES, 3, 1)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"shar": "size"}, "has no option 'shar' (its options: share)"),
        ({"share": "pixel"}, "option 'share': Input should be 'subset' or 'size'"),
    ],
)
def test_option_validation(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_options("concat", options)


def test_duplicate_name_raises_unless_override(temporary_operators):
    class First(FusionOperator):
        """First."""

    class Second(FusionOperator):
        """Second."""

    fs.register_operator("test_dup", First)
    temporary_operators.append("test_dup")
    with pytest.raises(FusionSearchError, match="already registered"):
        fs.register_operator("test_dup", Second)
    assert fs.OPERATORS.get("test_dup") is First
    fs.register_operator("test_dup", Second, override=True)
    assert fs.OPERATORS.get("test_dup") is Second
    with pytest.raises(FusionSearchError, match="already registered"):
        fs.register_operator("add", Second)


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(UnknownNameError) as info:
        fs.OPERATORS.get("concta")
    message = str(info.value)
    assert "Did you mean 'concat'?" in message
    for name in ("add", "awf", "concat", "max", "mean", "mul"):
        assert name in message


def test_builtins_are_listed():
    assert {"add", "mul", "concat", "awf", "mean", "max"} <= set(fs.list_operators())
    assert describe_operator("concat").parametric and not describe_operator("mul").parametric


@pytest.mark.parametrize(
    ("memory_kept", "blocks"),
    [
        (False, 30),  # 4 MiB blocks, 5 per sample: glibc recycles small temporaries, faults big ones in afresh
        (True, 1),  # freed memory kept: one block, fewer and larger operations
    ],
)
def test_cpu_block_size_follows_the_allocator(memory_kept, blocks, monkeypatch):
    monkeypatch.setattr("fusionsearch.operator_api.memory_is_kept", lambda: memory_kept)
    # B=6 samples of 224x224 pixels with 100 elements of temporaries per pixel
    got = pixel_blocks(6, 224 * 224, 100, torch.device("cpu"))
    assert len(got) == blocks
    covered = torch.zeros(6, 224 * 224, dtype=torch.int64)
    for samples, pixels in got:
        covered[samples, pixels] += 1
    assert bool((covered == 1).all())
    assert pixel_blocks(6, 224 * 224, 100, torch.device("meta")) == [(slice(None), slice(None))]  # off the CPU
