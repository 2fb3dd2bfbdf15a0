"""The vectorised mixer vs. an independent per-term loop, for every built-in operator.

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
from torch.utils._python_dispatch import TorchDispatchMode

from fusionsearch.compile import compile_space
from fusionsearch.errors import FusionSearchError
from fusionsearch.mixer import Mixer
from fusionsearch.operator_api import has_stack_path
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


class RecordOps(TorchDispatchMode):
    """Counts the aten operators that run."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


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


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("num_scales", [3, 4])
def test_all_operators_in_one_mixer_share_gathers(num_scales, dims):
    torch.manual_seed(num_scales + 10 * dims)
    operators = ["add", "mul", {"name": "awf", "share": "subset"}, "concat", "mean", "max"]
    space = SearchSpace.from_dict({"scales": "all", "operators": operators})
    mixer = Mixer(compile_space(space, num_scales, CLASSES, dims)).double()
    gathers = {name for name, _ in mixer.named_buffers() if name.startswith("gather_index_")}
    assert len(gathers) == num_scales - 1  # one per subset size, shared by the six operators
    logits = random_logits(num_scales, dims)
    params = list(mixer.parameters())
    mixed, expected = mixer(logits), naive_mix(mixer, logits)
    torch.testing.assert_close(mixed, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(mixed)
    got = torch.autograd.grad((mixed * upstream).sum(), logits + params)
    want = torch.autograd.grad((expected * upstream).sum(), logits + params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


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


def _check_against_naive(mixer: Mixer, logits: list[torch.Tensor]) -> None:
    params = list(mixer.parameters())
    mixed, expected = mixer(logits), naive_mix(mixer, logits)
    torch.testing.assert_close(mixed, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(mixed)
    got = torch.autograd.grad((mixed * upstream).sum(), logits + params)
    want = torch.autograd.grad((expected * upstream).sum(), logits + params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


SHARING = {
    "default": ["concat", "awf"],
    "other": [{"name": "concat", "share": "size"}, {"name": "awf", "share": "subset"}],
}


@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("block_elements", [1, 40, 700], ids=["pixel_blocks", "small_blocks", "sample_blocks"])
def test_stack_paths_in_blocks_match_naive_loop(block_elements, dims, sharing, monkeypatch):
    """The CPU stack paths walk the pixels in blocks; tiny blocks exercise every way of cutting them."""
    monkeypatch.setattr("fusionsearch.operator_api.CPU_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr("fusionsearch.operator_api.CPU_BLOCK_ELEMENTS_KEPT_MEMORY", block_elements)
    torch.manual_seed(block_elements + dims)
    space = SearchSpace.from_dict({"operators": ["add", "mul", "mean", *SHARING[sharing]]})
    _check_against_naive(Mixer(compile_space(space, 4, CLASSES, dims)).double(), random_logits(4, dims))


@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("num_scales", [2, 3, 4])
def test_plain_operator_interface_of_builtins_matches_naive_loop(num_scales, dims, sharing, monkeypatch):
    """With the stack paths switched off, the built-ins' x: [n, k, B, C, *S] forwards give the same terms."""
    monkeypatch.setattr("fusionsearch.mixer.has_stack_path", lambda operator: False)
    torch.manual_seed(7 * num_scales + dims)
    space = SearchSpace.from_dict({"operators": ["add", "mul", "mean", "max", *SHARING[sharing]]})
    mixer = Mixer(compile_space(space, num_scales, CLASSES, dims)).double()
    with RecordOps() as recorder:
        _check_against_naive(mixer, random_logits(num_scales, dims))
    assert "index_select" in recorder.ops and "mm" not in recorder.ops  # gathered members, no stack GEMMs


def test_subclass_overriding_forward_uses_the_plain_interface():
    from fusionsearch.operators.concat import Concat

    class DoubledConcat(Concat):
        def forward(self, x):
            return 2 * super().forward(x)

    space = SearchSpace.from_dict({"operators": ["concat"], "include_originals": False})
    mixer = Mixer(compile_space(space, 2, CLASSES, 2)).double()
    logits = random_logits(2, 2)
    plain = mixer(logits)
    module = mixer.operators["concat_k2"]
    module.__class__ = DoubledConcat
    assert has_stack_path(Concat(2, CLASSES, 2, 1)) and not has_stack_path(module)
    torch.testing.assert_close(mixer(logits), 2 * plain)


def test_repeated_and_partial_backward_passes(monkeypatch):
    """retain_graph: each pass gets exactly its own gradient, also after a pass that skipped the logits."""
    torch.manual_seed(3)
    space = SearchSpace.from_dict({"operators": ["add", "mul", "concat", "awf"]})
    mixer = Mixer(compile_space(space, 3, CLASSES, 2)).double()
    logits = random_logits(3, 2)
    params = list(mixer.parameters())
    total = (mixer(logits) * torch.randn(3 + 4 * 4, BATCH, CLASSES, *SPATIAL[2], dtype=torch.float64)).sum()
    first = torch.autograd.grad(total, logits + params, retain_graph=True)
    only_params = torch.autograd.grad(total, params, retain_graph=True)  # never reaches the logits
    second = torch.autograd.grad(total, logits + params)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(first[3:], only_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_recycled_outputs_are_views_of_one_buffer_and_stale_ones_are_refused():
    torch.manual_seed(4)
    space = SearchSpace.from_dict({"operators": ["add", "mul", "concat", "awf"], "include_originals": False})
    mixer = Mixer(compile_space(space, 3, CLASSES, 2)).double()
    logits = random_logits(3, 2)
    expected = naive_mix(mixer, logits)
    upstream = torch.randn_like(expected)
    stacked, context = mixer.stack(logits, recycle_outputs=True)
    scores, bases, start = [], set(), 0
    for block in mixer.iter_parts(stacked, context):  # consumed (nothing saved) before the next one
        end = start + block.shape[0]
        torch.testing.assert_close(block, expected[start:end], rtol=1e-12, atol=1e-12)
        scores.append((block * upstream[start:end]).sum())
        bases.add(block._base.data_ptr())
        start = end
    assert len(bases) == 1 and start == len(expected)
    got = torch.autograd.grad(sum(scores), logits)
    want = torch.autograd.grad((expected * upstream).sum(), logits)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)

    stacked, context = mixer.stack(logits, recycle_outputs=True)
    blocks = list(mixer.iter_parts(stacked, context))  # kept: all but the last were overwritten
    with pytest.raises(RuntimeError, match="modified inplace"):
        (blocks[0] * 2).sum().backward()
