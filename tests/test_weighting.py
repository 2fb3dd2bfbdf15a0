"""Weightings: effective weights against hand-computed formulas, gradient directions, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pydantic import ValidationError

import fusionsearch as fs
from fusionsearch.errors import ConfigError, UnknownNameError
from fusionsearch.terms import Term
from fusionsearch.weighting import Weighting, WeightingConfig, build_weighting

BUILTIN_KINDS = ["fixed", "halving", "last_only", "softplus", "softplus_normalised", "uncertainty", "uniform"]


def lomix_terms(num_scales: int, operators=("add", "mul", "awf", "concat"), originals: bool = True) -> list[Term]:
    """Terms in the reference order, built here independently of the compiler."""
    terms = [Term(f"P{i}", None, (i,)) for i in range(num_scales)] if originals else []
    for op in operators:
        for size in range(2, num_scales + 1):
            for subset in itertools.combinations(range(num_scales), size):
                terms.append(Term(f"{op}({','.join(map(str, subset))})", op, subset))
    return terms


def positive_losses(k: int, seed: int = 0) -> torch.Tensor:
    return 0.2 + torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_lomix_term_count_helper_is_right():
    assert len(lomix_terms(4)) == 48 and len(lomix_terms(5)) == 109


@pytest.mark.parametrize("num_scales", [2, 3, 4, 5])
def test_softplus_starts_at_ln2_and_only_shrinks(num_scales):
    terms = lomix_terms(num_scales)
    weighting = build_weighting(WeightingConfig(kind="softplus"), terms, num_scales)
    torch.testing.assert_close(weighting.effective_weights(), torch.full((len(terms),), math.log(2.0)))
    losses = positive_losses(len(terms))
    total, weights = weighting(losses)
    torch.testing.assert_close(total, math.log(2.0) * losses.sum(), rtol=1e-6, atol=0)
    total.backward()
    # d total / d alpha_k = sigmoid(alpha_k) * L_k = 0.5 * L_k at alpha = 0: always positive.
    torch.testing.assert_close(weighting.alpha.grad, (0.5 * losses).float())
    with torch.no_grad():
        weighting.alpha -= 0.1 * weighting.alpha.grad
    assert (weighting.effective_weights() < math.log(2.0)).all()
    assert not weights.requires_grad


def test_softplus_init_option():
    terms = lomix_terms(3)
    weighting = build_weighting(WeightingConfig(kind="softplus", init=1.5), terms, 3)
    torch.testing.assert_close(weighting.effective_weights(), torch.full((len(terms),), math.log1p(math.exp(1.5))))


def test_softplus_normalised_sums_to_k_at_any_alpha():
    terms = lomix_terms(3)
    weighting = build_weighting(WeightingConfig(kind="softplus_normalised"), terms, 3)
    torch.testing.assert_close(weighting.effective_weights(), torch.ones(len(terms)))
    alphas = [0.3 * i - 1.0 for i in range(len(terms))]
    with torch.no_grad():
        weighting.alpha.copy_(torch.tensor(alphas))
    raw = [math.log1p(math.exp(a)) for a in alphas]
    want = torch.tensor([len(terms) * r / sum(raw) for r in raw])
    got = weighting.effective_weights()
    torch.testing.assert_close(got, want)
    assert got.sum().item() == pytest.approx(len(terms), rel=1e-6)


def test_softplus_normalised_gradient_moves_weight_towards_small_losses():
    terms = lomix_terms(2)  # P0, P1, add(0,1), mul(0,1), awf(0,1), concat(0,1)
    weighting = build_weighting(WeightingConfig(kind="softplus_normalised"), terms, 2)
    losses = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 3.0])
    weighting(losses)[0].backward()
    grad = weighting.alpha.grad
    assert grad[-1] > 0 and (grad[:-1] < 0).all()  # the worst term loses weight, the others gain
    assert grad.sum().abs() < 1e-6  # scale invariance: only relative weights change


def test_uncertainty_total_weights_and_optimum():
    terms = lomix_terms(2)
    weighting = build_weighting(WeightingConfig(kind="uncertainty"), terms, 2)
    losses = positive_losses(len(terms), seed=3).float()
    s = torch.linspace(-0.5, 0.7, len(terms))
    with torch.no_grad():
        weighting.log_variance.copy_(s)
    total, weights = weighting(losses)
    want_total = sum(math.exp(-sk) * lk + sk for sk, lk in zip(s.tolist(), losses.tolist(), strict=True))
    assert total.item() == pytest.approx(want_total, rel=1e-6)
    torch.testing.assert_close(weights, torch.exp(-s))
    # The gradient vanishes at s = log L, and points back towards it on either side.
    for offset, sign in [(0.0, 0), (0.5, 1), (-0.5, -1)]:
        with torch.no_grad():
            weighting.log_variance.copy_(losses.log() + offset)
        weighting.zero_grad()
        weighting(losses)[0].backward()
        grad = weighting.log_variance.grad
        if sign == 0:
            assert grad.abs().max() < 1e-6
        else:
            assert (torch.sign(grad) == sign).all()


def test_uncertainty_training_converges_to_log_loss():
    terms = lomix_terms(2)
    weighting = build_weighting(WeightingConfig(kind="uncertainty", init=1.0), terms, 2)
    losses = positive_losses(len(terms), seed=4).float()
    optimiser = torch.optim.SGD(weighting.parameters(), lr=0.5)
    for _ in range(200):
        optimiser.zero_grad()
        weighting(losses)[0].backward()
        optimiser.step()
    torch.testing.assert_close(weighting.log_variance.detach(), losses.log(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("normalise", [None, False, True])
def test_fixed_weights_are_used_as_given(normalise):
    terms = lomix_terms(2)
    values = [0.0, 1.0, 2.0, 0.5, 0.25, 4.0]
    weighting = build_weighting(WeightingConfig(kind="fixed", values=values, normalise=normalise), terms, 2)
    want = [v / sum(values) for v in values] if normalise else values
    torch.testing.assert_close(weighting.effective_weights(), torch.tensor(want))
    losses = positive_losses(len(terms)).float()
    total, _ = weighting(losses)
    assert total.item() == pytest.approx(sum(w * loss for w, loss in zip(want, losses.tolist(), strict=True)), rel=1e-6)
    assert list(weighting.parameters()) == []


def test_fixed_length_mismatch_names_k_and_terms():
    terms = lomix_terms(2)
    with pytest.raises(ConfigError) as info:
        build_weighting(WeightingConfig(kind="fixed", values=[1.0, 2.0]), terms, 2)
    text = str(info.value)
    assert "K=6" in text and "P0, P1, add(0,1), mul(0,1), awf(0,1), concat(0,1)" in text
    assert info.value.field == "weighting.values"


@pytest.mark.parametrize("normalise", [False, True])
def test_uniform(normalise):
    terms = lomix_terms(3)
    weighting = build_weighting(WeightingConfig(kind="uniform", normalise=normalise), terms, 3)
    value = 1.0 / len(terms) if normalise else 1.0
    torch.testing.assert_close(weighting.effective_weights(), torch.full((len(terms),), value))


@pytest.mark.parametrize("num_scales", [1, 2, 3, 4, 5])
def test_last_only_picks_the_finest_original(num_scales):
    terms = lomix_terms(num_scales)
    weights = build_weighting(WeightingConfig(kind="last_only"), terms, num_scales).effective_weights()
    want = torch.zeros(len(terms))
    want[[t.name for t in terms].index(f"P{num_scales - 1}")] = 1.0
    torch.testing.assert_close(weights, want)


def test_halving_at_four_scales_by_hand():
    terms = lomix_terms(4)
    weights = build_weighting(WeightingConfig(kind="halving"), terms, 4).effective_weights()
    # raw 1/8 (dropped), 1/4, 1/2, 1 -> sum 7/4 -> 0, 1/7, 2/7, 4/7; every fused term 0
    torch.testing.assert_close(weights[:4], torch.tensor([0.0, 1 / 7, 2 / 7, 4 / 7]))
    assert (weights[4:] == 0).all()


@pytest.mark.parametrize("num_scales", [1, 2, 3, 5])
@pytest.mark.parametrize("normalise", [None, False])
def test_halving_general(num_scales, normalise):
    terms = lomix_terms(num_scales, operators=("add",))
    config = WeightingConfig(kind="halving", normalise=normalise)
    weights = build_weighting(config, terms, num_scales).effective_weights()
    raw = [0.0 if (i == 0 and num_scales > 1) else 2.0 ** -(num_scales - 1 - i) for i in range(num_scales)]
    if normalise is None:
        raw = [r / sum(raw) for r in raw]
    torch.testing.assert_close(weights[:num_scales], torch.tensor(raw))
    assert (weights[num_scales:] == 0).all()


@pytest.mark.parametrize("kind", ["halving", "last_only"])
def test_original_based_kinds_need_the_originals(kind):
    terms = lomix_terms(3, originals=False)
    with pytest.raises(ConfigError, match="lack P0, P1, P2"):
        build_weighting(WeightingConfig(kind=kind), terms, 3)


def test_unknown_kind_lists_the_known_kinds():
    with pytest.raises(ValidationError) as info:
        WeightingConfig(kind="softplux")
    text = str(info.value)
    assert "Did you mean 'softplus'" in text
    for kind in BUILTIN_KINDS:
        assert kind in text


def test_registry_lists_the_builtins_and_lookup_misses_clearly():
    assert set(BUILTIN_KINDS) <= set(fs.WEIGHTINGS.names())
    with pytest.raises(UnknownNameError, match="Known weightings: .*uncertainty"):
        fs.WEIGHTINGS.get("nope")


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"kind": "uniform", "init": 1.0}, "'init' does not apply"),
        ({"kind": "softplus", "values": [1.0]}, "'values' does not apply"),
        ({"kind": "softplus", "normalise": True}, "'normalise' does not apply"),
        ({"kind": "fixed"}, "needs 'values'"),
        ({"kind": "fixed", "values": [1.0, -1.0]}, ">= 0"),
        ({"kind": "fixed", "values": [0.0, 0.0]}, "no weight is positive"),
        ({"kind": "uncertainty", "init": float("nan")}, "finite"),
        ({"kind": "halving", "options": {"x": 1}}, "third-party"),
        ({"kind": "softplus", "alpha": 0.0}, "Extra inputs"),
    ],
)
def test_config_rejects_fields_the_kind_would_ignore(fields, message):
    with pytest.raises(ValidationError, match=message):
        WeightingConfig(**fields)


def test_losses_of_the_wrong_length_are_refused():
    weighting = build_weighting(WeightingConfig(kind="uniform"), lomix_terms(2), 2)
    with pytest.raises(ValueError, match="built for 6 terms"):
        weighting(torch.ones(5))


def test_third_party_weighting_registers_and_receives_its_options():
    class InverseIndex(Weighting):
        """w_k = scale / (k + 1): a toy scheme to prove the extension point."""

        def __init__(self, config, terms, num_scales):
            super().__init__(terms)
            self.register_buffer("w", config.options["scale"] / torch.arange(1.0, len(terms) + 1))

        def weights(self):
            return self.w

    fs.register_weighting("inverse_index_test", InverseIndex)
    try:
        config = WeightingConfig(kind="inverse_index_test", options={"scale": 2.0})
        weighting = build_weighting(config, lomix_terms(2), 2)
        torch.testing.assert_close(weighting.effective_weights(), torch.tensor([2.0, 1.0, 2 / 3, 0.5, 0.4, 1 / 3]))
        with pytest.raises(Exception, match="already registered"):
            fs.register_weighting("inverse_index_test", lambda *a: None)
    finally:
        fs.WEIGHTINGS.unregister("inverse_index_test")


def test_a_factory_that_returns_a_non_weighting_is_a_clear_error():
    fs.register_weighting("broken_test", lambda config, terms, num_scales: torch.ones(len(terms)))
    try:
        with pytest.raises(ConfigError, match="not a fusionsearch.weighting.Weighting"):
            build_weighting(WeightingConfig(kind="broken_test"), lomix_terms(2), 2)
    finally:
        fs.WEIGHTINGS.unregister("broken_test")


@pytest.mark.parametrize("kind", ["softplus", "uncertainty", "uniform"])
def test_float64_losses_give_a_float64_scalar_total(kind):
    weighting = build_weighting(WeightingConfig(kind=kind), lomix_terms(2), 2)
    losses = positive_losses(6)
    total, weights = weighting(losses)
    assert total.dtype == torch.float64 and weights.shape == (6,)
    assert total.dim() == 0
