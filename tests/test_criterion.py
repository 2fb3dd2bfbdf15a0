"""The criterion end to end vs. a naive per-term loop with CE and Dice written from the formula.

Reference Dice (DESIGN.md): softmax, one-hot target, per class over the whole batch,
1 - (2*sum(p*t) + 1e-5) / (sum(p^2) + sum(t^2) + 1e-5), background included, mean over classes.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_mixer import naive_mix
from torch.utils._python_dispatch import TorchDispatchMode

import fusionsearch as fs
from fusionsearch.errors import FusionSearchError
from fusionsearch.spec import SearchSpace

PLUGINS = Path(__file__).parent / "plugins"
BATCH, CLASSES = 2, 3
SPATIAL = {2: (6, 5), 3: (4, 3, 3)}


def naive_term_loss(z: torch.Tensor, target: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """beta * CE + gamma * reference Dice of one term, class by class."""
    ce = -torch.log_softmax(z, dim=1).gather(1, target.unsqueeze(1)).mean()
    p = torch.softmax(z, dim=1)
    dice_per_class = []
    for c in range(z.shape[1]):
        t = (target == c).to(z.dtype)
        intersection = (p[:, c] * t).sum()
        denominator = (p[:, c] ** 2).sum() + (t**2).sum()
        dice_per_class.append(1 - (2 * intersection + 1e-5) / (denominator + 1e-5))
    return beta * ce + gamma * torch.stack(dice_per_class).mean()


def naive_weights(space_name: str, k: int, num_scales: int) -> torch.Tensor:
    """The weights each bundled space starts with, from their definitions."""
    if space_name == "lomix":  # softplus(alpha = 0)
        return torch.full((k,), math.log(2.0), dtype=torch.float64)
    if space_name == "nnunet":  # 1/2^(L-1-i), coarsest dropped, normalised
        raw = torch.tensor([0.0] + [0.5 ** (num_scales - 1 - i) for i in range(1, num_scales)], dtype=torch.float64)
        return raw / raw.sum()
    return torch.ones(k, dtype=torch.float64)


def random_inputs(num_scales: int, dims: int, dtype=torch.float64):
    logits = [torch.randn(BATCH, CLASSES, *SPATIAL[dims], dtype=dtype).requires_grad_() for _ in range(num_scales)]
    target = torch.randint(0, CLASSES, (BATCH, *SPATIAL[dims]))
    return logits, target


CASES = [("lomix", L, dims) for L in (2, 3, 4, 5) for dims in (2, 3)] + [
    (name, 4, dims) for name in ("powerset_add", "deep_supervision", "nnunet") for dims in (2, 3)
]


# the fused (analytic backward) loss everywhere; the plain-autograd fallback on a few cases
CASES = [(*case, True) for case in CASES] + [("lomix", 3, 2, False), ("lomix", 3, 3, False), ("nnunet", 4, 2, False)]


@pytest.mark.parametrize(("space_name", "num_scales", "dims", "fused"), CASES)
def test_criterion_matches_naive_loop(space_name, num_scales, dims, fused):
    torch.manual_seed(num_scales * 10 + dims)
    space = SearchSpace.from_dict(
        {**fs.load_space(space_name).to_dict(), "loss": {"ce": 0.3, "dice": 0.7, "fused": fused}}
    )
    crit = fs.build_criterion(space, num_scales, CLASSES, dims).double()
    logits, target = random_inputs(num_scales, dims)
    params = list(crit.parameters())

    out = crit(logits, target)
    mixed = naive_mix(crit.mixer, logits)
    losses = torch.stack([naive_term_loss(z, target, 0.3, 0.7) for z in mixed])
    weights = naive_weights(space_name, len(losses), num_scales)
    total = (weights * losses).sum()

    assert out.terms == crit.terms == crit.graph.names
    torch.testing.assert_close(out.losses, losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.weights.double(), weights, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.total, total, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(crit.effective_weights().double(), weights, rtol=1e-6, atol=1e-12)

    got = torch.autograd.grad(out.total, logits + params)
    want = torch.autograd.grad(total, logits + params, allow_unused=True)
    for name, g, w in zip(["logits"] * num_scales + ["param"] * len(params), got, want, strict=True):
        if w is None:  # the weighting's own parameters: checked below
            continue
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-12, msg=name)


def test_softplus_weight_gradient_is_sigmoid_times_loss():
    torch.manual_seed(0)
    crit = fs.build_criterion("lomix", 3, CLASSES, 2).double()
    logits, target = random_inputs(3, 2)
    out = crit(logits, target)
    (alpha,) = [p for name, p in crit.named_parameters() if name.startswith("weighting.")]
    (grad,) = torch.autograd.grad(out.total, [alpha])
    torch.testing.assert_close(grad, torch.sigmoid(alpha.detach()) * out.losses.detach())


def test_logits_are_resized_to_the_label():
    torch.manual_seed(3)
    crit = fs.build_criterion("powerset_add", 3, CLASSES, 2).double()
    logits = [torch.randn(BATCH, CLASSES, 2**i, 2**i, dtype=torch.float64, requires_grad=True) for i in (1, 2, 3)]
    target = torch.randint(0, CLASSES, (BATCH, 8, 8))
    resized = [F.interpolate(z, size=(8, 8), mode="bilinear", align_corners=False) for z in logits]
    expected = naive_mix(crit.mixer, resized)
    torch.testing.assert_close(crit.mix(logits, size=(8, 8)), expected)
    out = crit(logits, target)
    torch.testing.assert_close(out.losses, torch.stack([naive_term_loss(z, target, 0.3, 0.7) for z in expected]))


def test_last_layer_computes_only_the_finest_term():
    torch.manual_seed(4)
    crit = fs.build_criterion("last_layer", 4, CLASSES, 2).double()
    logits, target = random_inputs(4, 2)
    logits[0] = torch.randn(BATCH, CLASSES, 3, 3, dtype=torch.float64, requires_grad=True)  # never touched
    out = crit(logits, target)
    assert out.terms == ["P3"] and out.losses.shape == (1,)
    torch.testing.assert_close(out.total, naive_term_loss(logits[3], target, 0.3, 0.7))
    out.total.backward()
    assert all(z.grad is None for z in logits[:3]) and logits[3].grad is not None


class RecordOps(TorchDispatchMode):
    """Counts the aten operators that run (forward and, on CPU, backward: same thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# operators that read a value back to the host (a device sync on GPU) or have data-dependent shapes
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose", "unique", "masked_select"}


@pytest.mark.parametrize("space_name", ["lomix", "nnunet"])
def test_forward_and_backward_read_nothing_back_to_the_host(space_name):
    crit = fs.build_criterion(space_name, 4, CLASSES, 2)
    logits = [torch.randn(BATCH, CLASSES, 4 * 2**i, 4 * 2**i, requires_grad=True) for i in range(4)]
    target = torch.randint(0, CLASSES, (BATCH, 32, 32))
    with RecordOps() as recorder:
        crit(logits, target).total.backward()
    assert "index_select" in recorder.ops or space_name != "lomix"
    assert "upsample_bilinear2d_backward" in recorder.ops  # the backward pass was recorded too
    assert not HOST_SYNC_OPS & set(recorder.ops)


def test_wrong_number_of_logits():
    crit = fs.build_criterion("lomix", 4, CLASSES, 2)
    logits, target = random_inputs(3, 2, torch.float32)
    with pytest.raises(FusionSearchError, match="Expected 4 logit tensors .* got 3"):
        crit(logits, target)


def test_target_with_channel_dimension_is_refused():
    crit = fs.build_criterion("deep_supervision", 2, CLASSES, 2)
    logits, target = random_inputs(2, 2, torch.float32)
    with pytest.raises(FusionSearchError, match="no channel dimension"):
        crit(logits, target.unsqueeze(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_mul_of_five_large_logits_stays_finite(dtype):
    torch.manual_seed(5)
    space = SearchSpace.from_dict({"operators": ["mul", "add", "awf", "concat"]})
    crit = fs.build_criterion(space, 5, CLASSES, 2)
    leaves = [(30 * torch.randn(BATCH, CLASSES, 6, 5).sign()).requires_grad_() for _ in range(5)]
    target = torch.randint(0, CLASSES, (BATCH, 6, 5))
    with torch.autocast("cpu", dtype=dtype):
        model_outputs = [leaf.to(dtype) for leaf in leaves]  # what a network under autocast returns
        mixed = crit.mix(model_outputs)
        out = crit(model_outputs, target)
    assert mixed.dtype == torch.float32
    assert mixed.detach().abs().max().item() == pytest.approx(30.0**5)  # mul(0,1,2,3,4): 2.4e7, beyond float16's range
    assert torch.isfinite(out.total) and torch.isfinite(out.losses).all()
    out.total.backward()
    for tensor in [*leaves, *crit.parameters()]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    reference = crit(leaves, target)  # the same +-30 values, exactly representable in both dtypes
    torch.testing.assert_close(out.losses, reference.losses, rtol=1e-5, atol=1e-6)


def test_one_training_step_with_a_plugin_operator():
    torch.manual_seed(6)
    space = fs.load_space(PLUGINS / "gated_space.yaml")
    crit = fs.build_criterion(space, 3, CLASSES, 2)
    assert any(term.startswith("gated_sum(") for term in crit.terms)
    model = torch.nn.Conv2d(1, 3 * CLASSES, kernel_size=3, padding=1)
    optimizer = torch.optim.AdamW([*model.parameters(), *crit.parameters()], lr=1e-2)
    gates = {name: p.detach().clone() for name, p in crit.named_parameters() if "gated_sum" in name}
    assert gates and all(torch.all(g == 0.5) for g in gates.values())

    image = torch.randn(BATCH, 1, 8, 8)
    target = torch.randint(0, CLASSES, (BATCH, 8, 8))
    out = crit(list(model(image).split(CLASSES, dim=1)), target)
    assert torch.isfinite(out.total)
    optimizer.zero_grad()
    out.total.backward()
    optimizer.step()
    for name, p in crit.named_parameters():
        if name in gates:
            assert not torch.equal(p.detach(), gates[name]), name
