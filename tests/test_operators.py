"""Built-in operators through the vectorised mixer vs. an independent per-term loop; the registry.

The reference here fuses one subset at a time with the textbook formula (torch.cat + a 1x1
convolution for concat, one score convolution per member + softmax for awf, a running sum or
product for the rest), reading the operator modules' parameters in their documented layout.
"""

from __future__ import annotations

import functools
import operator as py_operator

import pytest
import torch
import torch.nn.functional as F
from fusionsearch.operators.awf import AttentionWeightedSum
from fusionsearch.operators.concat import ConcatConv
from fusionsearch.operators.mul import MemberProduct

import fusionsearch as fs
from fusionsearch.compile import compile_space
from fusionsearch.errors import FusionSearchError, UnknownNameError
from fusionsearch.mixer import Mixer
from fusionsearch.operator_api import FusionOperator, describe_operator, parametric, validate_options
from fusionsearch.spec import SearchSpace

BATCH, CLASSES = 2, 3
SPATIAL = {2: (5, 4), 3: (3, 4, 2)}


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution with F.conv2d / F.conv3d; weight [C_out, C_in]."""
    dims = x.dim() - 2
    conv = F.conv2d if dims == 2 else F.conv3d
    return conv(x, weight.reshape(*weight.shape, *([1] * dims)), bias)


def _naive_concat(members, module, position):
    copy = position if module.weight.shape[0] > 1 else 0
    c_out = module.weight.shape[1]
    weight = module.weight[copy].reshape(c_out, -1)  # [C, k*C]: member-major input channels
    return _conv(torch.cat(members, dim=1), weight, module.bias[copy])


def _naive_awf(members, module, position):
    copy = position if module.weight.shape[0] > 1 else 0
    scores = [
        _conv(member, module.weight[copy, j].unsqueeze(0), module.bias[copy, j : j + 1])
        for j, member in enumerate(members)
    ]
    attention = torch.softmax(torch.cat(scores, dim=1), dim=1)
    return sum(attention[:, j : j + 1] * member for j, member in enumerate(members))


NAIVE = {
    "add": lambda members, module, position: functools.reduce(py_operator.add, members),
    "mul": lambda members, module, position: functools.reduce(py_operator.mul, members),
    "mean": lambda members, module, position: functools.reduce(py_operator.add, members) / len(members),
    "max": lambda members, module, position: functools.reduce(torch.maximum, members),
    "concat": _naive_concat,
    "awf": _naive_awf,
}


def naive_mix(mixer: Mixer, logits: list[torch.Tensor]) -> torch.Tensor:
    """All K terms, one at a time, in the order of the graph's term list."""
    graph = mixer.graph
    modules = dict(zip([(g.operator, g.size) for g in graph.groups], mixer.operators.values(), strict=True))
    terms = []
    for term in graph.terms:
        members = [logits[s] for s in term.scales]
        if term.is_original:
            terms.append(members[0])
            continue
        group = next(g for g in graph.groups if g.operator == term.operator and g.size == len(term.scales))
        position = group.subsets.index(term.scales)
        terms.append(NAIVE[term.operator](members, modules[(term.operator, group.size)], position))
    return torch.stack(terms)


def random_logits(num_scales: int, dims: int, dtype=torch.float64, scale: float = 1.0) -> list[torch.Tensor]:
    return [
        (scale * torch.randn(BATCH, CLASSES, *SPATIAL[dims], dtype=dtype)).requires_grad_() for _ in range(num_scales)
    ]


OPERATOR_CASES = [
    ("add", {}),
    ("mul", {}),
    ("mean", {}),
    ("max", {}),
    ("concat", {}),
    ("concat", {"share": "size"}),
    ("awf", {}),
    ("awf", {"share": "subset"}),
]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("num_scales", [2, 3, 4, 5])
@pytest.mark.parametrize(("name", "options"), OPERATOR_CASES, ids=lambda v: str(v) if v else "default")
def test_mixer_matches_naive_loop(name, options, num_scales, dims):
    torch.manual_seed(1000 * num_scales + dims)
    space = SearchSpace.from_dict({"operators": [{"name": name, **options}], "include_originals": True})
    mixer = Mixer(compile_space(space, num_scales, CLASSES, dims)).double()
    logits = random_logits(num_scales, dims)
    params = list(mixer.parameters())

    mixed = mixer(logits)
    expected = naive_mix(mixer, logits)
    assert mixed.shape == (num_scales + 2**num_scales - 1 - num_scales, BATCH, CLASSES, *SPATIAL[dims])
    torch.testing.assert_close(mixed, expected, rtol=1e-12, atol=1e-12)

    upstream = torch.randn_like(mixed)
    got = torch.autograd.grad((mixed * upstream).sum(), logits + params)
    want = torch.autograd.grad((expected * upstream).sum(), logits + params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


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


def test_mixer_uses_only_selected_scales():
    space = SearchSpace.from_dict({"scales": [1, 3], "operators": ["mul"]})
    mixer = Mixer(compile_space(space, 4, CLASSES, 2)).double()
    logits = random_logits(4, 2)
    logits[0] = torch.zeros(1, 1, 1, 1, requires_grad=True)  # unused: any shape is accepted
    mixed = mixer(logits)
    torch.testing.assert_close(mixed, torch.stack([logits[1], logits[3], logits[1] * logits[3]]))
    mixed.sum().backward()
    assert logits[0].grad is None and logits[2].grad is None


def test_mixer_rejects_mismatched_logits():
    mixer = Mixer(compile_space(SearchSpace.from_dict({"operators": ["add"]}), 3, CLASSES, 2))
    logits = random_logits(3, 2, torch.float32)
    with pytest.raises(FusionSearchError, match="Expected 3 logit tensors"):
        mixer(logits[:2])
    with pytest.raises(FusionSearchError, match="P1 has shape"):
        mixer([logits[0], logits[1][:, :2], logits[2]])
    with pytest.raises(FusionSearchError, match="list of 3 tensors"):
        mixer(torch.stack(logits))


def test_mixer_refuses_a_precision_mismatch():
    mixer = Mixer(compile_space(SearchSpace.from_dict({"operators": ["concat"]}), 2, CLASSES, 2))
    with pytest.raises(FusionSearchError, match=r"parameters are torch.float32 .* mixed in torch.float64"):
        mixer(random_logits(2, 2))
    assert mixer(random_logits(2, 2, torch.float16)).dtype == torch.float32


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
    logits = random_logits(2, 2)
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
