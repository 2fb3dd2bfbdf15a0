"""Per-term loss: batched plain and fused paths against independent per-term computations."""

from __future__ import annotations

import math

import monai.losses
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from fusionsearch import fused_loss
from fusionsearch.errors import FusionSearchError
from fusionsearch.fused_loss import fused_term_loss
from fusionsearch.loss import LossConfig, build_term_loss

SHAPES = {  # [K, B, C, *spatial]
    "2d": (4, 2, 3, 5, 6),
    "3d": (3, 2, 4, 3, 4, 5),
}


def naive_reference_loss(logits: torch.Tensor, target: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """One term at a time: F.cross_entropy plus the reference Dice written from its formula."""
    losses = []
    for term in logits:  # [B, C, *S]
        num_classes = term.shape[1]
        ce = F.cross_entropy(term, target)
        probs = torch.softmax(term, dim=1)
        dice_per_class = []
        for c in range(num_classes):
            p_c = probs[:, c]
            t_c = (target == c).to(term.dtype)
            dice_per_class.append(1 - (2 * (p_c * t_c).sum() + 1e-5) / ((p_c**2).sum() + (t_c**2).sum() + 1e-5))
        losses.append(beta * ce + gamma * torch.stack(dice_per_class).mean())
    return torch.stack(losses)


def monai_loss(logits: torch.Tensor, target: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """One term at a time through monai.losses.DiceCELoss itself."""
    reference = monai.losses.DiceCELoss(
        include_background=True, to_onehot_y=True, softmax=True, lambda_ce=beta, lambda_dice=gamma
    )
    return torch.stack([reference(term, target.unsqueeze(1)) for term in logits])


def random_case(shape: tuple[int, ...], dtype=torch.float64, scale: float = 2.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    k, b, c, *spatial = shape
    logits = (scale * torch.randn(shape, generator=generator, dtype=dtype)).requires_grad_(True)
    target = torch.randint(0, c, (b, *spatial), generator=generator)
    return logits, target


def values_and_grads(loss_fn, logits, target, seed: int = 1):
    """Loss values and the gradient of a random projection of them (exercises every grad_out entry)."""
    losses = loss_fn(logits, target)
    projection = torch.randn(losses.shape, generator=torch.Generator().manual_seed(seed), dtype=losses.dtype)
    (grad,) = torch.autograd.grad((losses * projection).sum(), logits)
    return losses.detach(), grad


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dims", ["2d", "3d"])
@pytest.mark.parametrize("beta,gamma", [(0.3, 0.7), (1.0, 0.0), (0.0, 2.5)])
def test_reference_loss_matches_naive_loop(fused, dims, beta, gamma):
    logits, target = random_case(SHAPES[dims])
    module = build_term_loss(LossConfig(ce=beta, dice=gamma, fused=fused))
    got, got_grad = values_and_grads(module, logits, target)
    want, want_grad = values_and_grads(lambda z, t: naive_reference_loss(z, t, beta, gamma), logits, target)
    assert got.shape == (logits.shape[0],)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_monai_kind_matches_monai_dice_ce_loss(fused, dims):
    logits, target = random_case(SHAPES[dims], seed=3)
    module = build_term_loss(LossConfig(ce=0.4, dice=0.6, dice_kind="monai", fused=fused))
    got, got_grad = values_and_grads(module, logits, target)
    want, want_grad = values_and_grads(lambda z, t: monai_loss(z, t, 0.4, 0.6), logits, target)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dice_kind", ["reference", "monai"])
@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_fused_equals_plain_in_float32(dice_kind, dims):
    logits, target = random_case(SHAPES[dims], dtype=torch.float32, scale=4.0, seed=5)
    plain = build_term_loss(LossConfig(dice_kind=dice_kind, fused=False))
    fused = build_term_loss(LossConfig(dice_kind=dice_kind, fused=True))
    got, got_grad = values_and_grads(fused, logits, target)
    want, want_grad = values_and_grads(plain, logits, target)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dice_kind", ["reference", "monai"])
@pytest.mark.parametrize("shape", [(2, 2, 3, 3, 4), (2, 1, 2, 2, 3, 2)])
def test_fused_function_passes_gradcheck(dice_kind, shape):
    logits, target = random_case(shape, seed=7)
    # gradcheck backpropagates several times through one forward, so the buffer is not reused here;
    # the default (buffer-reusing) backward is compared with this one below.
    assert torch.autograd.gradcheck(
        lambda z: fused_term_loss(z, target, 0.3, 0.7, dice_kind, reuse_buffer=False), (logits,)
    )


@pytest.mark.parametrize("dice_kind", ["reference", "monai"])
@pytest.mark.parametrize("k", [1, 7, 19])  # fewer, not a multiple of, and more terms than the 8 chunks
def test_buffer_reusing_backward_equals_the_separate_buffer_one(dice_kind, k):
    logits, target = random_case((k, 2, 3, 4, 5), seed=k)
    reused = values_and_grads(lambda z, t: fused_term_loss(z, t, 0.3, 0.7, dice_kind), logits, target)
    separate = values_and_grads(
        lambda z, t: fused_term_loss(z, t, 0.3, 0.7, dice_kind, reuse_buffer=False), logits, target
    )
    torch.testing.assert_close(reused, separate, rtol=0, atol=0)


@pytest.mark.parametrize("dice_kind", ["reference", "monai"])
@pytest.mark.parametrize("reuse_buffer", [True, False])
@pytest.mark.parametrize("terms_per_chunk", [1, 2, 3, 5, 100])  # K=5: per term, 2+2+1, uneven 3+2, whole, more
def test_chunking_gives_the_same_values_and_gradients(monkeypatch, dice_kind, reuse_buffer, terms_per_chunk):
    monkeypatch.setattr(fused_loss, "_CPU_TERMS_PER_CHUNK", terms_per_chunk)
    logits, target = random_case((5, 3, 3, 4, 5), seed=23)
    got, got_grad = values_and_grads(
        lambda z, t: fused_term_loss(z, t, 0.3, 0.7, dice_kind, reuse_buffer=reuse_buffer), logits, target
    )
    reference = naive_reference_loss if dice_kind == "reference" else monai_loss
    want, want_grad = values_and_grads(lambda z, t: reference(z, t, 0.3, 0.7), logits, target)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("device", "k", "sizes"),
    [("cpu", 5, [1] * 5), ("cuda", 5, [1] * 5), ("cuda", 19, [3, 3, 3, 3, 3, 3, 1]), ("cuda", 48, [6] * 8)],
)
def test_terms_are_chunked_per_term_on_cpu_and_in_about_eight_chunks_elsewhere(device, k, sizes):
    chunks = fused_loss._term_chunks(k, torch.device(device))
    assert [len(range(k)[chunk]) for chunk in chunks] == sizes
    assert [i for chunk in chunks for i in range(k)[chunk]] == list(range(k))


def test_second_backward_through_the_fused_loss_is_a_clear_error():
    logits, target = random_case((3, 2, 3, 4, 4), seed=19)
    losses = build_term_loss(LossConfig(fused=True))(logits, target)
    losses.sum().backward(retain_graph=True)
    with pytest.raises(FusionSearchError, match="fused: false"):
        losses.sum().backward()
    plain = build_term_loss(LossConfig(fused=False))(logits, target)
    plain.sum().backward(retain_graph=True)
    plain.sum().backward()  # allowed


def test_absent_class_and_single_term_agree_with_torch_cross_entropy():
    # Class 2 never occurs in the target: its Dice is 1 - eps/(sum p^2 + eps), the loop handles it too.
    logits, _ = random_case((1, 3, 3, 4, 4), seed=11)
    target = torch.randint(0, 2, (3, 4, 4), generator=torch.Generator().manual_seed(2))
    ce_only = build_term_loss(LossConfig(ce=1.0, dice=0.0))(logits, target)
    torch.testing.assert_close(ce_only[0], F.cross_entropy(logits[0], target))
    both = build_term_loss(LossConfig())(logits, target)
    torch.testing.assert_close(both, naive_reference_loss(logits, target, 0.3, 0.7))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_under_autocast_stay_finite(fused, amp_dtype, input_dtype):
    # A `mul` of five logits of magnitude 30 gives about 30**5 = 2.4e7 (beyond float16's 65504).
    generator = torch.Generator().manual_seed(13)
    factors = [30 * torch.sign(torch.randn(3, 2, 4, 6, 6, generator=generator)) for _ in range(5)]
    product = math.prod(factors) * (1 + 0.1 * torch.rand(3, 2, 4, 6, 6, generator=generator))
    assert product.abs().max() > 2e7
    logits = product.to(input_dtype).requires_grad_(True)
    target = torch.randint(0, 4, (2, 6, 6), generator=generator)
    module = build_term_loss(LossConfig(fused=fused))
    with torch.autocast(device_type="cpu", dtype=amp_dtype):
        losses = module(logits, target)
    losses.sum().backward()
    assert losses.dtype == torch.float32
    assert torch.isfinite(losses).all() and torch.isfinite(logits.grad).all()
    # The float32 computation must also be right, not only finite: compare with float64.
    want = naive_reference_loss(logits.detach().double(), target, 0.3, 0.7)
    torch.testing.assert_close(losses.double(), want, rtol=1e-6, atol=0)


def test_half_precision_input_is_computed_in_float32():
    logits, target = random_case((2, 2, 3, 4, 4), dtype=torch.float32, seed=17)
    half = logits.detach().to(torch.bfloat16)
    got = build_term_loss(LossConfig())(half, target)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_reference_loss(half.double(), target, 0.3, 0.7))


@pytest.mark.parametrize(
    "target_shape,target_dtype,message",
    [
        ((2, 1, 4, 4), torch.long, "shape"),  # a channel dimension left on the target
        ((2, 4, 5), torch.long, "shape"),
        ((2, 4, 4), torch.float32, "integer class indices"),
    ],
)
def test_bad_target_is_a_clear_error(target_shape, target_dtype, message):
    logits = torch.randn(3, 2, 3, 4, 4)
    target = torch.zeros(target_shape, dtype=target_dtype)
    with pytest.raises(FusionSearchError, match=message):
        build_term_loss(LossConfig())(logits, target)


def test_bad_logits_are_a_clear_error():
    with pytest.raises(FusionSearchError, match="at least 4 dimensions"):
        build_term_loss(LossConfig())(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(FusionSearchError, match="at least 2 classes"):
        build_term_loss(LossConfig())(torch.randn(2, 2, 1, 4), torch.zeros(2, 4, dtype=torch.long))


def test_out_of_range_target_raises_instead_of_a_silent_value():
    logits = torch.randn(2, 2, 3, 4, 4)
    target = torch.full((2, 4, 4), 3)
    for fused in (True, False):
        with pytest.raises((RuntimeError, IndexError)):
            build_term_loss(LossConfig(fused=fused))(logits, target)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"ce": -0.1}, ">= 0"),
        ({"dice": float("inf")}, "finite"),
        ({"ce": 0, "dice": 0}, "both 0"),
        ({"dice_kind": "soft"}, "reference"),
        ({"lambda_ce": 1.0}, "Extra inputs"),
        ({"fused": "maybe"}, "bool"),
    ],
)
def test_loss_config_rejects_bad_fields(fields, message):
    with pytest.raises(ValidationError, match=message):
        LossConfig(**fields)


def test_loss_config_defaults_are_the_lomix_reference():
    config = LossConfig()
    assert (config.ce, config.dice, config.dice_kind, config.fused) == (0.3, 0.7, "reference", True)
